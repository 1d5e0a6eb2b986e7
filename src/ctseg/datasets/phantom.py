"""Synthetic abdominal CT phantom: HU-calibrated anatomy with labels, and per-case acquisition variation.

A case is drawn in two steps from one seed:

1. Anatomy (patient frame, mm, LPS: x -> patient left, y -> posterior, z -> superior; x = 0 midline,
   z = 0 about the renal hilum): body outline with subcutaneous fat and muscle wall (radial Fourier
   profiles varying smoothly in z), visceral fat, bowel loops with gas, lung bases, heart and diaphragm,
   liver, spleen, stomach, kidneys (cortex / medulla / sinus fat / pelvis, perirenal fat), 0-3 kidney
   tumours (inside, exophytic or seemingly detached), psoas and back muscles, aorta / IVC / iliacs,
   vertebrae (cancellous body, cortical shell, discs, canal, posterior arch), ribs, iliac wings,
   bladder. Organs are ellipsoids deformed by smooth random fields (cubic B-splines through random
   control values on a coarse grid, evaluated separably), painted in a fixed priority order.
2. Acquisition: pixel spacing, patient roll, table shift, slice thickness and spacing, z-extent,
   noise ~ 1/sqrt(thickness), vendor HU offset/gain, beam-hardening streaks, storage dtype.
   Partial volume: each slice averages K sub-slices spread over its thickness (box slice profile);
   the label is the one of the central sub-slice (K odd). In-plane blur (PSF) also correlates the noise.

Volumes come back canonical: array (z, y, x), direction identity, z inferior -> superior.
"""
from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from threadpoolctl import threadpool_limits

from ctseg.datasets.base import Case
from ctseg.errors import CtsegError
from ctseg.io import Volume

log = logging.getLogger(__name__)

CLASSES = {"kidney": {0: "background", 1: "kidney", 2: "tumour"}, "liver": {0: "background", 1: "liver"}}
LAYOUTS = ("kits19", "chaos", "nnunet")
SIZES = {"full": 512, "small": 128}


#: The values each population shift can take (inclusive); the identity is 1, or 0 for phase.
POPULATION_RANGES = {"habitus": (1.0, 3.0), "fov": (0.3, 3.0), "kidney_size": (0.3, 3.0), "tumour_size": (0.1, 5.0),
                     "phase": (0.0, 1.0), "kernel": (1.0, 8.0)}


@dataclass(frozen=True)
class Population:
    """A shift of the phantom's patient and scanner population (`generate_case(population=...)`; identity =
    the training population). Applied after every random draw, so a seed keeps its anatomy, acquisition and
    noise pattern and only the shifted property changes (the counterfactual of one population difference).

    habitus      > 1: a heavier patient: (habitus - 1) x the body half-width of extra subcutaneous fat all
                 round; organs keep their size, the scanner's field of view grows with the body (as drawn)
    fov          x the drawn pixel spacing (the field of view): < 1 cuts the body, > 1 adds air, coarser pixels
    kidney_size  x both kidneys' radii
    tumour_size  x every tumour's diameter (at most 100 mm)
    phase        0 = the drawn (enhanced) phase, 1 = unenhanced: organ, vessel and tumour HU blended toward
                 non-contrast values (kidney ~35 HU, close to muscle)
    kernel       >= 1: a sharper reconstruction kernel: in-plane PSF sigma / kernel, noise std x sqrt(kernel)
    """

    habitus: float = 1.0
    fov: float = 1.0
    kidney_size: float = 1.0
    tumour_size: float = 1.0
    phase: float = 0.0
    kernel: float = 1.0

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k):g}" for k, (lo, hi) in POPULATION_RANGES.items()
               if not lo <= getattr(self, k) <= hi]
        if bad:
            ranges = ", ".join(f"{k} {lo:g}-{hi:g}" for k, (lo, hi) in POPULATION_RANGES.items())
            raise CtsegError(f"population shift out of range: {', '.join(bad)} ({ranges})")

    @classmethod
    def of(cls, value: "Population | dict | None") -> "Population":
        if value is None or isinstance(value, Population):
            return value or cls()
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise CtsegError(f"unknown population shift(s) {unknown}; choose from {list(cls.__dataclass_fields__)}")
        return cls(**{k: float(v) for k, v in value.items()})


#: HU of the unenhanced phase (`Population.phase` = 1), literature means for non-contrast CT.
_UNENHANCED_HU = {"liver": 58.0, "spleen": 48.0, "cortex": 35.0, "medulla": 32.0, "aorta": 45.0, "ivc": 45.0,
                  "heart": 45.0, "tumour": 38.0}
_F32 = np.float32
_T = TypeVar("_T")


def _built(value: _T | None, what: str) -> _T:
    """A part of the anatomy that is set in a later step than its object is made (RuntimeError if not yet)."""
    if value is None:
        raise RuntimeError(f"phantom: {what} is used before it is set")
    return value


# ------------------------------------------------------------------------------------------ smooth fields


def _bspline_matrix(t: np.ndarray, n: int) -> np.ndarray:
    """(len(t), n) cubic B-spline weights; t in control units of the inner points 0..n-3 (1 pad each side)."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, n - 3 - 1e-6) + 1.0
    i = np.floor(t).astype(np.int64)
    f = t - i
    w = np.stack([(1 - f) ** 3, 3 * f ** 3 - 6 * f ** 2 + 4, -3 * f ** 3 + 3 * f ** 2 + 3 * f + 1, f ** 3], 1) / 6
    out = np.zeros((len(t), n), dtype=_F32)
    out[np.arange(len(t))[:, None], i[:, None] + np.arange(-1, 3)] = w
    return out


@dataclass
class _Field:
    """C smooth random fields (about unit std) over a box of (patient z, scanner y, scanner x) mm."""

    lo: np.ndarray          # (3,) mm of the first inner control point
    step: np.ndarray        # (3,) control spacing mm
    ctrl: np.ndarray        # (C, nz, ny, nx) control values, padded by one on each side

    @classmethod
    def draw(cls, rng: np.random.Generator, lo, hi, step, channels: int = 1) -> "_Field":
        lo, hi, step = (np.asarray(v, dtype=np.float64) for v in (lo, hi, step))
        n = np.maximum(np.ceil((hi - lo) / step).astype(int) + 1, 2) + 2
        # 1 / 0.35: cubic B-spline smoothing of iid N(0, 1) control values leaves a std of about 0.35 in 3D
        return cls(lo, step, (rng.standard_normal((channels, *n)) / 0.35).astype(_F32))

    def sample(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Values on the grid z x y x x (1D coordinate arrays, mm): (C, len z, len y, len x) float32."""
        c = self.ctrl
        wz, wy, wx = (_bspline_matrix((v - self.lo[k]) / self.step[k], c.shape[k + 1]) for k, v in enumerate((z, y, x)))
        t = np.einsum("za,cabd->czbd", wz, c)
        t = np.ascontiguousarray(np.einsum("yb,czbd->czyd", wy, t))
        out = t.reshape(-1, t.shape[-1]) @ np.ascontiguousarray(wx.T)    # one BLAS call: the costly step
        return out.reshape(*t.shape[:-1], len(x))


