"""ctseg: robust deep-learning segmentation of CT volumes.

Implements Kloenne et al. 2020 (Sci Rep 10:10712): CT-specific preprocessing and augmentation,
nnU-Net-style U-Nets and MS-D Nets in 2D and 3D, slice-sorted cross-validation and a stacked
ensemble, plus whole-volume inference back in the input's geometry.
"""
import logging

from ctseg.errors import CtsegError

__version__ = "0.1.0"
__all__ = ["CtsegError", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
