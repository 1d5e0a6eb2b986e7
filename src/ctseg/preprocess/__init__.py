"""CT preprocessing: windowing + z-score (`windowing`), slice sampling and resizing (`slices`),
and the on-disk preprocessed cache (`cache`)."""
from ctseg.preprocess.cache import (BuildReport, CachedCase, CachedVolume, CaseCache, CaseIndex, SliceCache,
                                    TrainingCache, build_cache)
from ctseg.preprocess.slices import (InPlaneResize, preprocess_label, preprocess_volume, resize_in_plane,
                                     restore_in_plane, sample_slices)
from ctseg.preprocess.windowing import IntensityPlan, estimate_intensity_plan, normalize

__all__ = ["BuildReport", "CachedCase", "CachedVolume", "CaseCache", "CaseIndex", "InPlaneResize", "IntensityPlan",
           "SliceCache", "TrainingCache", "build_cache", "estimate_intensity_plan", "normalize", "preprocess_label", "preprocess_volume", "resize_in_plane",
           "restore_in_plane", "sample_slices"]