@dataclass
class _Curve:
    """C smooth random functions of z (cubic B-spline), std about `scale`."""

    lo: float
    step: float
    ctrl: np.ndarray  # (n, C)

    @classmethod
    def draw(cls, rng: np.random.Generator, lo: float, hi: float, step: float, channels: int, scale) -> "_Curve":
        n = max(int(math.ceil((hi - lo) / step)) + 1, 2) + 2
        return cls(lo, step, (rng.standard_normal((n, channels)) * np.asarray(scale) / 0.68).astype(_F32))

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return _bspline_matrix((np.asarray(z) - self.lo) / self.step, len(self.ctrl)) @ self.ctrl


def _rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix (patient frame) from angles (rad) about z, then y, then x."""
    cz, sz, cy, sy, cx, sx = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


# ------------------------------------------------------------------------------------------ the grid


@dataclass
class _Grid:
    """In-plane scanner grid and its patient coordinates (roll + table shift)."""

    n: int                  # in-plane size (rows = columns)
    pixel: float            # mm
    xs: np.ndarray          # (n,) scanner x of the columns, mm
    ys: np.ndarray          # (n,) scanner y of the rows, mm
    X: np.ndarray           # (n, n) patient x of each pixel
    Y: np.ndarray           # (n, n) patient y
    rot: np.ndarray         # 2x2 patient -> scanner rotation
    shift: np.ndarray       # (2,) patient origin in scanner coordinates

    @classmethod
    def make(cls, n: int, pixel: float, centre: tuple[float, float], roll_deg: float, shift) -> "_Grid":
        coords = (np.arange(n) - (n - 1) / 2) * pixel
        xs, ys = coords + centre[0], coords + centre[1]
        a = math.radians(roll_deg)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        shift = np.asarray(shift, dtype=np.float64)
        sx, sy = np.meshgrid(xs - shift[0], ys - shift[1])
        X = (rot[0, 0] * sx + rot[1, 0] * sy).astype(_F32)   # rot.T @ (s - shift)
        Y = (rot[0, 1] * sx + rot[1, 1] * sy).astype(_F32)
        return cls(n, pixel, xs, ys, X, Y, rot, shift)

    def window_xy(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        corners = np.array([[x0, x0, x1, x1], [y0, y1, y0, y1]])
        s = self.rot @ corners + self.shift[:, None]
        i0, i1 = np.searchsorted(self.xs, s[0].min()), np.searchsorted(self.xs, s[0].max(), "right")
        j0, j1 = np.searchsorted(self.ys, s[1].min()), np.searchsorted(self.ys, s[1].max(), "right")
        if i1 <= i0 or j1 <= j0:
            return None
        return slice(j0, j1), slice(i0, i1)

    def scanner_box(self, box) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) in (patient z, scanner y, scanner x) of a patient box (x0, x1, y0, y1, z0, z1)."""
        x0, x1, y0, y1, z0, z1 = box
        s = self.rot @ np.array([[x0, x0, x1, x1], [y0, y1, y0, y1]]) + self.shift[:, None]
        return np.array([z0, s[1].min(), s[0].min()]), np.array([z1, s[1].max(), s[0].max()])


class _Block:
    """A run of fine sub-slices being painted: hu (nf, n, n) float32, tissue label uint8."""

    def __init__(self, grid: _Grid, z: np.ndarray, air: float):
        self.grid, self.z = grid, z.astype(_F32)
        self.hu = np.full((len(z), grid.n, grid.n), air, dtype=_F32)
        self.lab = np.zeros(self.hu.shape, dtype=np.uint8)
        self.inbody: np.ndarray | None = None      # inside the skin
        self.cavity: np.ndarray | None = None      # inside the muscle wall
        self.wall_depth: np.ndarray | None = None  # mm below the inner edge of the muscle wall (< 0 outside)

    def window(self, box) -> tuple[slice, slice, slice] | None:
        x0, x1, y0, y1, z0, z1 = box
        k0, k1 = np.searchsorted(self.z, z0), np.searchsorted(self.z, z1, "right")
        if k1 <= k0:
            return None
        xy = self.grid.window_xy(x0, x1, y0, y1)
        return None if xy is None else (slice(k0, k1), *xy)

    def coords(self, win) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient X (y, x), Y (y, x) and z (nz,) of a window."""
        sz, sy, sx = win
        return self.grid.X[sy, sx], self.grid.Y[sy, sx], self.z[sz]

    def field(self, f: _Field, win) -> np.ndarray:
        sz, sy, sx = win
        return f.sample(self.z[sz], self.grid.ys[sy], self.grid.xs[sx])

    def paint(self, win, mask: np.ndarray, value, label: int) -> None:
        """Set hu (scalar or window-shaped values) and label where mask (window-shaped) is true."""
        hu, lab = self.hu[win], self.lab[win]
        np.copyto(hu, value, where=mask)
        lab[mask] = label


# ------------------------------------------------------------------------------------------ anatomy

Painter = Callable[[_Block], None]


def _quadric(blk: _Block, win, centre, m: np.ndarray) -> list[np.ndarray]:
    """Normalised ellipsoid coordinates u_i = (m @ (p - centre))_i on a window, each (nz, ny, nx)."""
    X, Y, z = blk.coords(win)
    dx, dy, dz = X - _F32(centre[0]), Y - _F32(centre[1]), z - _F32(centre[2])
    return [(_F32(m[i, 0]) * dx + _F32(m[i, 1]) * dy)[None] + (_F32(m[i, 2]) * dz)[:, None, None] for i in range(3)]


def _radius(u: list[np.ndarray]) -> np.ndarray:
    return np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])


@dataclass
class _Blob:
    """A deformed ellipsoid of one tissue: inside where |u| < 1 + amp * field; optional smooth texture."""

    centre: np.ndarray
    radii: np.ndarray
    rot: np.ndarray
    hu: float
    label: int = 0
    amp: float = 0.1
    texture: float = 4.0           # HU std of the smooth texture
    clip: str | None = None        # "body", "cavity" (inside the muscle wall), "abdomen" / "thorax" (cavity
                                   # below / above the diaphragm)
    field: _Field | None = None
    diaphragm: "_Diaphragm | None" = None

    @property
    def m(self) -> np.ndarray:
        return np.diag(1.0 / self.radii) @ self.rot.T

    def box(self) -> tuple[float, ...]:
        r = np.abs(self.rot) @ self.radii * (1 + 3 * self.amp) + 2
        c = self.centre
        return (c[0] - r[0], c[0] + r[0], c[1] - r[1], c[1] + r[1], c[2] - r[2], c[2] + r[2])

    def attach_field(self, rng: np.random.Generator, grid: _Grid, step: float, channels: int = 2) -> "_Blob":
        lo, hi = grid.scanner_box(self.box())
        self.field = _Field.draw(rng, lo, hi, np.full(3, step), channels)
        return self

    def inside(self, blk: _Block, win, f: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        u = _quadric(blk, win, self.centre, self.m)
        q = _radius(u)
        inside = q < 1 + self.amp * f[0]
        if self.clip == "body":
            inside &= _built(blk.inbody, "the body mask")[win]
        elif self.clip is not None:
            inside &= _built(blk.cavity, "the cavity mask")[win]
            if self.clip == "abdomen":
                inside &= _built(self.diaphragm, "the diaphragm").below(blk, win)
            elif self.clip == "thorax":
                inside &= ~_built(self.diaphragm, "the diaphragm").below(blk, win)
        return inside, u, q

    def sample_field(self, blk: _Block, win: tuple[slice, slice, slice]) -> np.ndarray:
        """The blob's deformation/texture field on a window of `blk` (`attach_field` made it)."""
        return blk.field(_built(self.field, "a blob's field"), win)

    def __call__(self, blk: _Block) -> None:
        win = blk.window(self.box())
        if win is None:
            return
        f = self.sample_field(blk, win)
        inside, _, _ = self.inside(blk, win, f)
        blk.paint(win, inside, _F32(self.hu) + _F32(self.texture) * f[1], self.label)


