"""Cone-beam projections and reconstructed volumes as DICOM.

**Projection series**: one Secondary Capture instance per projection, 16-bit pixels with
Rescale Slope/Intercept restoring the line integrals (quantisation below 1e-4 of the range).
Geometry in standard attributes where they exist:

=======================================  =====================================================
Distance Source to Patient (0018,1111)   SID: source to isocenter, mm
Distance Source to Detector (0018,1110)  SDD, mm
Positioner Primary Angle (0018,1510)     this projection's gantry angle, degrees
Imager Pixel Spacing (0018,1164)         detector pixel pitch at the detector (dv \\ du), mm
Rows / Columns                           detector rows nv / columns nu
Instance Number (0020,0013)              1 + the projection's index in the scan
=======================================  =====================================================

and the rest in one private block, creator ``DGF RECON 1``, element (0071,xx10), UT: the JSON of
:class:`ioserver.recon.Geometry` without its angles (detector offsets, the default reconstruction
grid).  De-identification keeps this block (its creator is on the safe list in
:mod:`dgf.dicom.profile`): it holds geometry numbers only.

**Volume series**: CT Image Storage, one instance per plane across the rotation axis (world y),
16-bit with Rescale Slope, patient axes x = world x, y = world z, z = world y; provenance (source
series, algorithm, filter, geometry) in the same private block.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dgf import errors

CREATOR = "DGF RECON 1"
GROUP = 0x0071
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _base(sop_class: str, modality: str, patient: dict[str, str], study_uid: str, series_uid: str,
          number: int) -> Dataset:
    ds = Dataset()
    if patient.get("SpecificCharacterSet"):
        # The source's character set: an identified read puts its patient's values back as bytes.
        ds.SpecificCharacterSet = patient["SpecificCharacterSet"].split("\\")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix=None)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = modality
    ds.PatientName = patient.get("PatientName", "")
    ds.PatientID = patient.get("PatientID", "")
    ds.PatientSex = patient.get("PatientSex", "")
    ds.PatientBirthDate = patient.get("PatientBirthDate", "")
    today = dt.date.today().strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = patient.get("StudyDate", today)
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.StudyID = ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.BurnedInAnnotation = "NO"  # synthetic or computed images carry no burned-in text
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def _pixels(ds: Dataset, image: np.ndarray, signed: bool) -> None:
    lo, hi = float(image.min()), float(image.max())
    if signed:
        scale = max(abs(lo), abs(hi)) / 32767 or 1.0
        ds.PixelRepresentation = 1
        stored = np.round(image / scale).astype(np.int16)
        ds.RescaleIntercept = "0"
    else:
        scale = (hi - lo) / 65535 or 1.0
        ds.PixelRepresentation = 0
        stored = np.round((image - lo) / scale).astype(np.uint16)
        ds.RescaleIntercept = f"{lo:.10g}"
    ds.RescaleSlope = f"{scale:.10g}"
    ds.Rows, ds.Columns = image.shape
    ds.PixelData = stored.tobytes()


def _private(ds: Dataset, payload: dict[str, Any]) -> None:
    block = ds.private_block(GROUP, CREATOR, create=True)
    block.add_new(0x10, "UT", json.dumps(payload, separators=(",", ":")))


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def projection_series(projections: np.ndarray, geometry: Any, patient: dict[str, str] | None = None
                      ) -> list[bytes]:
    """One Part 10 file per projection of ``projections`` (n, nv, nu) taken with ``geometry``."""
    n, nv, nu = projections.shape
    if (n, nv, nu) != (geometry.n_projections, geometry.detector_shape[1], geometry.detector_shape[0]):
        raise errors.UsageError(f"projections have shape {projections.shape}; the geometry describes "
                                f"({geometry.n_projections}, {geometry.detector_shape[1]}, {geometry.detector_shape[0]}).")
    patient = patient or {}
    study, series = generate_uid(prefix=None), generate_uid(prefix=None)
    shared = json.loads(geometry.to_json())
    shared.pop("angles_deg", None)
    out = []
    for i in range(n):
        ds = _base(SECONDARY_CAPTURE, "OT", patient, study, series, i + 1)
        ds.ConversionType = "WSD"
        ds.SeriesDescription = "cone-beam projections"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "PROJECTION"]
        ds.DistanceSourceToPatient = f"{geometry.sid:.10g}"
        ds.DistanceSourceToDetector = f"{geometry.sdd:.10g}"
        ds.PositionerPrimaryAngle = f"{math.degrees(geometry.angles[i]):.10g}"
        ds.ImagerPixelSpacing = [f"{geometry.pixel_size[1]:.10g}", f"{geometry.pixel_size[0]:.10g}"]
        _pixels(ds, projections[i], signed=False)
        _private(ds, {"geometry": shared})
        out.append(_encode(ds))
    return out


def read_projection(data: bytes, shape: tuple[int, int] | None = None) -> tuple[int, float, dict[str, Any], np.ndarray]:
    """(index, angle in degrees, shared geometry fields, image float32 (nv, nu)) of one
    projection instance; with ``shape`` (nv, nu), one of another shape is refused before its
    pixels are decoded (compressed pixels decode to whatever size the header declares)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        found = (int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1))
        if shape is not None and found != (*shape, 1):
            raise errors.UsageError(f"the projection is {found[1]}x{found[0]} in {found[2]} frame(s) where "
                                    f"the geometry says {shape[1]}x{shape[0]} in one.")
        block = ds.private_block(GROUP, CREATOR)
        shared = json.loads(block[0x10].value)["geometry"]
        image = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        return int(ds.InstanceNumber) - 1, float(ds.PositionerPrimaryAngle), shared, image
    except (KeyError, AttributeError, ValueError, TypeError) as exc:
        raise errors.InvalidDicom("the object is not a dgf projection instance "
                                  f"(missing {CREATOR} geometry or a standard attribute).") from exc


def volume_series(volume: np.ndarray, geometry: Any, provenance: dict[str, Any],
                  patient: dict[str, str] | None = None) -> list[bytes]:
    """CT instances, one per plane across the rotation axis, of ``volume`` [z, y, x]."""
    nz, ny, nx = volume.shape
    patient = patient or {}
    # 2.25.<UUID> UIDs: the form of the archive's pseudonyms, which sites check for.
    study = patient.get("StudyInstanceUID") or generate_uid(prefix=None)
    series = generate_uid(prefix=None)
    dx, dy, dz = geometry.voxel_size
    ox, oy, oz = geometry.origin
    out = []
    for j in range(ny):
        ds = _base(CT_IMAGE, "CT", patient, study, series, j + 1)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SeriesDescription = f"FDK {provenance.get('filter', '')} reconstruction"
        ds.KVP = ""
        ds.FrameOfReferenceUID = patient.get("FrameOfReferenceUID") or series
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [f"{ox:.6g}", f"{oz:.6g}", f"{oy + j * dy:.6g}"]
        ds.PixelSpacing = [f"{dz:.6g}", f"{dx:.6g}"]
        ds.SliceThickness = f"{dy:.6g}"
        ds.SliceLocation = f"{oy + j * dy:.6g}"
        _pixels(ds, volume[:, j, :], signed=True)
        _private(ds, {"provenance": provenance})
        out.append(_encode(ds))
    return out
