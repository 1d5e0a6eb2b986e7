"""Training: loss (`losses`), trainer and checkpoints (`trainer`, `checkpoint`), multi-GPU (`distributed`)."""