@dataclass
class _Diaphragm:
    """Two domes: z_d(x, y) = max over domes of apex - quadratic fall-off, floored at `floor`."""

    domes: list[tuple[float, float, float, float, float]]   # (x, y, apex z, lateral radius, posterior radius)
    floor: float
    thickness: float
    z_map: np.ndarray | None = None   # (n, n) on the grid

    def build(self, grid: _Grid) -> None:
        z = np.full(grid.X.shape, self.floor, dtype=_F32)
        for x0, y0, apex, rl, rp in self.domes:
            dy = grid.Y - y0
            fall = (grid.X - x0) ** 2 / (2 * rl) + np.where(dy > 0, dy ** 2 / (2 * rp), dy ** 2 / (2 * rl))
            z = np.maximum(z, apex - fall)
        self.z_map = z.astype(_F32)

    @property
    def top(self) -> float:
        return max(d[2] for d in self.domes)

    def below(self, blk: _Block, win) -> np.ndarray:
        sz, sy, sx = win
        return blk.z[sz][:, None, None] < (self.heights()[sy, sx] - _F32(self.thickness))[None]

    def heights(self) -> np.ndarray:
        """`z_map` (`build` makes it)."""
        return _built(self.z_map, "the diaphragm height map")


@dataclass
class _Body:
    """Body outline, subcutaneous fat and muscle wall from radial Fourier profiles; visceral fat inside."""

    a: float                # lateral half-width mm
    b: float                # AP half-depth mm
    back: float             # y of the flattened back
    outline: _Curve         # 7 Fourier coefficients of the outline vs z
    fat: float              # mean subcutaneous fat thickness mm
    fat_profile: _Curve
    muscle: float
    hu_fat: float
    hu_muscle: float
    hu_visceral: float

    def prepare(self, grid: _Grid) -> None:
        th = np.arctan2(grid.Y, grid.X)
        self.rho = np.hypot(grid.X, grid.Y).astype(_F32)
        self.basis = np.stack([np.ones_like(th), np.cos(th), np.sin(th), np.cos(2 * th), np.sin(2 * th),
                               np.cos(3 * th), np.sin(3 * th)]).reshape(7, -1).astype(_F32)
        self.r_ell = (self.a * self.b / np.hypot(self.b * np.cos(th), self.a * np.sin(th))).astype(_F32)
        # anterior fat thicker, posterior thinner (sin th < 0 is anterior)
        self.fat_2d = (self.fat * (1 - 0.45 * np.sin(th))).astype(_F32)
        self.back_depth = (self.back - grid.Y).astype(_F32)

    def __call__(self, blk: _Block) -> None:
        nf, n = len(blk.z), blk.grid.n
        shape = (nf, n, n)
        r = (self.outline(blk.z) @ self.basis).reshape(shape)
        r += 1
        r *= self.r_ell
        depth = np.minimum(r - self.rho, self.back_depth)
        tf = (self.fat_profile(blk.z) @ self.basis).reshape(shape)
        tf += 1
        tf *= self.fat_2d
        blk.inbody = depth > 0
        np.copyto(blk.hu, _F32(self.hu_fat), where=blk.inbody)
        depth -= tf
        np.copyto(blk.hu, _F32(self.hu_muscle), where=depth > 0)
        depth -= _F32(self.muscle)
        blk.cavity = depth > 0
        np.copyto(blk.hu, _F32(self.hu_visceral), where=blk.cavity)
        blk.wall_depth = depth


@dataclass
class _Thorax:
    """Lung bases above the diaphragm (with texture) and the diaphragm muscle band."""

    diaphragm: _Diaphragm
    hu_lung: float
    hu_muscle: float
    field: _Field

    def __call__(self, blk: _Block) -> None:
        if blk.z[-1] < self.diaphragm.floor - self.diaphragm.thickness:
            return
        win = (slice(None), slice(None), slice(None))
        zd = self.diaphragm.heights()[None]
        z = blk.z[:, None, None]
        cavity = _built(blk.cavity, "the cavity mask")
        lung = cavity & (z >= zd)
        f = blk.field(self.field, win)[0]
        blk.paint(win, lung, _F32(self.hu_lung) + _F32(25) * f, 0)
        band = cavity & (z < zd) & (z >= zd - _F32(self.diaphragm.thickness))
        blk.paint(win, band, _F32(self.hu_muscle), 0)


@dataclass
class _Bowel:
    """Bowel loops in the abdominal cavity: enhancing wall, fluid or oral-contrast content, gas pockets."""

    field: _Field
    diaphragm: _Diaphragm
    box: tuple[float, ...]
    threshold: float
    hu_wall: float
    hu_content: float
    hu_contrast: float | None
    gas: float

    def __call__(self, blk: _Block) -> None:
        win = blk.window(self.box)
        if win is None:
            return
        f = blk.field(self.field, win)
        region = _built(blk.cavity, "the cavity mask")[win] & self.diaphragm.below(blk, win)
        loop = region & (f[0] > self.threshold)
        content = _F32(self.hu_content) + _F32(8) * f[1]
        if self.hu_contrast is not None:
            np.copyto(content, _F32(self.hu_contrast), where=f[1] > 0.8)
        blk.paint(win, loop, content, 0)
        blk.paint(win, loop & (f[0] < self.threshold + 0.15), _F32(self.hu_wall), 0)
        blk.paint(win, loop & (f[0] > self.threshold + 0.7) & (f[1] < -self.gas), _F32(-1000), 0)


@dataclass
class _Kidney:
    """Kidney: cortex shell, medullary pyramids, sinus fat and pelvis at the hilum; perirenal fat around."""

    blob: _Blob             # outline; blob.hu = cortex
    hu_medulla: float
    hu_pelvis: float
    hu_fat: float
    cortex_mm: float
    label: int

    def __call__(self, blk: _Block) -> None:
        b = self.blob
        fat_box = b.box()
        win = blk.window(fat_box)
        if win is None:
            return
        f = b.sample_field(blk, win)
        u = _quadric(blk, win, b.centre, b.m)
        q = _radius(u)
        outline = 1 + b.amp * f[0]
        cavity = _built(blk.cavity, "the cavity mask")[win]
        blk.paint(win, (q < 1.45 * outline) & cavity, _F32(self.hu_fat), 0)   # perirenal fat
        kidney = q < outline
        blk.paint(win, kidney, _F32(b.hu) + _F32(b.texture) * f[1], self.label)
        inner = q < outline - _F32(self.cortex_mm / b.radii.mean())
        blk.paint(win, inner & (f[2] > -0.5), _F32(self.hu_medulla) + _F32(b.texture) * f[1], self.label)
        # sinus: an ellipsoid at the medial side (local +u0) opening the hilum
        s = (u[0] - 0.8) ** 2 / 0.5 ** 2 + u[1] ** 2 / 0.4 ** 2 + u[2] ** 2 / 0.5 ** 2
        sinus = (s < 1) & (q < 1.3 * outline)
        blk.paint(win, sinus & kidney, _F32(self.hu_fat), 0)
        pelvis = (u[0] - 0.62) ** 2 / 0.32 ** 2 + u[1] ** 2 / 0.2 ** 2 + u[2] ** 2 / 0.28 ** 2 < 1
        blk.paint(win, pelvis, _F32(self.hu_pelvis), self.label)


