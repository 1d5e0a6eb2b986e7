"""Cross-validation (`run_cv`, `ctseg.cv.run`), scoring of its test volumes (`ctseg.cv.scoring`) and the stacked
ensemble over finished runs (`run_stack`, `ctseg.cv.stack`)."""
from ctseg.cv.run import RunIdentity, run_cv
from ctseg.cv.stack import run_stack

__all__ = ["RunIdentity", "run_cv", "run_stack"]
