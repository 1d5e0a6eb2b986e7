"""Datasets yielding `Case`s: KiTS19, CHAOS CT, nnU-Net raw, and the synthetic phantom."""
