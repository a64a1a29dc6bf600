"""Realistic synthetic headers for query benchmarks, and the fast path that loads them.

A cohort of patients, each with studies, series and instances, whose headers look like what
``dgf_up`` stores (same element layout and attributes, already de-identified): a modality mix,
ages, sexes, study dates 2010-2025, slice thickness, kVp, body parts, contrast agents and
procedure codes as sequences, multi-valued ImageType, positions and orientations.  Values are
drawn from a seeded generator, so a run is reproducible.  No pixel data, no objects on sites:
the rows go straight into the engine (``create_files``, the same transaction and index path an
upload uses), in batches.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from xml.sax.saxutils import escape

from metaserver.engine import MetaEngine, NewFile
from metaserver.index import HEADER_XATTR

MODALITIES = [("CT", 0.45), ("MR", 0.30), ("CR", 0.10), ("US", 0.08), ("PT", 0.04), ("NM", 0.03)]
BODY_PARTS = ["CHEST", "ABDOMEN", "HEAD", "PELVIS", "SPINE", "KNEE", "BREAST", "HEART"]
AGENTS = [("C-B0300", "Iohexol"), ("C-B0330", "Iopamidol"), ("C-17800", "Gadolinium")]
PROCEDURES = [("RPID16", "CT CHEST W CONTRAST"), ("RPID22", "CT ABDOMEN PELVIS"), ("RPID5", "MRI BRAIN"),
              ("RPID8", "XR CHEST 2 VIEWS"), ("RPID41", "US ABDOMEN"), ("RPID60", "PET CT WHOLE BODY")]
MANUFACTURERS = ["SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "TOSHIBA", "Canon"]
SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
               "CR": "1.2.840.10008.5.1.4.1.1.1", "US": "1.2.840.10008.5.1.4.1.1.6.1",
               "PT": "1.2.840.10008.5.1.4.1.1.128", "NM": "1.2.840.10008.5.1.4.1.1.20"}


def _e(kw: str, tag: str, vr: str, *values: str) -> str:
    return "".join(f'<{kw} tag="{tag}" vr="{vr}">{escape(v)}</{kw}>' for v in values)


def _code(value: str, meaning: str) -> str:
    return ("<Item>" + _e("CodeValue", "00080100", "SH", value) + _e("CodingSchemeDesignator", "00080102", "SH", "DCM")
            + _e("CodeMeaning", "00080104", "LO", meaning) + "</Item>")


def _uid(rng: random.Random) -> str:
    return "2.25." + str(rng.getrandbits(100))


def headers(patients: int, instances_per_series: int = 10, seed: int = 1) -> Iterator[tuple[str, bytes]]:
    """Yield (archive path, XML header) for ``patients`` patients (2 studies x 5 series each)."""
    rng = random.Random(seed)
    modalities, weights = zip(*MODALITIES)
    for p in range(patients):
        pid = f"P{p:07d}"
        sex = rng.choice("FFMMO" if rng.random() < 0.01 else "FM")
        age = rng.randint(1, 95)
        for _ in range(2):
            study_uid = _uid(rng)
            date = f"{rng.randint(2010, 2025)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
            modality = rng.choices(modalities, weights)[0]
            proc = rng.choice(PROCEDURES)
            body = rng.choice(BODY_PARTS)
            maker = rng.choice(MANUFACTURERS)
            contrast = rng.random() < 0.4
            agent = rng.choice(AGENTS)
            for r in range(5):
                series_uid = _uid(rng)
                thickness = rng.choice(["0.5", "0.625", "1", "1.25", "2.5", "3", "5"])
                kvp = rng.choice(["80", "100", "120", "140"])
                frame = _uid(rng)
                series_desc = f"{body} {rng.choice(['AX', 'COR', 'SAG'])} {thickness}mm"
                # The series' elements are written once; an instance adds its UID, image type,
                # time, number and position (drawn in the order they appear, as they always were).
                head = (_e("MediaStorageSOPClassUID", "00020002", "UI", SOP_CLASSES[modality])
                        + '<MediaStorageSOPInstanceUID tag="00020003" vr="UI">')
                after_sop = ("</MediaStorageSOPInstanceUID>"
                             + _e("TransferSyntaxUID", "00020010", "UI", "1.2.840.10008.1.2.1")
                             + _e("SpecificCharacterSet", "00080005", "CS", "ISO_IR 100")
                             + _e("ImageType", "00080008", "CS", "ORIGINAL", "PRIMARY"))
                after_type = (_e("SOPClassUID", "00080016", "UI", SOP_CLASSES[modality])
                              + '<SOPInstanceUID tag="00080018" vr="UI">')
                after_sop2 = ("</SOPInstanceUID>" + _e("StudyDate", "00080020", "DA", date)
                              + _e("SeriesDate", "00080021", "DA", date) + '<StudyTime tag="00080030" vr="TM">')
                parts = [
                    "</StudyTime>",
                    _e("Modality", "00080060", "CS", modality),
                    _e("Manufacturer", "00080070", "LO", maker),
                    _e("StudyDescription", "00081030", "LO", proc[1]),
                    "<ProcedureCodeSequence tag=\"00081032\" vr=\"SQ\">" + _code(*proc) + "</ProcedureCodeSequence>",
                    _e("SeriesDescription", "0008103E", "LO", series_desc),
                    _e("PatientID", "00100020", "LO", pid),
                    _e("PatientSex", "00100040", "CS", sex),
                    _e("PatientAge", "00101010", "AS", f"{age:03d}Y"),
                    _e("PatientIdentityRemoved", "00120062", "CS", "YES"),
                    _e("DeidentificationMethod", "00120063", "LO", "DICOM PS3.15 E.1-1 Basic; dgf"),
                    "<DeidentificationMethodCodeSequence tag=\"00120064\" vr=\"SQ\">" + _code("113100", "Basic Application Confidentiality Profile")
                    + _code("113107", "Retain Longitudinal Temporal Information Modified Dates Option") + "</DeidentificationMethodCodeSequence>",
                    _e("BodyPartExamined", "00180015", "CS", body),
                    _e("SliceThickness", "00180050", "DS", thickness),
                    _e("KVP", "00180060", "DS", kvp),
                ]
                if contrast:
                    parts.append(_e("ContrastBolusAgent", "00180010", "LO", agent[1]))
                    parts.append("<ContrastBolusAgentSequence tag=\"00180012\" vr=\"SQ\">" + _code(*agent)
                                 + "</ContrastBolusAgentSequence>")
                parts += [
                    _e("StudyInstanceUID", "0020000D", "UI", study_uid),
                    _e("SeriesInstanceUID", "0020000E", "UI", series_uid),
                    _e("SeriesNumber", "00200011", "IS", str(r + 1)),
                ]
                after_time = "".join(parts)
                tail = (_e("ImageOrientationPatient", "00200037", "DS", "1", "0", "0", "0", "1", "0")
                        + _e("FrameOfReferenceUID", "00200052", "UI", frame)
                        + _e("Rows", "00280010", "US", "512") + _e("Columns", "00280011", "US", "512")
                        + _e("PixelSpacing", "00280030", "DS", "0.7", "0.7")
                        + _e("BitsAllocated", "00280100", "US", "16")
                        + _e("LongitudinalTemporalInformationModified", "00280303", "CS", "MODIFIED")
                        + "</DicomHeader>")
                step = float(thickness)
                for i in range(instances_per_series):
                    sop = _uid(rng)
                    image_type = rng.choice(["AXIAL", "LOCALIZER"])
                    time = f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00"
                    xml = "".join((
                        "<DicomHeader>", head, sop, after_sop,
                        '<ImageType tag="00080008" vr="CS">', image_type, "</ImageType>", after_type, sop, after_sop2,
                        time, after_time,
                        _e("InstanceNumber", "00200013", "IS", str(i + 1)),
                        _e("ImagePositionPatient", "00200032", "DS", "-250", "-250", f"{-i * step:g}"), tail))
                    yield f"/synthetic/{pid}/{study_uid}/{series_uid}/{i:04d}.dcm", xml.encode()


def load(engine: MetaEngine, records: Iterator[tuple[str, bytes]], batch: int = 10000,
         progress: Callable[[int], None] | None = None) -> int:
    """Publish headers as files (no object bytes on any site) through ``create_files``."""
    n = 0
    chunk: list[NewFile] = []
    for path, xml in records:
        key = hashlib.sha256(path.encode()).hexdigest()
        chunk.append(NewFile(path, key, len(xml), "synthetic", {HEADER_XATTR: xml}))
        if len(chunk) >= batch:
            engine.create_files(chunk, replace=True)
            n += len(chunk)
            chunk = []
            if progress:
                progress(n)
    if chunk:
        engine.create_files(chunk, replace=True)
        n += len(chunk)
        if progress:
            progress(n)
    return n
