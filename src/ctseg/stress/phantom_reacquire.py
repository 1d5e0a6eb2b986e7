"""Phantom re-acquisition: the exact counterfactual of an acquisition shift, and the stress axes it serves.

A phantom dataset's `phantom.json` records its seed, size, task, layout and generation overrides; case i
(in `ctseg.datasets.phantom.case_names` order) is `generate_case(SeedSequence([seed, i]), ...)`. Re-rendering
it with one acquisition parameter changed gives the same anatomy (and noise pattern) with exact labels on the
new grid: `phantom-dose` multiplies the noise sigma, `phantom-thickness` multiplies the slice thickness
(slice spacing = thickness, extent kept; the phantom's noise follows the thickness as a scanner's does).
The population shifts (`POPULATION_AXES`, pop-*) draw the case again from a shifted population.

These axes are registered here (`ctseg.registry.STRESS_AXES`, beside the perturbations of
`ctseg.stress.perturb`), with no `Axis.apply`: the runner calls `reacquire` for them (`Axis.needs_phantom`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ctseg.datasets.phantom import POPULATION_RANGES
from ctseg.errors import CtsegError
from ctseg.registry import STRESS_AXES
from ctseg.stress.perturb import Axis, DegenerateSeverity, Perturbed

PARAMETERS = {"phantom-dose": "noise_sigma", "phantom-thickness": "slice_thickness"}

#: Population-shift axes (`ctseg.datasets.phantom.Population`), in the order reports show them: axis -> (the
#: shifted field, default severities (clean first), unit, description). The case is drawn again from its seed in
#: the shifted population: the draws before the first size-dependent one (body, scanner, organ HU) are the case's
#: own; later ones (organ texture fields, z-extent) differ, so a shifted volume is a new patient of the shifted
#: population, not an exact counterfactual. Labels are exact on its own grid.
_POPULATION: dict[str, tuple[str, tuple[float, ...], str, str]] = {
    "pop-habitus": ("habitus", (1.0, 1.15, 1.3, 1.45, 1.6), "x body width",
                    "heavier patients: extra fat all round, organs unchanged"),
    "pop-fov": ("fov", (1.0, 0.7, 0.85, 1.25, 1.5), "x pixel spacing",
                "field of view / pixel spacing: smaller cuts the body, larger adds air and coarser pixels"),
    "pop-kidney-size": ("kidney_size", (1.0, 0.7, 0.85, 1.2, 1.4), "x kidney radii", "kidney size outside the training range"),
    "pop-tumour-size": ("tumour_size", (1.0, 1.5, 2.0, 3.0, 4.0), "x tumour diameter", "tumour burden: larger tumours (<= 100 mm)"),
    "pop-phase": ("phase", (0.0, 0.25, 0.5, 0.75, 1.0), "toward unenhanced",
                  "contrast phase: organ, vessel and tumour HU toward non-contrast values"),
    "pop-kernel": ("kernel", (1.0, 1.5, 2.0, 3.0, 4.0), "x sharper",
                   "reconstruction kernel: less in-plane blur, finer and stronger noise"),
}
#: Population-shift axis -> the `Population` field it shifts.
POPULATION_AXES = {axis: field for axis, (field, *_) in _POPULATION.items()}


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


# -------------------------------------------------------------------------- the axes (`ctseg.registry.STRESS_AXES`)
#: The severities the re-rendered axes can take: a multiple of the case's own noise sigma / slice thickness.
_MULTIPLE: tuple[str, Callable[[float], bool]] = ("> 0 and <= 20", lambda s: 0 < s <= 20)


def _population_axis(axis: str) -> Axis:
    """The population shift `axis` (clean = its first severity): it takes what `Population` takes for its field
    (`POPULATION_RANGES`)."""
    field, severities, unit, description = _POPULATION[axis]
    lo, hi = POPULATION_RANGES[field]
    return Axis(axis, severities[0], severities, unit, None, description, needs_phantom=True,
                valid=(f"{lo:g} to {hi:g}", lambda s: lo <= s <= hi))


_AXES = (
    Axis("phantom-dose", 1.0, (1.0, 1.5, 2.0, 3.0, 4.0), "x noise", None,
         "phantom re-rendered with k x its noise sigma", needs_phantom=True, valid=_MULTIPLE),
    Axis("phantom-thickness", 1.0, (1.0, 1.5, 2.0, 3.0, 4.0), "x native", None,
         "phantom re-rendered with k x its slice thickness", needs_phantom=True, valid=_MULTIPLE),
    *(_population_axis(axis) for axis in _POPULATION),
)
for _axis in _AXES:
    STRESS_AXES.register(_axis)
