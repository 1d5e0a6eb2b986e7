"""Phantom re-acquisition: the exact counterfactual of an acquisition shift.

A phantom dataset's `phantom.json` records its seed, size, task, layout and generation overrides; case i
(in `ctseg.datasets.phantom.case_names` order) is `generate_case(SeedSequence([seed, i]), ...)`. Re-rendering
it with one acquisition parameter changed gives the same anatomy (and noise pattern) with exact labels on the
new grid: `phantom-dose` multiplies the noise sigma, `phantom-thickness` multiplies the slice thickness
(slice spacing = thickness, extent kept; the phantom's noise follows the thickness as a scanner's does).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctseg.errors import CtsegError
from ctseg.stress.perturb import DegenerateSeverity, Perturbed

PARAMETERS = {"phantom-dose": "noise_sigma", "phantom-thickness": "slice_thickness"}

#: Population-shift axes (`ctseg.datasets.phantom.Population`): axis -> the shifted field. The case is drawn
#: again from its seed in the shifted population: the draws before the first size-dependent one (body, scanner,
#: organ HU) are the case's own; later ones (organ texture fields, z-extent) differ, so a shifted volume is a
#: new patient of the shifted population, not an exact counterfactual. Labels are exact on its own grid.
POPULATION_AXES = {"pop-habitus": "habitus", "pop-fov": "fov", "pop-kidney-size": "kidney_size",
                   "pop-tumour-size": "tumour_size", "pop-phase": "phase", "pop-kernel": "kernel"}


@dataclass(frozen=True)
class PhantomRecipe:
    """How to re-render one case of a phantom dataset."""

    seed: int
    index: int
    task: str
    size: str
    overrides: dict
    acquisition: dict


def phantom_recipes(data_dir: str | Path) -> dict[str, PhantomRecipe] | None:
    """case id -> recipe from `data_dir/phantom.json`, or None when the folder is not a phantom dataset."""
    from ctseg.datasets.phantom import case_names

    path = Path(data_dir) / "phantom.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        names = case_names(info["layout"], len(info["cases"]))
        return {cid: PhantomRecipe(int(info["seed"]), names.index(cid), info["task"], info["size"],
                                   dict(info.get("overrides") or {}), dict(meta["acquisition"]))
                for cid, meta in info["cases"].items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CtsegError(f"unreadable phantom description ({type(err).__name__}: {err})", path) from None


def reacquire(recipe: PhantomRecipe, axis: str, factor: float, case_id: str) -> Perturbed:
    """The case re-rendered with its noise sigma (`phantom-dose`) or slice thickness (`phantom-thickness`)
    multiplied by `factor`, or drawn from a shifted population (`POPULATION_AXES`, `factor` = the shift's
    value); canonical orientation, labels exact on the new grid (scored there)."""
    from ctseg.datasets.phantom import generate_case

    seed = np.random.SeedSequence([recipe.seed, recipe.index])
    kwargs = dict(recipe.overrides)
    if axis in POPULATION_AXES:
        kwargs["population"] = {**dict(kwargs.get("population") or {}), POPULATION_AXES[axis]: factor}
        case = generate_case(seed, task=recipe.task, size=recipe.size, case_id=case_id, **kwargs)
    elif axis == "phantom-dose":
        acq = {"noise_sigma": float(recipe.acquisition["noise_sigma"]) * factor}
        case = generate_case(seed, task=recipe.task, size=recipe.size, case_id=case_id, acquisition=acq, **kwargs)
    elif axis == "phantom-thickness":
        thickness = float(recipe.acquisition["slice_thickness"]) * factor
        if factor != 1.0:
            kwargs["thickness"] = thickness
        extent = float(recipe.acquisition["slice_spacing"]) * int(recipe.acquisition["num_slices"])
        if thickness > 50.0:
            raise DegenerateSeverity(f"{thickness:g} mm slices: the phantom renders at most 50 mm")
        if extent / thickness < 2:
            raise DegenerateSeverity(f"{thickness:g} mm slices leave fewer than 2 slices of its {extent:g} mm extent")
        case = generate_case(seed, task=recipe.task, size=recipe.size, case_id=case_id, **kwargs)
    else:
        raise ValueError(f"not a phantom axis: {axis!r}")
    image, label = case.image, case.label
    if label is None:  # the phantom always draws its labels
        raise CtsegError(f"the re-rendered phantom case {case_id} has no label")
    return Perturbed(image.with_array(image.array.astype(np.float32)), label, "perturbed")
