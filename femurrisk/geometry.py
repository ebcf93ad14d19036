"""Every geometric constant of the model, with the reason for each value.

The source study (Joo et al.) specifies only "32 consecutive axial slices starting at
the anterior inferior iliac spine (AIIS) going caudally, cropped per side". The values
below fill in what it leaves open. Changing any of them invalidates trained weights.
"""

# --- The classifier's crop -------------------------------------------------------------

#: Axial slices per crop, as in the study.
CROP_SLICES = 32

#: Spacing between those slices, mm. 32 x 3 mm = 96 mm reaches from the AIIS to about
#: the lesser trochanter in an adult, which covers head, neck and intertrochanteric
#: region, where proximal femoral metastases fracture.
CROP_SLICE_SPACING_MM = 3.0

#: In-plane pixel size of the crop, mm. 2 mm keeps cortical bone (3-6 mm thick at the
#: neck) at least one to three pixels wide while keeping the network small enough to
#: train on a CPU.
CROP_PIXEL_MM = 2.0

#: In-plane side of the square crop, pixels (64 x 2 mm = 128 mm). Wide enough for head,
#: neck and greater trochanter of a large adult femur with margin.
CROP_PIXELS = 64

#: The crop centre sits this far lateral of the femoral head centre, mm, so that the
#: field covers the acetabulum medially (about 44 mm of it) and the greater trochanter
#: laterally (about 84 mm of it); the trochanter lies 50-70 mm lateral of the head centre.
CROP_LATERAL_SHIFT_MM = 20.0

#: Shape of one crop as stored, array axes (x, y, z) in the canonical RAS+ frame.
CROP_SHAPE = (CROP_PIXELS, CROP_PIXELS, CROP_SLICES)

#: Hounsfield value used where the crop reaches outside the scan (air).
PAD_HU = -1024.0

# --- The landmark network's grid ----------------------------------------------------------

#: The landmark U-Net sees the whole scan at this spacing, mm, (x, y, z). The AIIS and the
#: femoral head are 15-50 mm across, several voxels even at 6 mm; the landmark level is
#: the probability-weighted centroid of the AIIS label, which resolves it well below one
#: voxel. The coarse grid keeps a training step near one second on a 2-core CPU.
LANDMARK_SPACING_MM = (6.0, 6.0, 4.0)

#: Patch the U-Net is trained and run on (x, y, z voxels): 384 x 384 x 192 mm, which
#: holds a whole adult pelvis in-plane and from iliac crest to lesser trochanter.
LANDMARK_PATCH = (64, 64, 48)

#: Label values of the landmark U-Net.
LABEL_BACKGROUND, LABEL_AIIS, LABEL_FEMORAL_HEAD = 0, 1, 2

#: Radius of the ball painted around an annotated AIIS point as the training label, mm.
AIIS_LABEL_RADIUS_MM = 10.0

#: Radius of the ball painted around a femoral head centre as the training label, mm
#: (an adult femoral head is 40-55 mm across; a ball smaller than the head keeps the
#: label inside it).
FEMORAL_HEAD_LABEL_RADIUS_MM = 15.0

# --- Bone window ----------------------------------------------------------------------------

#: Bone window of the study: level 500 HU, width 2000 HU, mapped linearly to 0-255.
WINDOW_LEVEL_HU = 500.0
WINDOW_WIDTH_HU = 2000.0

# --- Implants -------------------------------------------------------------------------------

#: Voxels above this are metal: cortical bone stays below about 2,000 HU, while steel and
#: titanium implants saturate most CT scanners' range (3,000 HU and more).
METAL_HU = 2500.0

#: A side whose crop holds more metal than this, mm^3, carries an implant. 100 mm^3 is
#: about eight crop voxels, more than beam-hardening specks and less than any screw.
METAL_MIN_VOLUME_MM3 = 100.0
