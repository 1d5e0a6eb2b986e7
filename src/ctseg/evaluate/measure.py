"""Clinical measurements of segmented structures, in physical units.

Per structure (each non-zero class, plus "total" = union when there are two or more, see
`ctseg.evaluate.metrics.structures`) and per connected component (26-connectivity by default, so
that e.g. tumours are counted and measured one by one):

- volume_ml: voxel count x voxel volume (mm^3) / 1000;
- largest_axial_diameter_mm: maximum Feret diameter in an axial plane (the RECIST-style long axis),
  the largest over all axial slices; measured on the outer boundary (pixel corners) in mm, via the
  convex hull of each slice's boundary;
- centroid_lps_mm: centre of mass (x, y, z) in LPS mm;
- mean_hu / std_hu: intensity of the CT inside the structure (needs the image on the same grid);
- touches_border: the structure reaches the first or last index along an axis, so it may be cut off
  by the field of view and its volume / diameter are lower bounds.

The axial axis is found from the direction matrix (the array axis closest to the patient's S axis),
so measurements are correct in any storage orientation.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

from ctseg.errors import CtsegError
from ctseg.evaluate.metrics import structures
from ctseg.io import Volume


def max_feret_2d(mask: np.ndarray, spacing: tuple[float, float]) -> float:
    """Largest distance (mm) between two points of a 2D mask's outer boundary (pixel corners).

    mask: (rows, cols) bool; spacing: (row, col) mm. 0.0 for an empty mask.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0.0
    # the convex hull of a pixel set is that of the outer corners of each row's first and last pixel
    band = mask[rows]
    first = np.argmax(band, axis=1) - 0.5
    last = band.shape[1] - np.argmax(band[:, ::-1], axis=1) - 0.5
    r = rows.astype(np.float64)
    pts = np.concatenate([np.stack([r + dr, c], axis=1) for dr in (-0.5, 0.5) for c in (first, last)])
    pts *= np.asarray(spacing, dtype=np.float64)
    hull = pts[ConvexHull(pts).vertices]
    return float(pdist(hull).max())


def largest_axial_diameter(mask: np.ndarray, spacing: tuple[float, float, float], axis: int) -> float:
    """Max over axial slices (along array `axis`) of the slice's max Feret diameter in mm."""
    sa, sb = (s for i, s in enumerate(spacing) if i != axis)
    in_plane = (sa, sb)
    m = np.moveaxis(mask, axis, 0)
    best = 0.0
    for k in np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1)):
        best = max(best, max_feret_2d(m[k], in_plane))
    return best


def _bbox_of_values(label: np.ndarray, values: tuple[int, ...], slab: int = 16) -> tuple[slice, ...] | None:
    """Bounding box of the voxels holding any of `values` (None when there are none), found `slab`
    slices at a time: no mask of the whole volume (np.isin's temporaries are twice the label's size)."""
    hits = [np.zeros(n, dtype=bool) for n in label.shape]
    for z0 in range(0, label.shape[0], slab):
        m = np.isin(label[z0:z0 + slab], values)
        hits[0][z0:z0 + slab] = m.any(axis=(1, 2))
        hits[1] |= m.any(axis=(0, 2))
        hits[2] |= m.any(axis=(0, 1))
    if not hits[0].any():
        return None
    return tuple(slice(int(np.flatnonzero(h)[0]), int(np.flatnonzero(h)[-1]) + 1) for h in hits)


def _mean_std(values: np.ndarray, chunk: int = 1 << 22) -> tuple[float, float]:
    """Mean and (population) std of a 1D array in float64, 4 M values at a time (no float64 copy of it all)."""
    n = values.size
    mean = sum(float(values[i:i + chunk].sum(dtype=np.float64)) for i in range(0, n, chunk)) / n
    square = sum(float(np.square(values[i:i + chunk] - mean).sum()) for i in range(0, n, chunk))
    return mean, float(np.sqrt(square / n))


def _describe(mask: np.ndarray, offset: np.ndarray, label_vol: Volume, image: np.ndarray | None,
              axis: int) -> dict:
    """Measurements of one binary mask that sits at array index `offset` in the full volume."""
    spacing = label_vol.spacing
    n = int(np.count_nonzero(mask))
    # mean (z, y, x) array index from the per-axis projections: no (n, 3) index array for a large mask
    idx = np.array([np.dot(mask.sum(axis=tuple(a for a in range(3) if a != k), dtype=np.int64),
                           np.arange(mask.shape[k])) for k in range(3)]) / n + offset
    centroid = label_vol.affine_lps @ np.append(idx[::-1], 1.0)
    # mask is cropped to its bounding box: it touches the border iff the box does
    touches = any(o == 0 or o + s == n_axis for o, s, n_axis in zip(offset, mask.shape, label_vol.shape))
    out = {"voxels": n, "volume_ml": n * float(np.prod(spacing)) / 1000.0,
           "largest_axial_diameter_mm": largest_axial_diameter(mask, spacing, axis),
           "centroid_lps_mm": [float(v) for v in centroid[:3]], "touches_border": bool(touches)}
    if image is not None:
        sl = tuple(slice(o, o + s) for o, s in zip(offset, mask.shape))
        out["mean_hu"], out["std_hu"] = _mean_std(image[sl][mask])
    return out


def measure_structures(label_vol: Volume, image_vol: Volume | None, classes: dict[int, str],
                       connectivity: int = 3) -> dict[str, dict]:
    """Measure every structure of a label map (see module docstring).

    label_vol: integer label map; image_vol: the CT (HU) on the same grid, or None (no HU statistics).
    connectivity: 1 (6-), 2 (18-) or 3 (26-neighbourhood) for connected components.
    Returns {structure: {"labels", "present", "voxels", "volume_ml", "largest_axial_diameter_mm",
    "centroid_lps_mm", "touches_border", "mean_hu", "std_hu", "n_components", "components": [...]}}
    with components sorted by volume, largest first, each with the same measurements.
    """
    if image_vol is not None and not image_vol.same_geometry(label_vol):
        raise CtsegError(f"image {image_vol.shape} and label {label_vol.shape} are not on the same grid",
                         label_vol.meta.get("path"))
    image = image_vol.array if image_vol is not None else None
    axis = label_vol.slice_axis()
    struct = ndimage.generate_binary_structure(3, connectivity)
    result: dict[str, dict] = {}
    for name, values in structures(classes).items():
        box = _bbox_of_values(label_vol.array, values)
        if box is None:
            result[name] = {"labels": list(values), "present": False, "voxels": 0, "volume_ml": 0.0,
                            "n_components": 0, "components": []}
            continue
        mask = np.isin(label_vol.array[box], values)  # only the bounding box, not the whole volume
        offset = np.array([s.start for s in box])
        entry = {"labels": list(values), "present": True, **_describe(mask, offset, label_vol, image, axis)}
        cc, n_cc = ndimage.label(mask, structure=struct)
        comps = []
        for i, sl in enumerate(ndimage.find_objects(cc), start=1):
            comp = cc[sl] == i
            comps.append(_describe(comp, offset + np.array([s.start for s in sl]), label_vol, image, axis))
        comps.sort(key=lambda c: -c["voxels"])
        entry["n_components"] = int(n_cc)
        entry["components"] = comps
        result[name] = entry
    return result
