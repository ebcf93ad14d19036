"""Property: corrupt headers and pixels never crash the reader nor flip left and right.

One file of a small phantom series (marker on the patient's left) is damaged at
random: a header element deleted or replaced by text, a number, NaN or infinity;
bytes flipped, inserted or cut off; pixel values scrambled. Reading must then either
raise InputError or give a volume whose marker is on the left; an orientation that
no longer matches the phantom is allowed only with a warning the user sees.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from femurrisk.errors import InputError
from femurrisk.loading import load_ct
from test_loading import MARKER_RAS, MARKER_RADIUS_MM, write_series

KEYWORDS = [
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
    "RescaleIntercept", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "PhotometricInterpretation", "SOPClassUID", "Modality",
    "SeriesInstanceUID", "SamplesPerPixel", "ImageType", "SOPInstanceUID",
    "NumberOfFrames", "PixelPaddingValue", "HighBit",
]
VALUES = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**31), 2**31 - 1),
    st.lists(st.floats(-1e6, 1e6), max_size=7),
)
CORRUPTIONS = st.one_of(
    st.tuples(st.just("header"), st.sampled_from(KEYWORDS), VALUES),
    st.tuples(
        st.just("bytes"),
        st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=30),
        st.none(),
    ),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.none()),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("pixels"), st.integers(0, 2**32 - 1), st.none()),
)


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "s"
    write_series(folder, count=10)
    return folder


def corrupt(path: Path, corruption) -> None:
    kind, first, second = corruption
    if kind == "header":
        ds = pydicom.dcmread(path)
        if second is None:
            if first in ds:
                delattr(ds, first)
        else:
            try:
                setattr(ds, first, second)
                ds.save_as(path)
                return
            except Exception:  # noqa: BLE001 - a value pydicom will not write
                pass
            if first in ds:
                delattr(ds, first)
        ds.save_as(path)
        return
    data = bytearray(path.read_bytes())
    if kind == "bytes":
        for where, value in first:
            data[min(int(where * len(data)), len(data) - 1)] = value
    elif kind == "truncate":
        data = data[: int(first * len(data))]
    elif kind == "insert":
        at = int(first * len(data))
        data[at:at] = second
    else:  # scramble the pixel values of a block
        ds = pydicom.dcmread(path)
        rng = np.random.default_rng(first)
        stored = ds.pixel_array.copy()
        stored[rng.integers(0, 40) :, : rng.integers(10, 64)] = rng.integers(
            -4000, 6000, size=1, dtype=np.int16
        )
        ds.PixelData = stored.tobytes()
        ds.save_as(path)
        return
    path.write_bytes(bytes(data))


def marker_on_the_left(loaded) -> bool:
    """The volume is brighter at the marker than at its mirror image across x = 0."""
    data = np.asarray(loaded.image.dataobj)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1)
    world = index @ loaded.image.affine[:3, :3].T + loaded.image.affine[:3, 3]
    mirror = MARKER_RAS * np.array([-1, 1, 1])
    near = np.linalg.norm(world - MARKER_RAS, axis=-1) < MARKER_RADIUS_MM - 2
    far = np.linalg.norm(world - mirror, axis=-1) < MARKER_RADIUS_MM - 2
    if not near.any() or not far.any():
        return True  # the marker left the field of view: nothing to compare
    return float(np.median(data[near])) > float(np.median(data[far]))


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(victim=st.integers(0, 9), corruption=CORRUPTIONS)
def test_corruption_never_crashes_nor_flips_sides(series, victim, corruption):
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "s"
        shutil.copytree(series, folder)
        corrupt(sorted(folder.iterdir())[victim], corruption)
        try:
            loaded = load_ct(folder)
        except InputError:
            return
        assert loaded.image.ndim == 3
        assert np.all(np.isfinite(np.asarray(loaded.image.dataobj)))
        assert marker_on_the_left(loaded) or loaded.warnings
