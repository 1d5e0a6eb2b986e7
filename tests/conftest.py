import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_CT = SHARED / "data" / "real-ct-liver"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def real_ct_dir():
    if not (REAL_CT / "DICOM_anon").is_dir():
        raise FileNotFoundError(f"real CT fixture missing at {REAL_CT} (shared/ must sit beside the repo)")
    return REAL_CT
