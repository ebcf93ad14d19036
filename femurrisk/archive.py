"""Unpack an uploaded ZIP archive safely, and list the files of a folder.

Members are written under numbered names of the caller's directory, so no name
stored in the archive (absolute, ``..``, drive letters, odd characters) ever reaches
the file system. Links, encrypted members and nested archives are not followed.
The limits below are module-level settings; raise them for very large studies.
"""

from __future__ import annotations

import logging
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

from femurrisk.errors import InputError

logger = logging.getLogger(__name__)

#: Largest total unpacked size, bytes (a 2,000-slice 512x512 series is ~1 GiB).
MAX_UNPACKED_BYTES = 4 * 1024**3

#: Most files read from one archive or folder.
MAX_FILES = 20_000

#: Deepest folder nesting followed inside an archive or folder.
MAX_DEPTH = 16

#: Suffixes kept on unpacked files, because the readers dispatch on them.
_KEPT_SUFFIXES = (".nii.gz", ".nii", ".zip")

_CHUNK_BYTES = 1024 * 1024


def extract_zip(archive: Path, destination: Path) -> list[Path]:
    """Unpack the regular files of ``archive`` into ``destination``.

    Args:
        archive: path of the ZIP file.
        destination: an empty directory, normally a ``tempfile.TemporaryDirectory``.

    Returns:
        Paths of the unpacked files, named by their index in the archive.

    Raises:
        InputError: not a ZIP archive, empty, encrypted, or over one of the limits.
    """
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = _regular_members(bundle)
            paths, total = [], 0
            for index, member in enumerate(members):
                path, size = _extract_one(
                    bundle, member, destination / _numbered(member, index), total
                )
                paths.append(path)
                total += size
            return paths
    except zipfile.BadZipFile:
        raise InputError(
            "a .zip upload must be a valid ZIP archive, but this one is damaged "
            "or not a ZIP file"
        ) from None


def _regular_members(bundle: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Members to unpack, after checking the limits on their declared sizes."""
    members = []
    for info in bundle.infolist():
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.is_dir() or "__MACOSX" in parts or _is_link(info):
            continue
        if len(parts) - 1 > MAX_DEPTH:
            raise InputError(
                f"folders in a ZIP archive must be nested at most {MAX_DEPTH} deep, "
                f"not {len(parts) - 1}"
            )
        if info.flag_bits & 0x1:
            raise InputError(
                "a ZIP archive must not be password-protected, but this one is"
            )
        members.append(info)

    if not members:
        raise InputError("a ZIP archive must contain CT images, but this one is empty")
    if len(members) > MAX_FILES:
        raise InputError(
            f"a ZIP archive may contain at most {MAX_FILES} files, not {len(members)}"
        )
    declared = sum(info.file_size for info in members)
    if declared > MAX_UNPACKED_BYTES:
        raise InputError(_too_big_message(declared))
    return members


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _numbered(info: zipfile.ZipInfo, index: int) -> str:
    """File name for member ``index``: its number plus a suffix the readers need."""
    name = info.filename.lower()
    return f"{index:06d}" + next((s for s in _KEPT_SUFFIXES if name.endswith(s)), "")


def _extract_one(
    bundle: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, unpacked: int
) -> tuple[Path, int]:
    """Copy one member, counting the bytes really written against the limit.

    Returns:
        The target path and the number of bytes written.
    """
    written = 0
    with bundle.open(info) as source, open(target, "wb") as sink:
        while chunk := source.read(_CHUNK_BYTES):
            written += len(chunk)
            # Declared sizes can lie; the running total cannot.
            if unpacked + written > MAX_UNPACKED_BYTES:
                raise InputError(_too_big_message(unpacked + written))
            sink.write(chunk)
    return target, written


def _too_big_message(size: int) -> str:
    return (
        f"a ZIP archive may unpack to at most {MAX_UNPACKED_BYTES / 1024**3:.1f} GiB, "
        f"but this one unpacks to more ({size / 1024**3:.1f} GiB or over)"
    )


def list_folder(folder: Path) -> list[Path]:
    """Regular files under ``folder``, recursively, in a stable order.

    Symbolic links are not followed, hidden files (name starting with ".") are
    skipped.

    Raises:
        InputError: more than ``MAX_FILES`` files or deeper than ``MAX_DEPTH``.
    """
    files = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        depth = len(Path(root).relative_to(folder).parts)
        if depth > MAX_DEPTH:
            raise InputError(
                f"folders must be nested at most {MAX_DEPTH} deep, not {depth} or more"
            )
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith(".") or not path.is_file() or path.is_symlink():
                continue
            files.append(path)
            if len(files) > MAX_FILES:
                raise InputError(
                    f"a folder may contain at most {MAX_FILES} files, not more"
                )
    return files