@dataclass
class _Tumour:
    blob: _Blob
    necrosis: float         # HU drop in the necrotic core (0: none)
    info: dict              # kind, diameter, HU (for the case metadata)

    def __call__(self, blk: _Block) -> None:
        b = self.blob
        win = blk.window(b.box())
        if win is None:
            return
        f = b.sample_field(blk, win)
        inside, _, q = b.inside(blk, win, f)
        value = _F32(b.hu) + _F32(b.texture) * f[1]
        if self.necrosis:
            value -= _F32(self.necrosis) * np.clip(f[2], 0, 1) * (q < 0.6)
        blk.paint(win, inside, np.clip(value, 20, 130), b.label)


#: z (nz,) -> centre x, centre y, radius x, radius y of a tube's cross-section (arrays (nz,) or numbers)
TubePath = Callable[[np.ndarray], "tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike]"]


def _fixed_path(cx: float, cy: float, rx: float, ry: float) -> TubePath:
    """A straight tube of constant cross-section."""
    return lambda z: (cx, cy, rx, ry)


@dataclass
class _Tube:
    """A vessel or muscle: elliptic cross-section whose centre and radii are functions of z."""

    z0: float
    z1: float
    path: TubePath  # z -> cx, cy, rx, ry
    hu: float
    label: int = 0
    extent: tuple[float, float, float, float] = (0, 0, 0, 0)   # xy box
    clip: str | None = None    # "body" or "cavity"

    def __call__(self, blk: _Block) -> None:
        win = blk.window((*self.extent, self.z0, self.z1))
        if win is None:
            return
        X, Y, z = blk.coords(win)
        cx, cy, rx, ry = (np.broadcast_to(np.asarray(v, dtype=_F32), z.shape)[:, None, None] for v in self.path(z))
        inside = ((X[None] - cx) / rx) ** 2 + ((Y[None] - cy) / ry) ** 2 < 1
        if self.clip is not None:
            inside &= _built(blk.inbody if self.clip == "body" else blk.cavity, f"the {self.clip} mask")[win]
        blk.paint(win, inside, _F32(self.hu), self.label)


@dataclass
class _Spine:
    """Vertebrae along z: cancellous body with a cortical shell, discs, canal, posterior arch."""

    y: float                # y of the vertebral body centre
    rx: float
    ry: float
    period: float
    height: float
    phase: float
    hu_body: float
    hu_cortex: float
    hu_disc: float
    hu_csf: float
    hu_arch: float
    field: _Field | None = None   # trabecular texture

    def box(self) -> tuple[float, ...]:
        return (-70.0, 70.0, self.y - self.ry - 5, self.y + self.ry + 75, -1e4, 1e4)

    def __call__(self, blk: _Block) -> None:
        win = blk.window(self.box())
        if win is None:
            return
        X, Y, z = blk.coords(win)
        rel = np.mod(z - self.phase + self.period / 2, self.period) - self.period / 2    # mm from level centre
        in_body = np.abs(rel) < self.height / 2
        e = np.sqrt((X / self.rx) ** 2 + ((Y - self.y) / self.ry) ** 2)                  # 2D
        shell = 1.8 / min(self.rx, self.ry)
        body = (e < 1)[None]
        endplate = (np.abs(np.abs(rel) - self.height / 2) < 1.5)[:, None, None]
        cancellous = _F32(self.hu_body) + _F32(30) * blk.field(_built(self.field, "the spine's field"), win)[0]
        value = np.where(in_body[:, None, None], np.where((e > 1 - shell)[None] | endplate, _F32(self.hu_cortex),
                                                          cancellous), _F32(self.hu_disc))
        shape = (len(z), *X.shape)
        blk.paint(win, np.broadcast_to(body, shape), np.broadcast_to(value, shape), 0)
        cy = self.y + self.ry + 11.0
        rc = np.hypot(X, Y - cy)
        arch = (rc < 16) | ((np.abs(X) < 4) & (Y > cy) & (Y < cy + 45))
        transverse = (np.abs(Y - cy + 4) < 3.5) & (np.abs(X) < 45)
        arch_z = (np.abs(rel - 4) < self.height / 2 - 3)[:, None, None]
        transverse_z = (np.abs(rel - 2) < self.height / 4)[:, None, None]
        blk.paint(win, (arch_z & (arch & (rc >= 9.5))[None]) | (transverse_z & transverse[None]),
                  _F32(self.hu_arch), 0)
        blk.paint(win, np.broadcast_to((rc < 9.5)[None], shape), _F32(self.hu_csf), 0)


@dataclass
class _Ribs:
    """Ribs around the wall: cross-sections where a rib's sloping path crosses the slice."""

    ribs: list[tuple[float, float, float, float]]   # (side +1 left / -1 right, z at the back, drop mm, end angle)
    hu_marrow: float
    hu_cortex: float

    def prepare(self, grid: _Grid) -> None:
        phi = np.arctan2(np.abs(grid.X), grid.Y)                   # 0 at the spine, pi at the front
        self.windows = []                                           # per rib: rows, cols, path mask, rib z map
        for side, z_back, drop, end in self.ribs:
            on = (np.sign(grid.X) == side) & (phi > 0.45) & (phi < end)
            rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
            sy, sx = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
            zr = (z_back - drop * (phi[sy, sx] - 0.45) / (math.pi - 0.45)).astype(_F32)
            self.windows.append((sy, sx, on[sy, sx], zr))

    def __call__(self, blk: _Block) -> None:
        if blk.wall_depth is None:
            return
        for (side, z_back, drop, end), (sy, sx, on, zr) in zip(self.ribs, self.windows):
            k0, k1 = np.searchsorted(blk.z, z_back - drop - 8), np.searchsorted(blk.z, z_back + 8, "right")
            if k1 <= k0:
                continue
            win = (slice(k0, k1), sy, sx)
            d = blk.wall_depth[win] + _F32(8.0)                                  # mm from the rib centre line
            e = ((blk.z[k0:k1, None, None] - zr[None]) / _F32(5.0)) ** 2 + (d / _F32(3.5)) ** 2
            rib = on[None] & (e < 1)
            blk.paint(win, rib, np.where(e > 0.5, _F32(self.hu_cortex), _F32(self.hu_marrow)), 0)


@dataclass
class _Pelvis:
    """Iliac wings: curved cortical plates posterolateral below the iliac crest."""

    crest: float
    bottom: float
    x: float
    y: float
    hu_marrow: float
    hu_cortex: float

    def __call__(self, blk: _Block) -> None:
        win = blk.window((-self.x - 70, self.x + 70, self.y - 80, self.y + 60, self.bottom, self.crest))
        if win is None:
            return
        X, Y, z = blk.coords(win)
        t = np.clip((self.crest - z) / (self.crest - self.bottom), 0, 1)[:, None, None]
        for side in (-1, 1):
            cx = side * (self.x * (1 - 0.35 * t))
            r = np.hypot((X[None] - cx) / 55, (Y[None] - self.y) / 70)
            half = 0.07 + 0.05 * t
            plate = (np.abs(r - 1) < half) & (Y[None] < self.y + 35) & (side * X[None] > side * cx - 25)
            blk.paint(win, plate, np.where(np.abs(r - 1) > half - 0.03, _F32(self.hu_cortex),
                                           _F32(self.hu_marrow)), 0)


