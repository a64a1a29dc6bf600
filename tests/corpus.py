"""The real DICOM corpus the tests run on: pydicom's bundled test files and pydicom-data.

Files are found on disk (never through ``get_testdata_files()``, which may try the network).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import pydicom


def _roots() -> list[Path]:
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # pydicom-data

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return roots


@lru_cache(maxsize=1)
def readable_files() -> tuple[Path, ...]:
    """Every corpus file that pydicom itself can read as DICOM (force=True)."""
    out = []
    for root in _roots():
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.suffix in (".json", ".txt", ".py", ".pyc", ".gz", ".bz2",
                                                     ".xz", ".zip", ".pdf", ".md"):
                continue
            data = path.read_bytes()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ds = pydicom.dcmread(io.BytesIO(data), force=True)
                except Exception:  # noqa: BLE001 - pydicom cannot read it: not part of the corpus
                    continue
            # force=True also "reads" text files; a DICOM object has a SOP Class or is a DICOMDIR.
            if "SOPClassUID" not in ds and "DirectoryRecordSequence" not in ds \
                    and "MediaStorageSOPClassUID" not in getattr(ds, "file_meta", {}):
                continue
            out.append(path)
    return tuple(out)


def file(name: str) -> Path:
    """One bundled test file by name, without network access."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(name)
    return Path(path)


def fresh_instances(out: Path, n: int, name: str = "CT_small.dcm") -> list[Path]:
    """``n`` copies of a real corpus file in ``out``, each its own instance and series (so no
    upload of them is a link to an object already stored)."""
    from pydicom.uid import generate_uid

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = pydicom.dcmread(file(name))
        ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / f"{name.rsplit('.', 1)[0]}-{i}.dcm")
        paths.append(out / f"{name.rsplit('.', 1)[0]}-{i}.dcm")
    return paths


def pad(path: Path, mib: int) -> Path:
    """Append ``mib`` MiB of Data Set Trailing Padding (FFFC,FFFC) to the file ``path``, as a
    hole (no disk, no memory): a large instance that de-identification shrinks back."""
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, mib << 20))
        fh.truncate(fh.tell() + (mib << 20))
    return path


def deflate_bomb(padding_mib: int) -> bytes:
    """A deflated-syntax file (``image_dfl.dcm``, 4.6 KB) ending with ``padding_mib`` MiB of
    Data Set Trailing Padding (FFFC,FFFC): about 1 KB of file per MiB it inflates to.  Blocks
    ended with a full flush start afresh, so one compressed MiB of zeros is repeated."""
    from dgf.dicom import raw

    data = file("image_dfl.dcm").read_bytes()
    part = raw.parse_part10(data)
    mib = 1 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    padding = struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, padding_mib * mib)
    head = comp.compress(part.data[part.meta_end:] + padding) + comp.flush(zlib.Z_FULL_FLUSH)
    zeros = comp.compress(bytes(mib)) + comp.flush(zlib.Z_FULL_FLUSH)
    return data[:part.meta_end] + head + zeros * padding_mib + comp.flush()
