"""femurrisk: pathologic fracture risk of the proximal femur from abdominopelvic CT.

Research demo. The shipped weights were trained on synthetic data only; the tool is not
for clinical use.

Conventions, stated once and kept everywhere in the package:

* World coordinates are NIfTI RAS+ in millimetres: +x towards the patient's right,
  +y anterior, +z superior (DICOM LPS is converted with x -> -x, y -> -y).
* Volumes are ``nibabel`` images whose array axes are (x, y, z) = (i, j, k) after
  :func:`femurrisk.preprocessing.to_canonical`, i.e. index i grows towards the
  patient's right, j anteriorly and k cranially.
* ``side`` is ``"left"`` or ``"right"`` in patient terms, never in screen terms.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
