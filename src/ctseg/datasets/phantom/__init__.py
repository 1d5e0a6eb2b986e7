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
from ctseg.datasets.phantom.acquisition import REACQUIRABLE, SIZES, Acquisition
from ctseg.datasets.phantom.generate import CLASSES, draw_acquisition, generate_case
from ctseg.datasets.phantom.population import POPULATION_RANGES, Population
from ctseg.datasets.kits19 import to_kits19_orientation
from ctseg.datasets.phantom.writers import case_names, iter_phantom_cases, writable_layouts, write_phantom_dataset

__all__ = ["CLASSES", "POPULATION_RANGES", "REACQUIRABLE", "SIZES", "Acquisition", "Population",
           "case_names", "draw_acquisition", "generate_case", "iter_phantom_cases", "to_kits19_orientation",
           "writable_layouts", "write_phantom_dataset"]