@dataclass
class _Stomach:
    """Stomach: enhancing wall, fluid (or oral contrast) content, gas in its anterior (non-dependent) part."""

    blob: _Blob             # blob.hu = wall
    hu_content: float
    gas_level: float        # fraction of the AP radius: gas where y < centre - gas_level * r_y

    def __call__(self, blk: _Block) -> None:
        b = self.blob
        win = blk.window(b.box())
        if win is None:
            return
        f = b.sample_field(blk, win)
        inside, _, q = b.inside(blk, win, f)
        blk.paint(win, inside, _F32(b.hu), 0)
        lumen = inside & (q < 1 + b.amp * f[0] - _F32(5.0 / b.radii.min()))
        blk.paint(win, lumen, _F32(self.hu_content) + _F32(5) * f[1], 0)
        _, Y, _ = blk.coords(win)
        blk.paint(win, lumen & (Y < b.centre[1] - self.gas_level * b.radii[1])[None], _F32(-1000), 0)


@dataclass
class _Table:
    """Patient table in scanner space (does not roll with the patient): foam pad and two thin plates."""

    top: float              # scanner y of the pad top (under the back)
    centre_x: float
    hu_pad: float
    hu_plate: float

    def prepare(self, grid: _Grid) -> None:
        x = grid.xs[None, :] - self.centre_x
        y = grid.ys[:, None] - (self.top + x ** 2 / 2500)
        lateral = np.abs(x) < 230
        self.pad = lateral & (y > 0) & (y < 18)
        self.plate = lateral & (((y > 24) & (y < 27)) | ((y > 44) & (y < 47)))

    def __call__(self, blk: _Block) -> None:
        full = (slice(None), slice(None), slice(None))
        shape = blk.hu.shape
        blk.paint(full, np.broadcast_to(self.pad, shape), _F32(self.hu_pad), 0)
        blk.paint(full, np.broadcast_to(self.plate, shape), _F32(self.hu_plate), 0)


@dataclass
class _Inhomogeneity:
    """Mild low-frequency HU drift inside the body."""

    field: _Field
    amplitude: float

    def __call__(self, blk: _Block) -> None:
        full = (slice(None), slice(None), slice(None))
        drift = blk.field(self.field, full)[0]
        drift *= _F32(self.amplitude)
        drift *= _built(blk.inbody, "the body mask")
        blk.hu += drift


@dataclass
class _Anatomy:
    painters: list[Painter]
    regions: dict[str, tuple[float, float]]   # name -> (z low, z high) patient mm
    spine_xy: tuple[float, float]
    tumours: list[dict] = field(default_factory=list)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _kidney_rotation(side: int, yaw: float, pitch: float) -> np.ndarray:
    """Columns: local axis 0 toward the hilum (antero-medial), 1, 2 = long axis (upper pole tilted medially)."""
    e0 = np.array([-side * math.cos(yaw), -math.sin(yaw), 0.0])
    e2 = np.array([-side * math.sin(pitch), 0.1, math.cos(pitch)])
    e2 -= e2 @ e0 * e0
    e2 /= np.linalg.norm(e2)
    return np.stack([e0, np.cross(e2, e0), e2], axis=1)


