"""The synthetic cohort's table: patients, studies over time, per-side cases, labels.

Everything here is computed without making an image, so counts, prevalence and splits
are testable in a second. :mod:`training.cohort` turns one study of this table into a
CT volume; both are deterministic functions of :class:`CohortSpec`.

Structure (defaults reproduce the source study; ``scale`` multiplies every count):

* 540 patients, 2,933 CTs, 3,621 per-side cases (a CT contributes the side or sides
  whose femur carries a metastasis), 51 positive (1.4 %). 1,956 cases from men,
  1,665 from women; age 63 +- 11 years at the time of the CT.
* Each patient belongs to one of four hospitals (:data:`HOSPITALS`) and has one or
  more CTs, 90 days apart on average. Every patient has a metastasis in one femur
  from the first CT on; some develop one in the other femur later (a bilateral CT
  contributes two cases). Lesions grow exponentially between CTs, from a few mm
  at onset (or most of their size, for slow disease) to a size drawn for the last CT.
* Some patients carry an old implant in the femur without a metastasis; some femurs
  are normal (the other side of a unilateral CT).

The label (fracture within three months of the CT) and its probability:

* ``true_risk`` is the stated, biomechanically motivated risk of :func:`fracture_risk`:
  the loss of axial (EA) and bending (EI) rigidity of the cross-section through the
  lesion, as CT-based rigidity analysis computes it (a loss over 35 % is the
  classical threshold), bone density, axial cortical involvement over 30 mm, and the
  place. It is what the image shows and is the ceiling for an image-only model.
* A femur's cases form a series over the patient's CTs. A femur that fractures is
  fixed and leaves the case table, so in this design only the last case of a series
  can be positive: earlier cases of the same femur are negative by follow-up (the
  femur is seen intact on a later CT), as in a real retrospective cohort; their
  ``label_probability`` is 0.
* At a series' last case three things compete within the three months: prophylactic
  fixation (more likely the higher the rigidity loss), death, and fracture.
  Censoring rule: a femur fixed prophylactically, or a patient who dies, before a
  fracture is counted **negative** (label 0), as retrospective cohorts do;
  ``end_reason`` records what happened and ``censored`` flags these cases so that an
  analysis may drop them instead. The probability of a recorded fracture is
  ``p_obs = true_risk * (1 - p_fixation) * (1 - p_death / 2)`` (half of the deaths
  within three months come before the fracture would have).
* The risk model's intercept is solved so that the expected number of positives is
  the target (51 at scale 1); labels are then drawn by conditional Poisson sampling
  with exactly that many positives, and ``label_probability`` records each case's
  exact inclusion probability under that draw (within about 1 % of ``p_obs``).
* ``enrich`` (for small runs) raises the intercept instead, so that about that
  fraction of cases is positive; ``risk_logit_shift`` says by how much, so that
  probabilities can be mapped back to the study's prevalence exactly. The fraction
  cannot exceed the share of series-ending cases (about 20 %).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

SIDES = ("left", "right")

# --- The source study's numbers ---------------------------------------------------------

STUDY_PATIENTS = 540
STUDY_CTS = 2933
STUDY_CASES = 3621
STUDY_POSITIVES = 51
STUDY_CASES_MEN = 1956
STUDY_AGE_MEAN, STUDY_AGE_SD = 63.0, 11.0

#: Mean days between a patient's successive CTs (restaging every three months).
MEAN_INTERVAL_DAYS = 90.0

#: Last slice of the 32-slice, 3-mm crop below the AIIS, mm (31 x 3 mm).
SLAB_DEPTH_MM = 93.0


@dataclass(frozen=True)
class Hospital:
    """Acquisition protocol of one synthetic hospital.

    Attributes:
        name: Site code.
        patient_share: Fraction of the cohort's patients seen there.
        slice_thickness_mm: Reconstructed slice thickness (FWHM along z).
        slice_spacing_mm: Distance between slice centres.
        pixel_mm: In-plane pixel size (coarser than real scanners, for speed).
        noise_hu: Standard deviation of image noise.
        kernel: Reconstruction kernel: "soft", "standard" or "sharp".
        kernel_sharpness: 0 (smooth) .. 1 (edge-enhancing), the kernel's strength.
        hu_offset: Calibration offset added to every voxel, HU.
        fov_mm: Range of the displayed field of view, mm.
        positions: Patient positions (DICOM codes) with their probabilities.
        contrast_phase: "none", "arterial" or "portal_venous".
        manufacturer: Written into the DICOM header.
    """

    name: str
    patient_share: float
    slice_thickness_mm: float
    slice_spacing_mm: float
    pixel_mm: float
    noise_hu: float
    kernel: str
    kernel_sharpness: float
    hu_offset: float
    fov_mm: tuple[float, float]
    positions: tuple[tuple[str, float], ...]
    contrast_phase: str
    manufacturer: str


#: Site A is the training hospital (as in the source study); B-D are external.
HOSPITALS = (
    Hospital("A", 0.52, 3.0, 3.0, 1.6, 12.0, "standard", 0.5, -10.0, (360.0, 440.0),
             (("HFS", 0.9), ("FFS", 0.1)), "portal_venous", "Synthetic CT Alpha"),
    Hospital("B", 0.16, 5.0, 5.0, 2.0, 8.0, "soft", 0.2, 20.0, (380.0, 480.0),
             (("FFS", 1.0),), "none", "Synthetic CT Beta"),
    Hospital("C", 0.16, 1.0, 1.0, 2.2, 28.0, "sharp", 0.9, 0.0, (340.0, 420.0),
             (("HFS", 0.7), ("HFP", 0.3)), "arterial", "Synthetic CT Gamma"),
    Hospital("D", 0.16, 2.0, 1.5, 1.8, 18.0, "sharp", 0.6, 30.0, (350.0, 450.0),
             (("HFS", 0.6), ("FFP", 0.2), ("HFP", 0.2)), "portal_venous",
             "Synthetic CT Delta"),
)
HOSPITAL_BY_NAME = {h.name: h for h in HOSPITALS}
TRAINING_SITE = "A"


# --- The specification and its records ---------------------------------------------------


@dataclass(frozen=True)
class CohortSpec:
    """Everything the cohort is a deterministic function of.

    Attributes:
        seed: Cohort seed.
        scale: Multiplies every count of the source study (1.0 reproduces it).
        enrich: Target fraction of positive cases for small runs, or None for the
            study's 1.4 %.
        real_anatomy_fraction: Share of eligible patients whose anatomy is the real
            scan deformed (the rest get the parametric phantom).
        real_anatomy_sites: Sites whose patients may get the real anatomy. By
            default only the training hospital, so the external test (B-D) never
            shows the one real patient.
        prior_implant_fraction: Share of unilateral patients with an old implant in
            the femur without a metastasis.
    """

    seed: int = 0
    scale: float = 1.0
    enrich: float | None = None
    real_anatomy_fraction: float = 0.5
    real_anatomy_sites: tuple[str, ...] = (TRAINING_SITE,)
    prior_implant_fraction: float = 0.08


@dataclass(frozen=True)
class Anatomy:
    """A patient's anatomy, fixed over all their CTs.

    Attributes:
        kind: "real" (the shared scan deformed) or "phantom" (parametric).
        scale: Overall size factor.
        mirrored: Real anatomy only: mirrored left-right.
        seed: Seeds the anatomy's continuous shape draws (elastic field, phantom).
        aiis_to_lesser_trochanter_mm: Nominal cranio-caudal distance, which decides
            whether a subtrochanteric lesion lies inside the 32-slice slab.
    """

    kind: str
    scale: float
    mirrored: bool
    seed: int
    aiis_to_lesser_trochanter_mm: float


@dataclass(frozen=True)
class LesionSeries:
    """One femur's metastasis over time (drawn once per patient and side).

    Attributes:
        kind: "lytic", "blastic" or "mixed".
        place: "head", "neck", "intertrochanteric" or "subtrochanteric".
        onset_index: Index of the patient's first CT that shows it.
        radius_onset_mm: Transverse semi-axis at the CT of onset.
        radius_final_mm: Transverse semi-axis at the patient's last CT; in between
            the radius grows exponentially with time, so a femur is weakest at its
            last CT, where alone a fracture can be recorded.
        elongation: Axial semi-axis over transverse semi-axis (>= 1).
        eccentricity: Centre's distance from the bone axis over the bone radius.
        angle_deg: Direction of that offset around the bone axis.
        along: Position along the place's axis segment, 0..1.
        shape_seed: Seeds the boundary irregularity and texture.
    """

    kind: str
    place: str
    onset_index: int
    radius_onset_mm: float
    radius_final_mm: float
    elongation: float
    eccentricity: float
    angle_deg: float
    along: float
    shape_seed: int


@dataclass(frozen=True)
class LesionState:
    """A metastasis at one CT, with the quantities the risk is computed from.

    Attributes:
        kind, place, elongation, eccentricity, angle_deg, along, shape_seed: As in
            :class:`LesionSeries`.
        radius_mm: Transverse semi-axis at this CT.
        axial_length_mm: Length along the bone axis (2 x axial semi-axis).
        bone_radius_mm: Nominal outer radius of the bone section at the place.
        cortex_mm: Nominal cortical thickness there.
        axial_cortical_involvement_mm: Length along the bone axis over which the
            lesion reaches the cortex.
        axial_rigidity_loss: 1 - EA(section with lesion) / EA(intact section).
        bending_rigidity_loss: 1 - min EI(with lesion) / min EI(intact).
    """

    kind: str
    place: str
    radius_mm: float
    axial_length_mm: float
    elongation: float
    eccentricity: float
    angle_deg: float
    along: float
    shape_seed: int
    bone_radius_mm: float
    cortex_mm: float
    axial_cortical_involvement_mm: float
    axial_rigidity_loss: float
    bending_rigidity_loss: float


@dataclass
class Patient:
    """One patient; identifiers are fictitious."""

    patient_id: int
    pseudo_id: str
    site: str
    sex: str
    age0: float
    bone_density: float
    anatomy: Anatomy
    study_ids: list[int]
    lesions: dict[str, LesionSeries]
    prior_implant_side: str | None


@dataclass
class Study:
    """One CT of a patient."""

    study_id: int
    patient_id: int
    index: int
    day: float
    site: str
    position: str
    contrast_phase: str
    age: float
    case_sides: tuple[str, ...]


@dataclass
class Case:
    """One side of one CT with a metastasis: a row of the manifest."""

    case_id: int
    study_id: int
    patient_id: int
    side: str
    lesion: LesionState
    last_of_series: bool
    true_risk: float = 0.0
    observed_risk: float = 0.0
    label_probability: float = 0.0
    label: int = 0
    end_reason: str = "next_ct"
    censored: bool = False


@dataclass
class Design:
    """The whole table; ``studies[i].study_id == i`` and ``cases[i].case_id == i``."""

    spec: CohortSpec
    patients: list[Patient]
    studies: list[Study]
    cases: list[Case]
    risk_intercept: float
    risk_logit_shift: float
    cases_by_study: dict[int, list[int]] = field(default_factory=dict)

    def lesion_at(self, study_id: int, side: str) -> LesionState | None:
        """The lesion of ``side`` at a CT, or None for a femur without one."""
        for case_id in self.cases_by_study.get(study_id, []):
            if self.cases[case_id].side == side:
                return self.cases[case_id].lesion
        return None

    def summary(self) -> dict:
        """Counts and rates, for logs and tests."""
        cases = self.cases
        men = sum(self.patients[c.patient_id].sex == "M" for c in cases)
        ages = np.array([self.studies[c.study_id].age for c in cases])
        return {
            "patients": len(self.patients), "cts": len(self.studies),
            "cases": len(cases), "positives": sum(c.label for c in cases),
            "cases_men": men, "cases_women": len(cases) - men,
            "age_mean": float(ages.mean()), "age_sd": float(ages.std()),
            "per_site_cases": {h.name: sum(self.studies[c.study_id].site == h.name
                                           for c in cases) for h in HOSPITALS},
        }


# --- Biomechanics -----------------------------------------------------------------------

#: Nominal outer radius and cortical thickness of the bone section at each place, mm,
#: for an anatomy of scale 1 (adult femur: head 46 mm across, neck 30 mm, the
#: intertrochanteric region about 50 mm, subtrochanteric shaft 30 mm with a 5-6 mm
#: cortex).
SECTIONS = {
    "head": (23.0, 1.2),
    "neck": (15.0, 2.5),
    "intertrochanteric": (24.0, 2.0),
    "subtrochanteric": (15.0, 5.5),
}
#: Fraction of the modulus kept inside a lesion: lytic bone carries nothing, blastic
#: bone is dense but woven and carries part of the load.
LESION_MODULUS_KEPT = {"lytic": 0.0, "mixed": 0.4, "blastic": 0.75}
#: Cortical and trabecular moduli of young healthy bone, GPa; both scale with
#: bone density squared (Carter and Hayes).
CORTICAL_MODULUS_GPA, TRABECULAR_MODULUS_GPA = 17.0, 0.8
#: Log-odds added per place: the neck, the intertrochanteric and subtrochanteric
#: regions carry bending and torsion; head lesions rarely fracture first.
PLACE_LOGIT = {"head": -0.7, "neck": 0.3, "intertrochanteric": 0.3,
               "subtrochanteric": 0.6}
#: Classical CT rigidity threshold: a loss over 35 % predicts fracture.
RIGIDITY_THRESHOLD = 0.35
RIGIDITY_SLOPE = 9.0
DENSITY_SLOPE = 2.0
CORTICAL_INVOLVEMENT_MM, CORTICAL_INVOLVEMENT_LOGIT = 30.0, 1.5

_SECTION_GRID = 41


def _section_rigidity(outer: float, cortex: float, density: float,
                      lesion: tuple[float, float, float, float] | None
                      ) -> tuple[float, float]:
    """Axial rigidity EA and the smaller principal bending rigidity EI of a section.

    The section is an annulus (cortex) around trabecular bone, on a square grid.
    ``lesion`` = (radius, offset from the axis, angle in rad, modulus kept).
    """
    u = np.linspace(-outer, outer, _SECTION_GRID)
    x, y = np.meshgrid(u, u, indexing="ij")
    r = np.hypot(x, y)
    modulus = np.where(r <= outer - cortex, TRABECULAR_MODULUS_GPA,
                       CORTICAL_MODULUS_GPA) * density**2
    modulus = np.where(r <= outer, modulus, 0.0)
    if lesion is not None:
        radius, offset, angle, kept = lesion
        inside = np.hypot(x - offset * math.cos(angle),
                          y - offset * math.sin(angle)) <= radius
        modulus = np.where(inside, modulus * kept, modulus)
    area = (u[1] - u[0]) ** 2
    ea = float(modulus.sum() * area)
    cx, cy = (modulus * x).sum() * area / ea, (modulus * y).sum() * area / ea
    ixx = float((modulus * (y - cy) ** 2).sum() * area)
    iyy = float((modulus * (x - cx) ** 2).sum() * area)
    ixy = float((modulus * (x - cx) * (y - cy)).sum() * area)
    ei_min = (ixx + iyy) / 2.0 - math.hypot((ixx - iyy) / 2.0, ixy)
    return ea, ei_min


def lesion_state(series: LesionSeries, progress: float, anatomy_scale: float,
                 density: float) -> LesionState:
    """The lesion at a CT: size after growth and the section's rigidity loss.

    Args:
        series: The femur's lesion.
        progress: 0 at the CT of onset, 1 at the patient's last CT (fraction of
            the time between them); the radius grows exponentially in between.
        anatomy_scale: The patient's size factor.
        density: Relative bone density.
    """
    outer, cortex = (v * anatomy_scale for v in SECTIONS[series.place])
    radius = series.radius_onset_mm * (series.radius_final_mm
                                       / series.radius_onset_mm) ** progress
    radius = float(np.clip(radius, 2.0, 0.95 * outer))
    offset = series.eccentricity * outer
    # Along the bone axis the lesion is an ellipsoid of semi-axis radius * elongation;
    # it touches the cortex where its transverse section reaches the inner surface.
    gap = outer - cortex - offset
    half_axial = radius * series.elongation
    if radius > gap:
        involvement = 2.0 * half_axial * math.sqrt(1.0 - (max(gap, 0.0) / radius) ** 2)
    else:
        involvement = 0.0
    ea0, ei0 = _section_rigidity(outer, cortex, density, None)
    ea, ei = _section_rigidity(
        outer, cortex, density,
        (radius, offset, math.radians(series.angle_deg), LESION_MODULUS_KEPT[series.kind]))
    return LesionState(
        kind=series.kind, place=series.place, radius_mm=radius,
        axial_length_mm=2.0 * half_axial, elongation=series.elongation,
        eccentricity=series.eccentricity, angle_deg=series.angle_deg,
        along=series.along, shape_seed=series.shape_seed, bone_radius_mm=outer,
        cortex_mm=cortex, axial_cortical_involvement_mm=float(involvement),
        axial_rigidity_loss=float(1.0 - ea / ea0),
        bending_rigidity_loss=float(1.0 - ei / ei0),
    )


def risk_logit(lesion: LesionState, density: float) -> float:
    """Log-odds of the stated risk model, without the intercept.

    ``RIGIDITY_SLOPE * (max(EA loss, EI loss) - 0.35) + DENSITY_SLOPE * (1 -
    density) + 1.5 * [axial cortical involvement > 30 mm] + PLACE_LOGIT[place]``.
    """
    loss = max(lesion.axial_rigidity_loss, lesion.bending_rigidity_loss)
    return (RIGIDITY_SLOPE * (loss - RIGIDITY_THRESHOLD)
            + DENSITY_SLOPE * (1.0 - density)
            + CORTICAL_INVOLVEMENT_LOGIT * float(
                lesion.axial_cortical_involvement_mm > CORTICAL_INVOLVEMENT_MM)
            + PLACE_LOGIT[lesion.place])


def fracture_risk(lesion: LesionState, density: float, intercept: float) -> float:
    """Probability of pathologic fracture within three months if left untreated."""
    return 1.0 / (1.0 + math.exp(-(intercept + risk_logit(lesion, density))))


def fixation_probability(lesion: LesionState) -> float:
    """Chance of prophylactic fixation within three months: surgeons fix large losses."""
    loss = max(lesion.axial_rigidity_loss, lesion.bending_rigidity_loss)
    return 0.35 / (1.0 + math.exp(-10.0 * (loss - 0.5)))


def death_probability(age: float) -> float:
    """Chance of death within three months of a CT in metastatic disease."""
    return float(np.clip(0.08 + 0.003 * (age - STUDY_AGE_MEAN), 0.02, 0.2))


# --- Exact-count sampling ---------------------------------------------------------------


def conditional_poisson(rng: np.random.Generator, probs: np.ndarray, k: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Draw exactly ``k`` successes with odds ``p / (1 - p)``; return them and the
    exact inclusion probability of each item.

    The draw is independent Bernoulli(p) conditioned on the total being ``k``
    (conditional Poisson sampling), done sequentially with log-space
    elementary symmetric sums.
    """
    p = np.clip(np.asarray(probs, dtype=float), 1e-12, 1.0 - 1e-12)
    n = len(p)
    k = int(min(max(k, 0), n))
    logw = np.log(p) - np.log1p(-p)
    # back[i, j]: log of the sum over j-subsets of items i..n-1 of prod w.
    back = np.full((n + 1, k + 1), -np.inf)
    back[n, 0] = 0.0
    for i in range(n - 1, -1, -1):
        back[i] = back[i + 1]
        back[i, 1:] = np.logaddexp(back[i + 1, 1:], logw[i] + back[i + 1, :-1])
    front = np.full((n + 1, k + 1), -np.inf)
    front[0, 0] = 0.0
    for i in range(n):
        front[i + 1] = front[i]
        front[i + 1, 1:] = np.logaddexp(front[i, 1:], logw[i] + front[i, :-1])
    total = back[0, k]
    inclusion = np.zeros(n)
    if k > 0:
        for i in range(n):
            j = np.arange(k)
            inclusion[i] = math.exp(
                logw[i] + np.logaddexp.reduce(front[i, j] + back[i + 1, k - 1 - j])
                - total)
    chosen = np.zeros(n, dtype=int)
    need = k
    for i in range(n):
        if need == 0:
            break
        take = math.exp(logw[i] + back[i + 1, need - 1] - back[i, need])
        if rng.random() < take:
            chosen[i] = 1
            need -= 1
    return chosen, inclusion


