import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO / "tests" / "data" / "real-ct-liver"  # in the repository: a clone needs nothing beside it


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def real_ct_dir():
    if not (REAL_CT / "DICOM_anon").is_dir():
        raise FileNotFoundError(f"real CT fixture missing at {REAL_CT} (part of the repository: check .gitignore)")
    return REAL_CT