def _draw_anatomy(rng: np.random.Generator, task: str, grid: _Grid, body: _Body, sz: float,
                  pop: Population = Population(), organ_ref_mm: float | None = None) -> _Anatomy:
    """Every organ of one case (patient frame, mm) on `grid`; `sz` scales lengths along z; organs scale with
    `organ_ref_mm` (the body half-width as drawn, before a habitus shift; default body.a)."""
    labels = {"kidney": 1 if task == "kidney" else 0, "tumour": 2 if task == "kidney" else 0,
              "liver": 1 if task == "liver" else 0}
    fat, muscle = body.hu_fat, body.hu_muscle
    W = body.a - body.fat - body.muscle                                   # inner half-width
    y_ant = -(body.b - 1.45 * body.fat - body.muscle)
    y_post = body.back - 0.55 * body.fat - body.muscle
    yc, D = (y_ant + y_post) / 2, (y_post - y_ant) / 2
    s = (organ_ref_mm or body.a) / 165.0

    # landmarks
    z_dome_r = _u(rng, 110, 150) * sz
    z_dome_l = z_dome_r - _u(rng, 5, 25) * sz
    dia = _Diaphragm([(-0.4 * W, yc, z_dome_r, 80 * s, 50 * s), (0.4 * W, yc, z_dome_l, 80 * s, 50 * s)],
                     floor=z_dome_r - 115 * sz, thickness=4.0)
    dia.build(grid)
    rv, ryv = _u(rng, 19, 23) * s, _u(rng, 14, 17) * s
    y_v = body.back - 0.55 * body.fat - _u(rng, 58, 66) * s
    z_bif = _u(rng, -120, -80) * sz
    crest = z_bif - _u(rng, 10, 30) * sz

    def blob(centre, radii, rot, hu, label=0, amp=0.1, texture=4.0, clip=None, step=25.0, channels=2):
        return _Blob(np.asarray(centre, float), np.asarray(radii, float), rot, hu, label, amp, texture, clip,
                     diaphragm=dia).attach_field(rng, grid, step, channels)

    hu = dict(lung=_u(rng, -900, -800), liver=_u(rng, 90, 120), spleen=_u(rng, 100, 130),
              cortex=_u(rng, 150, 220), medulla=_u(rng, 80, 140), pelvis=_u(rng, 0, 20), aorta=_u(rng, 150, 250),
              ivc=_u(rng, 100, 160), vb=_u(rng, 200, 350), cortical=_u(rng, 700, 1200), heart=_u(rng, 110, 170))
    for organ, plain in _UNENHANCED_HU.items():
        if organ in hu:
            hu[organ] += pop.phase * (plain - hu[organ])
    painters: list[Painter] = []
    table = _Table(top=grid.shift[1] + body.back + _u(rng, 2, 25), centre_x=grid.shift[0],
                   hu_pad=_u(rng, -950, -850), hu_plate=_u(rng, 150, 400))
    table.prepare(grid)
    body.prepare(grid)
    painters += [table, body]
    z_all = (-600.0, 600.0)
    body_box = (-body.a - 20, body.a + 20, -body.b - 20, body.b + 20, *z_all)
    lo, hi = grid.scanner_box(body_box)
    painters.append(_Thorax(dia, hu["lung"], muscle, _Field.draw(rng, lo, hi, np.full(3, 15.0))))
    painters.append(blob((0.15 * W, yc - 0.25 * D, z_dome_r + 60 * sz), (0.45 * W, 0.5 * D, 65 * sz),
                         _rotation(0.5), hu["heart"], clip="thorax", texture=8))
    contrast = _u(rng, 150, 300) if rng.random() < 0.25 else None
    painters.append(_Bowel(_Field.draw(rng, lo, hi, np.full(3, 17.0), 2), dia, body_box, _u(rng, -0.6, 0.1),
                           _u(rng, 40, 70), _u(rng, 5, 35), contrast, _u(rng, 0.2, 0.9)))
    painters.append(blob((0, yc - 0.35 * D, crest - 140 * sz), (50 * s, 40 * s, 40 * sz), np.eye(3),
                         _u(rng, 0, 20), clip="cavity", texture=2))                                  # bladder
    stomach = blob((0.35 * W, yc - 0.35 * D, z_dome_l - 55 * sz), (0.33 * W, 0.4 * D, 50 * sz),
                   _rotation(_u(rng, -0.4, 0.4)), _u(rng, 40, 70), clip="abdomen", amp=0.15)
    painters.append(_Stomach(stomach, contrast if contrast is not None else _u(rng, 0, 25), _u(rng, 0.0, 0.5)))

    # liver (two lobes) and its lesions
    liver_lobes = [
        blob((-0.42 * W, yc - 0.05 * D, z_dome_r - 80 * sz), (0.6 * W, 0.85 * D, 90 * sz), _rotation(_u(rng, -.2, .2)),
             hu["liver"], labels["liver"], amp=0.12, clip="abdomen", step=30),
        blob((0.12 * W, yc - 0.5 * D, z_dome_r - 55 * sz), (0.45 * W, 0.35 * D, 50 * sz),
             _rotation(_u(rng, -.3, .1)), hu["liver"], labels["liver"], amp=0.15, clip="abdomen", step=25),
    ]
    painters += liver_lobes
    right = liver_lobes[0]
    for _ in range(int(rng.integers(0, 4)) if task == "liver" else 0):
        c = right.centre + right.rot @ (right.radii * rng.uniform(-0.5, 0.5, 3))
        painters.append(blob(c, np.full(3, _u(rng, 5, 25)), np.eye(3), _u(rng, 20, 70), labels["liver"],
                             amp=0.15, texture=6, clip="abdomen", step=8))
    painters.append(blob((0.72 * W, yc + 0.45 * D, z_dome_l - 65 * sz), (22 * s, 50 * s, 50 * sz),
                         _rotation(_u(rng, 0.4, 0.8)), hu["spleen"], amp=0.12, clip="abdomen"))

    # kidneys and tumours
    z_r = _u(rng, -25, -5) * sz
    kidneys = []
    for side, zk in ((-1, z_r), (1, z_r + _u(rng, 5, 25) * sz)):
        radii = np.array([_u(rng, 24, 30), _u(rng, 22, 27), _u(rng, 48, 60)]) * _u(rng, 0.9, 1.1) * s
        radii *= pop.kidney_size
        radii[2] *= sz / s
        centre = (side * _u(rng, 58, 72) * s, y_v + _u(rng, -8, 6) * s, zk)
        b = blob(centre, radii, _kidney_rotation(side, _u(rng, 0.4, 0.8), _u(rng, 0.1, 0.3)), hu["cortex"],
                 labels["kidney"], amp=0.06, texture=5, step=20, channels=3)
        kidneys.append(_Kidney(b, hu["medulla"], hu["pelvis"], fat, _u(rng, 5, 8), labels["kidney"]))
    painters += kidneys
    tumours = []
    for _ in range(int(rng.choice(4, p=[0.1, 0.6, 0.2, 0.1]))):
        k = kidneys[int(rng.integers(2))].blob
        d = min(float(np.exp(rng.uniform(np.log(5), np.log(70)))) * pop.tumour_size, 100.0)
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        surface = k.centre + k.rot @ (k.radii * v)
        normal = k.rot @ (v / k.radii)
        normal /= np.linalg.norm(normal)
        kind = str(rng.choice(["inside", "exophytic", "detached"], p=[0.4, 0.45, 0.15]))
        offset = {"inside": -(d / 2 + _u(rng, 1, 6)), "exophytic": _u(rng, -0.4, 0.4) * d / 2,
                  "detached": d / 2 + _u(rng, 0.5, 3)}[kind]
        hu_t = _u(rng, 30, 120)
        tb = blob(surface + offset * normal, d / 2 * rng.uniform(0.85, 1.15, 3), _rotation(*rng.uniform(-3, 3, 3)),
                  hu_t + pop.phase * (_UNENHANCED_HU["tumour"] - hu_t), labels["tumour"], amp=0.12, texture=_u(rng, 6, 18), step=max(d / 3, 4),
                  channels=3)
        tumours.append(_Tumour(tb, _u(rng, 20, 60) if d > 30 else 0.0,
                               {"kind": kind, "diameter_mm": round(d, 1), "hu": round(tb.hu, 1)}))
    painters += tumours

    # muscles, vessels
    z_psoas = max(k.blob.centre[2] for k in kidneys) + 30 * sz

    def psoas_path(side):
        def path(z):
            r = 24 * s * np.clip((z_psoas - z) / (140 * sz), 0.15, 1.0)
            below = np.maximum(crest - z, 0)
            return side * (rv + r + 2 + 0.25 * below), y_v + 2 - 0.3 * below, r, r * 0.85
        return path

    for side in (-1, 1):
        painters.append(_Tube(-1e4, z_psoas, psoas_path(side), muscle + _u(rng, -5, 5),
                              extent=(-0.9 * W, 0.9 * W, y_ant, y_post + 30)))
        painters.append(_Tube(-1e4, 1e4, _fixed_path(side * 34 * s, y_v + 44 * s, 27 * s, 20 * s),
                              muscle, extent=(-80 * s, 80 * s, y_v, y_v + 70 * s), clip="body"))
    ra = _u(rng, 9, 13)
    ya = y_v - ryv - ra - 3
    xa = _u(rng, 4, 14)
    painters.append(_Tube(z_bif, 1e4, _fixed_path(xa, ya, ra, ra), hu["aorta"], extent=(xa - 20, xa + 20, ya - 20, ya + 20)))

    def iliac_path(side: int) -> TubePath:
        return lambda z: (xa + side * 0.55 * (z_bif - z), ya - 0.25 * (z_bif - z), 0.65 * ra, 0.65 * ra)

    for side in (-1, 1):
        painters.append(_Tube(-1e4, z_bif, iliac_path(side), hu["aorta"],
                              extent=(-0.9 * W, 0.9 * W, y_ant, y_post), clip="cavity"))
    xi, yi = -(rv + _u(rng, 5, 12)), y_v - ryv - 8
    painters.append(_Tube(z_bif - 10, z_dome_r, _fixed_path(xi, yi, 13 * s, 9 * s), hu["ivc"],
                          extent=(xi - 25, xi + 25, yi - 25, yi + 25)))

    # bones
    spine = _Spine(y_v, rv, ryv, 36 * sz, 27 * sz, _u(rng, 0, 36), hu["vb"], hu["cortical"],
                   _u(rng, 70, 100), _u(rng, 5, 25), _u(rng, 400, 700))
    spine.field = _Field.draw(rng, *grid.scanner_box((*spine.box()[:4], *z_all)), np.full(3, 5.0))
    painters.append(spine)
    z12 = max(k.blob.centre[2] for k in kidneys) + _u(rng, 25, 45) * sz
    ribs = _Ribs([(side, z12 + i * 24 * sz, (100 + 10 * i) * sz, (1.7, 2.0)[i] if i < 2 else 2.6)
                  for side in (-1, 1) for i in range(9)], _u(rng, 200, 350), hu["cortical"])
    ribs.prepare(grid)
    painters.append(ribs)
    painters.append(_Pelvis(crest, crest - 130 * sz, 0.7 * W, y_v - 10, hu["vb"], hu["cortical"]))
    painters.append(_Inhomogeneity(_Field.draw(rng, lo, hi, np.full(3, 90.0)), _u(rng, 2, 6)))

    kz = [(k.blob.centre[2] - k.blob.radii[2], k.blob.centre[2] + k.blob.radii[2]) for k in kidneys]
    regions = {
        "kidneys": (min(z for z, _ in kz), max(z for _, z in kz)),
        "liver": (right.centre[2] - right.radii[2], z_dome_r),
        "abdomen": (crest - _u(rng, 0, 60) * sz, z_dome_r + _u(rng, 0, 30) * sz),
        "chest-pelvis": (crest - _u(rng, 120, 180) * sz, z_dome_r + _u(rng, 100, 180) * sz),
    }
    return _Anatomy(painters, regions, (0.0, y_v), [t.info for t in tumours])


