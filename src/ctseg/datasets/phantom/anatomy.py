"""One case's anatomy: every organ drawn (patient frame, mm) from the case generator, in a fixed draw order."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ctseg.datasets.phantom.fields import _Field, _Grid, _rotation, _u
from ctseg.datasets.phantom.organs import (Painter, TubePath, _Blob, _Body, _Bowel, _Diaphragm, _fixed_path,
                                           _Inhomogeneity, _Kidney, _Pelvis, _Ribs, _Spine, _Stomach, _Table,
                                           _Thorax, _Tube, _Tumour)
from ctseg.datasets.phantom.population import _UNENHANCED_HU, Population


@dataclass
class _Anatomy:
    painters: list[Painter]
    regions: dict[str, tuple[float, float]]   # name -> (z low, z high) patient mm
    spine_xy: tuple[float, float]
    tumours: list[dict] = field(default_factory=list)



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

    def blob(centre: ArrayLike, radii: ArrayLike, rot: NDArray[np.float64], hu: float, label: int = 0,
             amp: float = 0.1, texture: float = 4.0, clip: str | None = None, step: float = 25.0,
             channels: int = 2) -> _Blob:
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

    def psoas_path(side: int) -> TubePath:
        def path(z: NDArray[np.float32]) -> tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike]:
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
