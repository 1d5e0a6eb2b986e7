"""`generate_case`: one synthetic CT case (anatomy, acquisition, rendering) from one seed."""
from __future__ import annotations

import math
import os
from dataclasses import asdict

import numpy as np
from threadpoolctl import threadpool_limits

from ctseg.datasets.base import Case
from ctseg.datasets.phantom.acquisition import (REACQUIRABLE, SIZES, Acquisition, _draw_acquisition, _finish_z,
                                                _render, _streak_pattern)
from ctseg.datasets.phantom.anatomy import _Anatomy, _draw_anatomy
from ctseg.datasets.phantom.fields import _Curve, _Grid, _u
from ctseg.datasets.phantom.organs import _Body
from ctseg.datasets.phantom.population import Population
from ctseg.errors import CtsegError
from ctseg.io import Volume

CLASSES = {"kidney": {0: "background", 1: "kidney", 2: "tumour"}, "liver": {0: "background", 1: "liver"}}


def _check_args(task: str, size: str, in_plane: int | None, num_slices: int | None,
                thickness: float | None) -> None:
    if task not in CLASSES:
        raise CtsegError(f"unknown phantom task {task!r}; choose one of {list(CLASSES)}")
    if size not in SIZES:
        raise CtsegError(f"unknown phantom size {size!r}; choose one of {list(SIZES)}")
    if (in_plane is not None and in_plane < 16) or (num_slices is not None and num_slices < 1) \
            or (thickness is not None and not 0.1 <= thickness <= 50):
        raise CtsegError(f"need in_plane >= 16, num_slices >= 1, 0.1 <= thickness <= 50 mm "
                         f"(got {in_plane}, {num_slices}, {thickness})")


def _draw_case(rng: np.random.Generator, task: str, size: str, in_plane: int | None, num_slices: int | None,
               thickness: float | None, pop: Population = Population()) -> tuple[Acquisition, _Grid, _Anatomy]:
    a, b = _u(rng, 135, 195), _u(rng, 95, 140)
    sz = _u(rng, 0.9, 1.1)
    body = _Body(a=a, b=b, back=b * _u(rng, 0.85, 0.95),
                 outline=_Curve.draw(rng, -700, 700, 70, 7, [0.03, 0.02, 0.02, 0.02, 0.02, 0.01, 0.01]),
                 fat=_u(rng, 6, 40) * a / 165, fat_profile=_Curve.draw(rng, -700, 700, 60, 7, 0.12),
                 muscle=_u(rng, 7, 13), hu_fat=_u(rng, -120, -80), hu_muscle=_u(rng, 40, 60),
                 hu_visceral=_u(rng, -120, -80))
    extra = (pop.habitus - 1.0) * a   # habitus: fat added all round, the inner body (and organs) unchanged
    body.a, body.b, body.back, body.fat = a + extra, b + extra, body.back + extra, body.fat + extra
    acq = _draw_acquisition(rng, size, body, in_plane)
    acq.pixel_spacing = round(acq.pixel_spacing * pop.fov, 4)
    acq.psf_sigma_px = round(acq.psf_sigma_px / pop.kernel, 4)
    grid = _Grid.make(acq.size, acq.pixel_spacing, (0.0, 0.0), acq.roll_deg, acq.table_shift_mm)
    anatomy = _draw_anatomy(rng, task, grid, body, sz, pop, organ_ref_mm=a)
    _finish_z(acq, rng, task, size, anatomy.regions, num_slices, thickness)
    acq.noise_sigma = round(acq.noise_sigma * math.sqrt(pop.kernel), 2)
    return acq, grid, anatomy


def draw_acquisition(seed: int | np.random.SeedSequence | np.random.Generator = 0, task: str = "kidney",
                     size: str = "full", *, in_plane: int | None = None, num_slices: int | None = None,
                     thickness: float | None = None, population: Population | dict | None = None) -> Acquisition:
    """The acquisition `generate_case` would use for these arguments, without rendering the volume."""
    _check_args(task, size, in_plane, num_slices, thickness)
    return _draw_case(np.random.default_rng(seed), task, size, in_plane, num_slices, thickness,
                      Population.of(population))[0]