# ------------------------------------------------------------------------------------------ acquisition


@dataclass
class Acquisition:
    """Per-case scanner settings (all drawn from the case's generator)."""

    size: int                    # in-plane pixels
    pixel_spacing: float         # mm
    slice_thickness: float       # mm
    slice_spacing: float         # mm
    num_slices: int
    z_first: float               # patient z of the lowest slice centre, mm
    region: str                  # kidneys | liver | abdomen | chest-pelvis
    roll_deg: float
    table_shift_mm: tuple[float, float]
    noise_sigma: float           # HU
    hu_offset: float
    hu_gain: float
    streaks: bool
    storage: str                 # int16 | float32
    fov_padding: float | None    # HU outside the reconstruction circle (-2048, -3024) or None
    subsamples: int              # K sub-slices over the slice thickness
    psf_sigma_px: float


#: Acquisition fields `generate_case(acquisition=...)` may override (no other draw depends on them).
REACQUIRABLE = ("noise_sigma", "hu_offset", "hu_gain", "psf_sigma_px")

_THICKNESSES = ((0.5, 0.625, 0.75, 1.0, 1.25), (1.5, 2.0, 2.5, 3.0), (3.0, 4.0, 5.0))
_REGIONS = {"kidney": ("kidneys", "abdomen", "chest-pelvis"), "liver": ("liver", "abdomen", "chest-pelvis")}


