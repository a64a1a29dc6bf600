"""Synthetic but realistic DICOM corpora derived from pydicom's real test files.

Each instance keeps a real header (CT_small / MR_small) and gets new UIDs and a varied synthetic
patient, so uploads exercise de-identification, pseudonyms and placement as real data would.
Used by the benchmarks and by the tests that need many distinct files.
"""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, RTStructureSetStorage, generate_uid

FIRST = ["ANNA", "BORIS", "CHEN", "DANA", "EMIL", "FATIMA", "GRETA", "HUGO", "IDA", "JONAS"]
LAST = ["SMITH", "MULLER", "TANAKA", "ROSSI", "KOWALSKI", "DUBOIS", "SILVA", "NOVAK"]


def _template(name: str) -> pydicom.Dataset:
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(name)
    return pydicom.dcmread(path)


def _personalise(ds: pydicom.Dataset, rng: random.Random, patient: int, study: str, series: str) -> None:
    ds.PatientID = f"SYN{patient:06d}"
    ds.PatientName = f"{LAST[patient % len(LAST)]}^{FIRST[patient % len(FIRST)]}^{patient}"
    ds.PatientBirthDate = f"{1930 + patient % 70:04d}{1 + patient % 12:02d}{1 + patient % 28:02d}"
    ds.PatientSex = "F" if (patient // 2) % 2 == 0 else "M"
    ds.InstitutionName = f"General Hospital {patient % 7}"
    ds.ReferringPhysicianName = f"DR^{LAST[(patient + 3) % len(LAST)]}"
    ds.AccessionNumber = f"A{rng.randrange(10**8):08d}"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def small_corpus(out: Path, n: int, patients: int = 50, seed: int = 1) -> list[Path]:
    """``n`` instances of ~10-40 KB alternating CT_small and MR_small headers."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    templates = [_template("CT_small.dcm"), _template("MR_small.dcm")]
    studies = {p: (generate_uid(), [generate_uid() for _ in range(3)]) for p in range(patients)}
    paths = []
    for i in range(n):
        ds = templates[i % 2].copy()
        ds.file_meta = pydicom.dataset.FileMetaDataset(templates[i % 2].file_meta)
        p = i % patients
        study, series = studies[p]
        _personalise(ds, rng, p, study, series[(i // patients) % 3])
        path = out / f"small_{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ct_corpus(out: Path, n: int, patients: int = 10, seed: int = 2) -> list[Path]:
    """``n`` CT instances of ~0.5 MB: 512x512 16-bit pixel data under CT_small's real header."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    base = _template("CT_small.dcm")
    base.Rows = base.Columns = 512
    base.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    yy, xx = np.mgrid[:512, :512]
    disk = ((yy - 256) ** 2 + (xx - 256) ** 2 < 200 ** 2).astype(np.int16)
    studies = {p: (generate_uid(), generate_uid()) for p in range(patients)}
    paths = []
    for i in range(n):
        ds = base.copy()
        ds.file_meta = pydicom.dataset.FileMetaDataset(base.file_meta)
        p = i % patients
        _personalise(ds, rng, p, *studies[p])
        noise = np.random.default_rng(seed * 100003 + i).integers(0, 40, (512, 512), dtype=np.int16)
        ds.PixelData = (disk * (1000 + i % 50) + noise).astype(np.int16).tobytes()
        ds.InstanceNumber = i + 1
        path = out / f"ct_{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def multiframe(out: Path, size: int, seed: int = 3, encapsulated: bool = False) -> Path:
    """One multi-frame CT object of about ``size`` bytes (512x512x16-bit frames), written in
    pieces so that making a 2 GB file needs little memory: a real header (CT_small), the pixel
    data element header, then the frames.  ``encapsulated``: one fragment per frame."""
    rng = np.random.default_rng(seed)
    ds = _template("CT_small.dcm")
    _personalise(ds, random.Random(seed), seed, generate_uid(), generate_uid())
    frame = 512 * 512 * 2
    frames = max(1, size // frame)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 512, frames
    del ds.PixelData
    if encapsulated:
        ds.file_meta.TransferSyntaxUID = RLELossless  # fragments
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    block = rng.integers(0, 4096, size=frame // 2, dtype=np.uint16).tobytes()
    with open(out, "wb") as fh:
        fh.write(buf.getvalue())
        if encapsulated:
            fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
            fh.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0))             # empty offset table
            for i in range(frames):
                fh.write(struct.pack("<HHI", 0xFFFE, 0xE000, frame))
                fh.write(block[i % 7:] + block[:i % 7])
            fh.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        else:
            fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame))
            for i in range(frames):
                fh.write(block[i % 7:] + block[:i % 7])
    return out


def rtstruct(out: Path, rois: int = 20, contours: int = 40, points: int = 120, seed: int = 4) -> Path:
    """An RT Structure Set whose header is large (the contours are header data, not bulk data):
    ``rois`` x ``contours`` closed planar contours of ``points`` points; the defaults give a
    2.3 MB file whose XML header is 16 MB."""
    rng = random.Random(seed)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.StructureSetLabel = "RTSTRUCT", "contours"
    _personalise(ds, rng, seed, generate_uid(), generate_uid())
    roi_items = []
    for r in range(rois):
        item = pydicom.Dataset()
        item.ReferencedROINumber, item.ROIDisplayColor = r + 1, [255, 0, 0]
        item.ContourSequence = pydicom.Sequence()
        for _ in range(contours):
            contour = pydicom.Dataset()
            contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", points
            contour.ContourData = [f"{rng.uniform(-200, 200):.3f}" for _ in range(3 * points)]
            item.ContourSequence.append(contour)
        roi_items.append(item)
    ds.ROIContourSequence = pydicom.Sequence(roi_items)
    ds.save_as(out, enforce_file_format=True)
    return out
