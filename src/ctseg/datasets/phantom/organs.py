"""The painters of the phantom's anatomy: deformed ellipsoids, body wall, tubes, bones; each paints HU and labels into a `_Block`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ctseg.datasets.phantom.fields import _F32, _Block, _built, _Curve, _Field, _Grid, _Window

Painter = Callable[[_Block], None]


def _quadric(blk: _Block, win: _Window, centre: NDArray[np.float64],
             m: NDArray[np.float64]) -> list[NDArray[np.float32]]:
    """Normalised ellipsoid coordinates u_i = (m @ (p - centre))_i on a window, each (nz, ny, nx)."""
    X, Y, z = blk.coords(win)
    dx, dy, dz = X - _F32(centre[0]), Y - _F32(centre[1]), z - _F32(centre[2])
    return [(_F32(m[i, 0]) * dx + _F32(m[i, 1]) * dy)[None] + (_F32(m[i, 2]) * dz)[:, None, None] for i in range(3)]


def _radius(u: list[NDArray[np.float32]]) -> NDArray[np.float32]:
    return np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])


class _Footprint(NamedTuple):
    """Where a blob lies on a block: its window, its field there (C, nz, ny, nx), its inside mask and radius |u|."""

    win: _Window
    field: NDArray[np.float32]
    inside: NDArray[np.bool_]
    q: NDArray[np.float32]


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

    def inside(self, blk: _Block, win: _Window, f: NDArray[np.float32]
               ) -> tuple[NDArray[np.bool_], list[NDArray[np.float32]], NDArray[np.float32]]:
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

    def sample_field(self, blk: _Block, win: _Window) -> NDArray[np.float32]:
        """The blob's deformation/texture field on a window of `blk` (`attach_field` made it)."""
        return blk.field(_built(self.field, "a blob's field"), win)

    def footprint(self, blk: _Block) -> _Footprint | None:
        """The blob's window on `blk`, its field and inside mask there (None when it misses the block)."""
        win = blk.window(self.box())
        if win is None:
            return None
        f = self.sample_field(blk, win)
        inside, _, q = self.inside(blk, win, f)
        return _Footprint(win, f, inside, q)

    def __call__(self, blk: _Block) -> None:
        fp = self.footprint(blk)
        if fp is not None:
            blk.paint(fp.win, fp.inside, _F32(self.hu) + _F32(self.texture) * fp.field[1], self.label)


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

    def below(self, blk: _Block, win: _Window) -> NDArray[np.bool_]:
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
        fp = b.footprint(blk)
        if fp is None:
            return
        value = _F32(b.hu) + _F32(b.texture) * fp.field[1]
        if self.necrosis:
            value -= _F32(self.necrosis) * np.clip(fp.field[2], 0, 1) * (fp.q < 0.6)
        blk.paint(fp.win, fp.inside, np.clip(value, 20, 130), b.label)


#: z (nz,) -> centre x, centre y, radius x, radius y of a tube's cross-section (arrays (nz,) or numbers)
TubePath = Callable[[NDArray[np.float32]], "tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike]"]


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
        fp = b.footprint(blk)
        if fp is None:
            return
        win, f = fp.win, fp.field
        blk.paint(win, fp.inside, _F32(b.hu), 0)
        lumen = fp.inside & (fp.q < 1 + b.amp * f[0] - _F32(5.0 / b.radii.min()))
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