def _draw_z(rng: np.random.Generator, task: str, regions: dict, num_slices: int | None):
    """(region, thickness, spacing, n, z_first) at full size."""
    thickness = float(rng.choice(_THICKNESSES[int(rng.choice(3, p=[0.3, 0.35, 0.35]))]))
    spacing = thickness if rng.random() < 0.75 else max(0.4, round(thickness * float(rng.choice([0.5, 0.6, 0.8])), 2))
    region = str(rng.choice(_REGIONS[task], p=[0.35, 0.45, 0.2]))
    lo, hi = regions[region]
    if region in ("kidneys", "liver"):
        lo, hi = lo - _u(rng, 5, 40), hi + _u(rng, 5, 40)
    centre = (lo + hi) / 2
    n = int((hi - lo) // spacing) + 1
    if num_slices is not None:
        n = num_slices
    n = int(np.clip(n, 20, 600)) if num_slices is None else n
    return region, thickness, spacing, n, centre - (n - 1) * spacing / 2


def _draw_acquisition(rng: np.random.Generator, size: str, body: _Body, in_plane: int | None) -> Acquisition:
    """The in-plane part of the acquisition and the noise/calibration draws (z is set by `_finish_z`)."""
    pixel_full = float(np.clip(2 * body.a * _u(rng, 1.0, 1.35) / 512, 0.6, 1.0))
    n = in_plane or SIZES[size]
    roll = float(np.clip(rng.normal(0, 4), -10, 10))
    shift = (_u(rng, -25, 25), _u(rng, -40, 20))
    noise_ref = _u(rng, 9, 20)
    acq = Acquisition(size=n, pixel_spacing=round(pixel_full * 512 / n, 4), slice_thickness=0.0, slice_spacing=0.0,
                      num_slices=0, z_first=0.0, region="", roll_deg=round(roll, 2),
                      table_shift_mm=(round(shift[0], 1), round(shift[1], 1)), noise_sigma=noise_ref,
                      hu_offset=round(_u(rng, -20, 20), 1), hu_gain=round(_u(rng, -0.05, 0.05), 4),
                      streaks=bool(rng.random() < 0.3), storage="int16" if rng.random() < 0.7 else "float32",
                      fov_padding=float(rng.choice([-2048.0, -3024.0])) if rng.random() < 0.15 else None,
                      subsamples=1, psf_sigma_px=round(_u(rng, 0.5, 0.8) * max(0.5, min(1.0, n / 512)), 3))
    return acq


def _finish_z(acq: Acquisition, rng: np.random.Generator, task: str, size: str, regions: dict,
              num_slices: int | None, thickness_mm: float | None) -> None:
    region, thickness, spacing, n, z_first = _draw_z(rng, task, regions, None if size == "small" else num_slices)
    acq.noise_sigma = round(float(np.clip(acq.noise_sigma * math.sqrt(2.5 / thickness), 5, 35)), 2)
    if thickness_mm is not None:
        # explicit slice thickness: noise follows it (full-size equivalent for small), extent kept
        equivalent = thickness_mm / (4 if size == "small" else 1)
        acq.noise_sigma = round(float(np.clip(acq.noise_sigma * math.sqrt(thickness / equivalent), 5, 35)), 2)
        centre, extent = z_first + (n - 1) * spacing / 2, (n - 1) * spacing
        thickness = spacing = float(thickness_mm)
        n = num_slices if num_slices is not None else max(int(extent // spacing) + 1, 2)
        z_first = centre - (n - 1) * spacing / 2
    elif size == "small":
        # the full-size geometry coarsened: in-plane x4, along z by up to 4 while keeping >= 16 slices
        factor = float(np.clip((n - 1) / 15, 1, 4))
        extent = (n - 1) * spacing
        thickness, spacing = round(thickness * factor, 3), round(spacing * factor, 3)
        centre = z_first + extent / 2
        n = num_slices if num_slices is not None else int(round(extent / spacing)) + 1
        z_first = centre - (n - 1) * spacing / 2
    acq.region, acq.slice_thickness, acq.slice_spacing, acq.num_slices = region, thickness, spacing, n
    acq.z_first = round(float(z_first), 3)
    acq.subsamples = 1 if thickness < 1.5 else 3 if thickness < 4 else 5


def _streak_pattern(rng: np.random.Generator, grid: _Grid, centre: tuple[float, float]) -> np.ndarray:
    """(n, n) HU: thin dark (and some bright) lines through the spine, fading with distance."""
    sx = grid.rot @ np.asarray(centre) + grid.shift
    xx, yy = np.meshgrid(grid.xs - sx[0], grid.ys - sx[1])
    out = np.zeros(xx.shape, dtype=_F32)
    for _ in range(int(rng.integers(3, 8))):
        a = _u(rng, -0.45, 0.45) + (math.pi if rng.random() < 0.5 else 0)
        perp = -math.sin(a) * xx + math.cos(a) * yy
        along = math.cos(a) * xx + math.sin(a) * yy
        amp = _u(rng, 20, 60) * (-1 if rng.random() < 0.75 else 0.6)
        width = _u(rng, 1.0, 2.5) * grid.pixel
        out += (amp * np.exp(-0.5 * (perp / width) ** 2) * np.exp(-np.abs(along) / 160.0)).astype(_F32)
    return out


def _noise_gain(sigma_px: float) -> float:
    """Std of white unit noise after the in-plane Gaussian blur of `sigma_px` (exact, discrete kernel)."""
    impulse = np.zeros(41)
    impulse[20] = 1
    w = ndimage.gaussian_filter1d(impulse, sigma_px)
    return float((w ** 2).sum())


def _render(anatomy: _Anatomy, acq: Acquisition, grid: _Grid, noise_seed: int, streaks: np.ndarray | None,
            streak_curve: _Curve | None, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (z, y, x) in HU (float32, before storage rounding) and label (uint8)."""
    n, k = grid.n, acq.subsamples
    z_out = acq.z_first + acq.slice_spacing * np.arange(acq.num_slices)
    offsets = (np.arange(k) - (k - 1) / 2) * acq.slice_thickness / k
    image = np.empty((acq.num_slices, n, n), dtype=_F32)
    label = np.empty((acq.num_slices, n, n), dtype=np.uint8)
    per_block = max(1, 8 // k)
    gain = _noise_gain(acq.psf_sigma_px)
    white = acq.noise_sigma / gain
    yy, xx = np.meshgrid(grid.ys, grid.xs, indexing="ij")
    outside_fov = (np.hypot(yy, xx) > n * grid.pixel / 2) if acq.fov_padding is not None else None
    amp = np.clip(_built(streak_curve, "the streak curve")(z_out)[:, 0], 0, None) if streaks is not None else None

    def block(i0: int) -> None:
        i1 = min(i0 + per_block, acq.num_slices)
        z_fine = (z_out[i0:i1, None] + offsets[None]).reshape(-1)
        blk = _Block(grid, z_fine, air=-1000.0)
        for paint in anatomy.painters:
            paint(blk)
        hu = blk.hu.reshape(i1 - i0, k, n, n).mean(axis=1)
        label[i0:i1] = blk.lab.reshape(i1 - i0, k, n, n)[:, k // 2]
        hu *= _F32(1 + acq.hu_gain)
        hu += _F32(acq.hu_offset)
        if amp is not None and streaks is not None:  # both or neither
            hu += amp[i0:i1, None, None] * streaks[None]
        rng = np.random.default_rng([noise_seed, i0])
        hu += rng.standard_normal(hu.shape, dtype=_F32) * _F32(white)
        ndimage.gaussian_filter(hu, (0, acq.psf_sigma_px, acq.psf_sigma_px), output=hu, truncate=3.0)
        np.clip(hu, -1024, 3071, out=hu)
        if outside_fov is not None:
            hu[:, outside_fov] = acq.fov_padding
        image[i0:i1] = hu

    starts = range(0, acq.num_slices, per_block)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(block, starts))
    else:
        for i0 in starts:
            block(i0)
    return image, label


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


# ------------------------------------------------------------------------------------------ datasets


def to_kits19_orientation(volume: Volume) -> Volume:
    """A canonical volume in KiTS19's voxel order: NIfTI axis 0 = slices going inferior, then posterior, left.

    Same voxels and physical positions; readers must reorient (`ctseg.io.to_canonical`) to get back.
    """
    nz = volume.shape[0]
    sz, sy, sx = volume.spacing
    direction = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])   # columns: ITK axes i, j, k
    origin = np.asarray(volume.origin) + volume.direction @ np.array([0.0, 0.0, (nz - 1) * sz])
    array = np.ascontiguousarray(volume.array[::-1].transpose(2, 1, 0))
    return Volume(array, (sx, sy, sz), tuple(origin), direction, volume.slice_thickness, dict(volume.meta))


def case_names(layout: str, n_cases: int) -> list[str]:
    """Case ids as each layout names them: case_00000 (KiTS19), 1, 2, ... (CHAOS), phantom_000 (nnU-Net)."""
    if layout == "kits19":
        return [f"case_{i:05d}" for i in range(n_cases)]
    if layout == "chaos":
        return [str(i + 1) for i in range(n_cases)]
    return [f"phantom_{i:03d}" for i in range(n_cases)]


def iter_phantom_cases(task: str = "kidney", n_cases: int = 10, seed: int = 0, size: str = "small",
                       layout: str = "kits19", **overrides) -> Iterator[Case]:
    """The cases `write_phantom_dataset` writes, in memory (case i from SeedSequence([seed, i]))."""
    for i, name in enumerate(case_names(layout, n_cases)):
        yield generate_case(np.random.SeedSequence([seed, i]), task=task, size=size, case_id=name, **overrides)


def write_phantom_dataset(out: str | Path, task: str = "kidney", n_cases: int = 10, layout: str | None = None,
                          seed: int = 0, size: str = "small", on_case: Callable[[Case], None] | None = None,
                          **overrides) -> Path:
    """Write `n_cases` phantom cases in a dataset layout; returns `out`.

    layout: "kits19" (default for kidney; `case_XXXXX/imaging.nii.gz` + `segmentation.nii.gz` in KiTS19's
    own slice-first, inferior-posterior-left orientation), "chaos" (default for liver; one DICOM file per
    slice, each its own SeriesInstanceUID, + `Ground/liver_GT_NNN.png`) or "nnunet" (`dataset.json`,
    `imagesTr/<case>_0000.nii.gz`, `labelsTr/<case>.nii.gz`). Also writes `phantom.json` (per-case
    acquisition and anatomy). Deterministic per `seed`. `on_case` is called after each case is written.
    """
    from ctseg.fileutil import atomic_write_text
    from ctseg.datasets.chaos import write_chaos_case
    from ctseg.datasets.kits19 import write_kits19_case
    from ctseg.datasets.nnunet_raw import write_nnunet_case, write_nnunet_dataset_json

    layout = layout or ("kits19" if task == "kidney" else "chaos")
    if layout not in LAYOUTS:
        raise CtsegError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}", out)
    if task not in CLASSES:
        raise CtsegError(f"unknown phantom task {task!r}; choose one of {list(CLASSES)}", out)
    if layout == "chaos" and task != "liver":
        raise CtsegError("the CHAOS layout holds liver masks only: use --task liver (or another layout)", out)
    if n_cases < 1:
        raise CtsegError(f"n_cases must be >= 1, got {n_cases}", out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "nnunet":
        write_nnunet_dataset_json(out, CLASSES[task], n_cases, name=f"phantom_{task}")
    summary: dict[str, Any] = {"task": task, "layout": layout, "seed": seed, "size": size, "classes": CLASSES[task],
               "overrides": dict(overrides), "cases": {}}
    for case in iter_phantom_cases(task, n_cases, seed, size, layout, **overrides):
        if layout == "kits19":
            write_kits19_case(out, case.case_id, to_kits19_orientation(case.image),
                              to_kits19_orientation(_built(case.label, "the phantom label")))
        elif layout == "chaos":
            write_chaos_case(out, case.case_id, case.image, case.label)
        else:
            write_nnunet_case(out, case.case_id, case.image, case.label)
        summary["cases"][case.case_id] = {k: v for k, v in case.metadata.items()}
        log.info("phantom case %s written (%d slices)", case.case_id, case.metadata["num_slices"])
        if on_case is not None:
            on_case(case)
    atomic_write_text(out / "phantom.json", json.dumps(summary, indent=1, default=float))
    return out
