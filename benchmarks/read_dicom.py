"""What reading a 300-slice 512x512 CT series costs, beside a plain pydicom read.

Writes a synthetic series (uncompressed, and optionally JPEG 2000 lossless) into a
temporary folder, then reads it in a fresh child process per reader so that each
peak resident memory (ru_maxrss, children included) is its own:

* ``femurrisk``: :func:`femurrisk.loading.load_ct` (survey, selection, geometry,
  HU, plausibility; compressed data decoded in the worker process);
* ``pydicom``: ``dcmread`` of every file, ``pixel_array``, stacked into int16, no
  sorting or checks: the floor for any reader.

Usage::

    .venv/bin/python benchmarks/read_dicom.py [--slices 300] [--size 512] [--j2k]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_series(folder: Path, slices: int, size: int, j2k: bool) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid,
    )

    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size] - size / 2
    body = (np.hypot(x, y) < size * 0.4) * 1064.0  # stored 1064 -> 40 HU
    series = generate_uid()
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-250, -250, 1.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.98, 0.98]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        noise = rng.normal(0, 20, (size, size))
        ds.PixelData = np.round(body + noise).astype(np.int16).tobytes()
        if j2k:
            ds.compress(JPEG2000Lossless)
        name = f"{(k * 7919) % slices:05d}"  # names out of slice order
        ds.save_as(folder / name, enforce_file_format=True)


def read_femurrisk(folder: Path) -> tuple[int, ...]:
    from femurrisk.loading import load_ct

    return load_ct(folder).image.shape


def read_pydicom(folder: Path) -> tuple[int, ...]:
    import pydicom

    frames = [pydicom.dcmread(path).pixel_array for path in sorted(folder.iterdir())]
    return np.stack(frames).astype(np.int16).shape


def child(reader: str, folder: str) -> None:
    """Run one reader and print its wall time as JSON."""
    sys.path.insert(0, str(ROOT))
    start = time.perf_counter()
    shape = {"femurrisk": read_femurrisk, "pydicom": read_pydicom}[reader](Path(folder))
    print(json.dumps({"seconds": time.perf_counter() - start, "shape": list(shape)}))


def measure(reader: str, folder: Path) -> dict:
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", reader, str(folder)],
        stdout=subprocess.PIPE, text=True,
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    result = json.loads(output)
    # Linux reports KiB: the largest peak among the reader and the processes it
    # waited for (the decoder worker), not their sum.
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--j2k", action="store_true", help="also a J2K lossless copy")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    encodings = ["uncompressed"] + (["j2k-lossless"] if args.j2k else [])
    for encoding in encodings:
        with tempfile.TemporaryDirectory(prefix="femurrisk-bench-") as scratch:
            folder = Path(scratch)
            write_series(folder, args.slices, args.size, encoding != "uncompressed")
            size_mib = sum(p.stat().st_size for p in folder.iterdir()) / 1024**2
            print(f"{encoding}: {args.slices} slices of {args.size}x{args.size}, "
                  f"{size_mib:.0f} MiB on disk")
            for reader in ("pydicom", "femurrisk"):
                runs = [measure(reader, folder) for _ in range(args.repeats)]
                best = min(runs, key=lambda r: r["seconds"])
                print(f"  {reader:9s} {best['seconds']:6.2f} s (best of {args.repeats})"
                      f"  peak RSS {max(r['peak_rss_mib'] for r in runs):6.0f} MiB"
                      f"  shape {tuple(best['shape'])}")


if __name__ == "__main__":
    main()