# --- Building the table -----------------------------------------------------------------


def _allocate(rng: np.random.Generator, total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` summing exactly to ``total``."""
    share = weights / weights.sum() * total
    out = np.floor(share).astype(int)
    rest = total - out.sum()
    if rest > 0:
        order = rng.permutation(len(weights))
        remainder = (share - out)[order]
        out[order[np.argsort(-remainder, kind="stable")[:rest]]] += 1
    return out


def _choose_subset_sum(rng: np.random.Generator, sizes: np.ndarray, target: int
                       ) -> np.ndarray:
    """A random subset of items whose sizes add up to ``target`` (as near as possible)."""
    best = np.zeros(len(sizes), dtype=bool)
    best_gap = target
    for _ in range(20):
        chosen = np.zeros(len(sizes), dtype=bool)
        total = 0
        for i in rng.permutation(len(sizes)):
            if total + sizes[i] <= target:
                chosen[i], total = True, total + sizes[i]
        gap = target - total
        if gap:  # one swap: out a, in b with sizes[b] - sizes[a] == gap
            ins, outs = np.flatnonzero(~chosen), np.flatnonzero(chosen)
            match = np.flatnonzero(sizes[ins] == gap)
            if len(match):
                chosen[ins[match[0]]] = True
                gap = 0
            else:
                diff = sizes[ins][None, :] - sizes[outs][:, None]
                a, b = np.nonzero(diff == gap)
                if len(a):
                    chosen[outs[a[0]]], chosen[ins[b[0]]] = False, True
                    gap = 0
        if gap < best_gap:
            best, best_gap = chosen, gap
        if gap == 0:
            break
    if best_gap:
        logger.warning("subset sum: %d short of %d", best_gap, target)
    return best


def _draw_lesion(rng: np.random.Generator, onset: int, anatomy: Anatomy) -> LesionSeries:
    kind = str(rng.choice(["lytic", "mixed", "blastic"], p=[0.5, 0.25, 0.25]))
    place = str(rng.choice(["head", "neck", "intertrochanteric", "subtrochanteric"],
                           p=[0.2, 0.35, 0.35, 0.1]))
    radius_final = float(np.exp(rng.uniform(np.log(3.5), np.log(22.0))))
    along = float(rng.uniform())
    if place == "subtrochanteric":
        # Only where the slab reaches: the lesion's centre must lie above the slab's
        # last slice. ``along`` 0 puts it at the lesser trochanter.
        room = SLAB_DEPTH_MM - anatomy.aiis_to_lesser_trochanter_mm * anatomy.scale
        if room < 5.0:
            place = str(rng.choice(["neck", "intertrochanteric"]))
        else:
            along = float(rng.uniform(0.0, min(room / 40.0, 1.0)))
    if rng.random() < 0.15:  # slow, nearly stable under treatment
        radius_onset = radius_final * float(rng.uniform(0.6, 0.9))
    else:
        radius_onset = min(float(rng.uniform(2.5, 5.0)), radius_final)
    return LesionSeries(
        kind=kind, place=place, onset_index=onset, radius_onset_mm=radius_onset,
        radius_final_mm=radius_final, elongation=float(rng.uniform(1.0, 1.8)),
        eccentricity=float(rng.uniform(0.0, 0.8)), angle_deg=float(rng.uniform(0, 360)),
        along=along, shape_seed=int(rng.integers(2**31)),
    )


def _bone_density(rng: np.random.Generator, sex: str, age: float) -> float:
    """Relative volumetric BMD (1 = young adult): falls with age, faster in women."""
    loss = 0.004 * max(age - 30.0, 0.0)
    if sex == "F":
        loss += 0.008 * max(age - 50.0, 0.0)
    return float(np.clip((1.0 - loss) * np.exp(rng.normal(0.0, 0.1)), 0.4, 1.25))


def _scaled(count: int, scale: float) -> int:
    return max(1, int(round(count * scale)))


@functools.lru_cache(maxsize=4)
def build_design(spec: CohortSpec = CohortSpec()) -> Design:
    """The cohort's table for ``spec`` (deterministic; cached per process).

    Args:
        spec: Seed, scale, enrichment and anatomy options.

    Returns:
        The design.

    Raises:
        ValueError: If the scale leaves fewer CTs than patients.
    """
    rng = np.random.default_rng([spec.seed, 0xC0])
    n_patients = _scaled(STUDY_PATIENTS, spec.scale)
    n_cts = max(_scaled(STUDY_CTS, spec.scale), n_patients)
    n_cases = max(_scaled(STUDY_CASES, spec.scale), n_cts)
    n_men_cases = int(round(n_cases * STUDY_CASES_MEN / STUDY_CASES))
    if n_cts < n_patients:
        raise ValueError(f"scale must leave at least one CT per patient, got {spec.scale}")

    # Skeleton: CTs per patient, the second femur's onset, sites.
    extra = rng.gamma(0.7, 1.0, n_patients)
    n_studies = 1 + _allocate(rng, n_cts - n_patients, extra)
    bilateral = np.zeros(n_patients, dtype=int)  # CTs showing both femurs
    gap = n_cases - n_cts
    for p in rng.permutation(n_patients):
        if gap == 0:
            break
        if rng.random() < 0.4:
            bilateral[p] = min(int(rng.integers(1, n_studies[p] + 1)), gap)
            gap -= bilateral[p]
    while gap > 0:  # extend earlier onsets one CT at a time
        room = np.flatnonzero(bilateral < n_studies)
        p = rng.choice(room)
        bilateral[p] += 1
        gap -= 1
    sites = np.repeat([h.name for h in HOSPITALS],
                      _allocate(rng, n_patients, np.array([h.patient_share
                                                           for h in HOSPITALS])))
    rng.shuffle(sites)
    sides_per_patient = n_studies + bilateral
    men = _choose_subset_sum(rng, sides_per_patient, n_men_cases)

    # Patients: sex, age, density, anatomy, lesions, studies.
    patients: list[Patient] = []
    studies: list[Study] = []
    cases: list[Case] = []
    for p in range(n_patients):
        prng = np.random.default_rng([spec.seed, 0xA1, p])
        sex = "M" if men[p] else "F"
        age0 = float(np.clip(prng.normal(STUDY_AGE_MEAN - 1.7, STUDY_AGE_SD), 25, 95))
        density = _bone_density(prng, sex, age0)
        real_ok = sites[p] in spec.real_anatomy_sites
        kind = "real" if real_ok and prng.random() < spec.real_anatomy_fraction else (
            "phantom")
        size = float(prng.normal(1.04 if sex == "M" else 0.96, 0.04))
        anatomy = Anatomy(
            kind=kind, scale=float(np.clip(size, 0.86, 1.14)),
            mirrored=bool(prng.random() < 0.5), seed=int(prng.integers(2**31)),
            aiis_to_lesser_trochanter_mm=(110.0 if kind == "real"
                                          else float(prng.uniform(85.0, 110.0))),
        )
        first = str(prng.choice(SIDES))
        lesions = {first: _draw_lesion(prng, 0, anatomy)}
        if bilateral[p]:
            second = "left" if first == "right" else "right"
            lesions[second] = _draw_lesion(prng, int(n_studies[p] - bilateral[p]), anatomy)
        implant = None
        if not bilateral[p] and prng.random() < spec.prior_implant_fraction:
            implant = "left" if first == "right" else "right"
        hospital = HOSPITAL_BY_NAME[str(sites[p])]
        days = np.r_[0.0, np.cumsum(prng.gamma(3.0, MEAN_INTERVAL_DAYS / 3.0,
                                               n_studies[p] - 1))]
        patient = Patient(p, f"FR-SYN-{spec.seed:03d}-{p:05d}", str(sites[p]), sex,
                          age0, density, anatomy, [], lesions, implant)
        positions, weights = zip(*hospital.positions)
        for index in range(n_studies[p]):
            sides = tuple(s for s in SIDES
                          if s in lesions and lesions[s].onset_index <= index)
            study = Study(len(studies), p, index, float(days[index]), hospital.name,
                          str(prng.choice(positions, p=weights)),
                          hospital.contrast_phase, age0 + days[index] / 365.25, sides)
            studies.append(study)
            patient.study_ids.append(study.study_id)
            for side in sides:
                series = lesions[side]
                span = days[-1] - days[series.onset_index]
                progress = 1.0 if span <= 0 else (
                    days[index] - days[series.onset_index]) / span
                state = lesion_state(series, float(progress), anatomy.scale, density)
                cases.append(Case(len(cases), study.study_id, p, side, state,
                                  last_of_series=bool(index == n_studies[p] - 1)))
        patients.append(patient)

    intercept, shift = _label(rng, spec, patients, studies, cases)
    design = Design(spec, patients, studies, cases, intercept, shift)
    for case in cases:
        design.cases_by_study.setdefault(case.study_id, []).append(case.case_id)
    logger.info("cohort design %s", design.summary())
    return design


def _label(rng: np.random.Generator, spec: CohortSpec, patients: list[Patient],
           studies: list[Study], cases: list[Case]) -> tuple[float, float]:
    """Risks, competing events and labels; returns the intercept and its enrichment
    shift."""
    logits = np.array([risk_logit(c.lesion, patients[c.patient_id].bone_density)
                       for c in cases])
    last = np.array([c.last_of_series for c in cases])
    fix = np.array([fixation_probability(c.lesion) for c in cases])
    death = np.array([death_probability(studies[c.study_id].age) for c in cases])
    keep = (1.0 - fix) * (1.0 - death / 2.0)

    def observed(b: float) -> np.ndarray:
        return keep / (1.0 + np.exp(-(b + logits)))

    def solve(expected: float) -> float:
        lo, hi = -30.0, 30.0
        for _ in range(80):
            mid = (lo + hi) / 2.0
            lo, hi = (mid, hi) if observed(mid)[last].sum() < expected else (lo, mid)
        return (lo + hi) / 2.0

    target_study = STUDY_POSITIVES / STUDY_CASES * len(cases)
    intercept_study = solve(target_study)
    intercept, target = intercept_study, target_study
    if spec.enrich is not None:
        target = spec.enrich * len(cases)
        ceiling = float(keep[last].sum()) * 0.999
        if target > ceiling:
            logger.warning("enrich %.2f needs %.0f positives; at most %.0f are possible",
                           spec.enrich, target, ceiling)
            target = ceiling
        intercept = solve(target)
    n_pos = int(round(target))

    risk = 1.0 / (1.0 + np.exp(-(intercept + logits)))
    obs = observed(intercept)
    idx = np.flatnonzero(last)
    labels, inclusion = conditional_poisson(rng, obs[idx], n_pos)
    for case, r, o in zip(cases, risk, obs):
        case.true_risk, case.observed_risk = float(r), float(o)
    for i, y, pi in zip(idx, labels, inclusion):
        case = cases[i]
        case.label, case.label_probability = int(y), float(pi)
        if y:
            case.end_reason = "fracture"
            continue
        u = rng.random() * (1.0 - obs[i])
        if u < fix[i]:
            case.end_reason, case.censored = "prophylactic_fixation", True
        elif u < fix[i] + (1.0 - fix[i]) * death[i] / 2.0:
            case.end_reason, case.censored = "death", True
        else:
            case.end_reason = "follow_up_end"
    return intercept, intercept - intercept_study


# --- Rows -------------------------------------------------------------------------------


def case_row(design: Design, case: Case) -> dict:
    """The manifest fields of one case that need no image (flat, CSV-ready)."""
    study = design.studies[case.study_id]
    patient = design.patients[case.patient_id]
    row = {
        "case_id": case.case_id, "patient_id": patient.pseudo_id,
        "patient_index": patient.patient_id, "study_id": case.study_id,
        "study_index": study.index, "day": round(study.day, 1), "site": study.site,
        "position": study.position, "contrast_phase": study.contrast_phase,
        "side": case.side, "sex": patient.sex, "age": round(study.age, 2),
        "bone_density": round(patient.bone_density, 4),
        "anatomy": patient.anatomy.kind, "label": case.label,
        "true_risk": case.true_risk, "observed_risk": case.observed_risk,
        "label_probability": case.label_probability,
        "last_of_series": case.last_of_series, "end_reason": case.end_reason,
        "censored": case.censored,
        "other_side_implant": patient.prior_implant_side is not None,
    }
    row.update({f"lesion_{k}": v for k, v in asdict(case.lesion).items()})
    return row
