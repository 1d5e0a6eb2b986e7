"""CT preprocessing: windowing + z-score (`windowing`), slice sampling and resizing (`slices`),
and the on-disk preprocessed cache (`cache`)."""
from ctseg.preprocess.cache import BuildReport, CachedCase, CaseCache, build_cache
from ctseg.preprocess.slices import (InPlaneResize, preprocess_label, preprocess_volume, resize_in_plane,
                                     restore_in_plane, sample_slices)
from ctseg.preprocess.windowing import IntensityPlan, estimate_intensity_plan, normalize

__all__ = ["BuildReport", "CachedCase", "CaseCache", "InPlaneResize", "IntensityPlan", "build_cache",
           "estimate_intensity_plan", "normalize", "preprocess_label", "preprocess_volume", "resize_in_plane",
           "restore_in_plane", "sample_slices"]
