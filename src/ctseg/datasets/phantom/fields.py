"""Smooth random fields and curves (cubic B-splines), the scanner grid and the block of sub-slices painters draw into."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

_F32 = np.float32
_T = TypeVar("_T")
#: (z, y, x) slices of a `_Block`: a window of sub-slices, rows and columns
_Window = tuple[slice, slice, slice]
#: (x0, x1, y0, y1, z0, z1) patient mm
_Box = tuple[float, ...]


def _built(value: _T | None, what: str) -> _T:
    """A part of the anatomy that is set in a later step than its object is made (RuntimeError if not yet)."""
    if value is None:
        raise RuntimeError(f"phantom: {what} is used before it is set")
    return value



def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


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
    def draw(cls, rng: np.random.Generator, lo: ArrayLike, hi: ArrayLike, step: ArrayLike,
             channels: int = 1) -> "_Field":
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
    def draw(cls, rng: np.random.Generator, lo: float, hi: float, step: float, channels: int,
             scale: ArrayLike) -> "_Curve":
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
    def make(cls, n: int, pixel: float, centre: tuple[float, float], roll_deg: float,
             shift: tuple[float, float]) -> "_Grid":
        coords = (np.arange(n) - (n - 1) / 2) * pixel
        xs, ys = coords + centre[0], coords + centre[1]
        a = math.radians(roll_deg)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        shift_xy = np.asarray(shift, dtype=np.float64)
        sx, sy = np.meshgrid(xs - shift_xy[0], ys - shift_xy[1])
        X = (rot[0, 0] * sx + rot[1, 0] * sy).astype(_F32)   # rot.T @ (s - shift)
        Y = (rot[0, 1] * sx + rot[1, 1] * sy).astype(_F32)
        return cls(n, pixel, xs, ys, X, Y, rot, shift_xy)

    def window_xy(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        corners = np.array([[x0, x0, x1, x1], [y0, y1, y0, y1]])
        s = self.rot @ corners + self.shift[:, None]
        i0, i1 = np.searchsorted(self.xs, s[0].min()), np.searchsorted(self.xs, s[0].max(), "right")
        j0, j1 = np.searchsorted(self.ys, s[1].min()), np.searchsorted(self.ys, s[1].max(), "right")
        if i1 <= i0 or j1 <= j0:
            return None
        return slice(j0, j1), slice(i0, i1)

    def scanner_box(self, box: _Box) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
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

    def window(self, box: _Box) -> _Window | None:
        x0, x1, y0, y1, z0, z1 = box
        k0, k1 = np.searchsorted(self.z, z0), np.searchsorted(self.z, z1, "right")
        if k1 <= k0:
            return None
        xy = self.grid.window_xy(x0, x1, y0, y1)
        return None if xy is None else (slice(k0, k1), *xy)

    def coords(self, win: _Window) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
        """Patient X (y, x), Y (y, x) and z (nz,) of a window."""
        sz, sy, sx = win
        return self.grid.X[sy, sx], self.grid.Y[sy, sx], self.z[sz]

    def field(self, f: _Field, win: _Window) -> NDArray[np.float32]:
        sz, sy, sx = win
        return f.sample(self.z[sz], self.grid.ys[sy], self.grid.xs[sx])

    def paint(self, win: _Window, mask: NDArray[np.bool_], value: ArrayLike, label: int) -> None:
        """Set hu (scalar or window-shaped values) and label where mask (window-shaped) is true."""
        hu, lab = self.hu[win], self.lab[win]
        np.copyto(hu, value, where=mask)
        lab[mask] = label


