"""Mechanical checks of docs/PAPER_FIDELITY.md against the code: the tests it cites exist, the config keys and
`ctseg.` names it mentions resolve, and its claim about the simulated acquisition's slice choice holds."""
import importlib
import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from ctseg.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "PAPER_FIDELITY.md").read_text()
SECTIONS = set(ExperimentConfig.model_fields)


def test_cited_tests_exist():
    cited = set(re.findall(r"`(test_\w+)`", DOC)) - {"test_cases"}  # a JSON field of provenance.json
    defined = {m for p in (REPO / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)", p.read_text(), re.M)}
    assert cited and not cited - defined, sorted(cited - defined)


def _resolves(path: list[str]) -> bool:
    model: type[BaseModel] = ExperimentConfig
    for i, key in enumerate(path):
        field = model.model_fields.get(key)
        if field is None:  # a registered component's section (`augment.ctia`, `model.unet`, ...)?
            section = getattr(model, "section_types", dict)().get(key)
            if section is None:
                return False
            model = section
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return True  # a leaf (or a dict whose keys are data, e.g. a variant's name)
    return True


def test_config_keys_in_the_doc_exist():
    keys = {k.split(":")[0].strip() for k in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)(?::[^`]*)?`", DOC)}
    keys = {k for k in keys if k.split(".")[0] in SECTIONS and not re.search(r"\.(py|json|yaml|csv|md|pt)$", k)}
    assert {"stack.meta_training", "train.val_slices", "preprocess.window"} <= keys
    assert not [k for k in keys if not _resolves(k.split("."))], [k for k in keys if not _resolves(k.split("."))]


def test_ctseg_names_in_the_doc_resolve():
    names = set(re.findall(r"`(ctseg(?:\.\w+)+)`", DOC))
    assert names
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, missing


def test_acquisition_fallback_is_as_documented():
    """§4: with fewer than 16 foreground slices on the simulated grid, all of them are kept and topped up with the
    grid slices nearest to them (the plain sampler's rule); with enough, only foreground slices."""
    from ctseg.augment.acquisition import SKIP, acquire_stack

    assert "topped up with the grid slices nearest to them (`top_up_slices`)" in DOC
    z = 40
    image = np.broadcast_to(np.arange(z, dtype=np.float32)[:, None, None], (z, 2, 2)).copy()
    label = np.zeros((z, 2, 2), np.uint8)
    label[10:13] = 1
    rng = np.random.default_rng(0)
    for _ in range(50):  # factor 1.0001: the grid is the source grid, a slab's mean is its slice index
        out, lab = acquire_stack(image, label, 16, SKIP, 1.0001, 0.0, rng)
        picked = np.rint(out.mean(axis=(1, 2))).astype(int)
        assert lab.any(axis=(1, 2)).sum() == 3 and np.all(np.diff(picked) == 1)  # every foreground slice, neighbours
    label[5:30] = 1
    assert all(acquire_stack(image, label, 16, SKIP, 1.0001, 0.0, rng)[1].any(axis=(1, 2)).all() for _ in range(50))