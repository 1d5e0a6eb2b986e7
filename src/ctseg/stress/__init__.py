"""Acquisition-shift stress test (`ctseg stress`): perturbations (`perturb`), phantom re-acquisition
(`phantom_reacquire`), the runner (`runner`) and its statistics and report parts (`summary`)."""