def generate_case(seed: int | np.random.SeedSequence | np.random.Generator = 0, task: str = "kidney",
                  size: str = "full", *, in_plane: int | None = None, num_slices: int | None = None,
                  thickness: float | None = None, case_id: str = "phantom", workers: int | None = None,
                  acquisition: dict | None = None, population: Population | dict | None = None) -> Case:
    """One synthetic abdominal CT case, deterministic per seed.

    task: "kidney" (labels 0 background, 1 kidney, 2 tumour; KiTS19) or "liver" (0/1; CHAOS).
    size: "full" (512 x 512, ~20..600 slices) or "small" (128 x 128: the same case coarsened, about x4 in
    every axis, >= 16 slices). Overrides: in_plane (pixels, same field of view), num_slices (same slice
    spacing, centred on the drawn region), thickness (mm; slice spacing = thickness). Image: HU (int16 or
    float32 as drawn), canonical (z, y, x), direction identity; label uint8 on the same grid. metadata:
    num_slices, spacing, slice_thickness, task, size, acquisition (see `Acquisition`), tumours,
    label_volumes_ml. workers: threads over slice blocks (default min(2, cores)); the result does not depend on it.
    acquisition: fields of the drawn `Acquisition` to replace before rendering (one of REACQUIRABLE, e.g.
    {"noise_sigma": 30.0}): the same anatomy and noise pattern re-acquired (`ctseg stress`); None = as drawn.
    population: a `Population` shift (or a dict of its fields), e.g. {"habitus": 1.4}: the same case drawn from
    a shifted patient / scanner population (`ctseg stress` population axes); None = the training population.
    """
    _check_args(task, size, in_plane, num_slices, thickness)
    unknown = sorted(set(acquisition or {}) - set(REACQUIRABLE))
    if unknown:
        raise CtsegError(f"acquisition overrides {unknown} not supported; choose from {list(REACQUIRABLE)}")
    rng = np.random.default_rng(seed)
    pop = Population.of(population)
    acq, grid, anatomy = _draw_case(rng, task, size, in_plane, num_slices, thickness, pop)
    noise_seed = int(rng.integers(2 ** 63))
    streaks = _streak_pattern(rng, grid, anatomy.spine_xy) if acq.streaks else None
    streak_curve = _Curve.draw(rng, -700, 700, 40, 1, 1.0) if acq.streaks else None
    z_table = _u(rng, -600, 0)
    for key, value in (acquisition or {}).items():   # after every draw: the anatomy and noise pattern stay
        setattr(acq, key, type(getattr(acq, key))(value))
    workers = workers or min(2, os.cpu_count() or 1)
    with threadpool_limits(1, user_api="blas"):     # the blocks run in parallel; BLAS threads would oversubscribe
        image, label = _render(anatomy, acq, grid, noise_seed, streaks, streak_curve, workers)
    if acq.storage == "int16":
        image = np.round(image).astype(np.int16)
    spacing = (acq.slice_spacing, acq.pixel_spacing, acq.pixel_spacing)
    origin = (float(grid.xs[0]), float(grid.ys[0]), acq.z_first + z_table)
    meta = {"source": "ctseg phantom", "task": task}
    image_vol = Volume(image, spacing, origin, np.eye(3), acq.slice_thickness, dict(meta))
    label_vol = Volume(label, spacing, origin, np.eye(3), acq.slice_thickness, dict(meta))
    voxel_ml = float(np.prod(spacing)) / 1000
    counts = np.bincount(label.reshape(-1), minlength=len(CLASSES[task]))
    metadata = {
        "num_slices": acq.num_slices,
        "spacing": spacing,
        "slice_thickness": acq.slice_thickness,
        "task": task,
        "size": size,
        "acquisition": asdict(acq),
        "tumours": anatomy.tumours,
        "population": asdict(pop),
        "label_volumes_ml": {name: round(float(counts[v]) * voxel_ml, 2) for v, name in CLASSES[task].items() if v},
    }
    return Case(case_id, image_vol, label_vol, metadata)
