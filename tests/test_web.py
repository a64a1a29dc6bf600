"""The archive over DICOMweb and in the browser (issue 15): ``dgf web serve`` on a real federation,
driven by dicomweb-client (QIDO-RS, WADO-RS, STOW-RS), plain HTTP for what clients must not be
able to do, and a headless Chromium running the OHIF viewer the server ships."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from dgf import local
from dgf.client import Client
from tests import corpus, serving, tlscerts

BIN = Path(sys.executable).parent
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class WebNode:
    """A running ``dgf web serve`` and its tokens."""

    def __init__(self, fed: local.Federation, name: str = "web", extra: str = "") -> None:
        self.fed = fed
        self.port = serving.free_port()
        self.conf = fed.root / f"{name}.conf"
        self.conf.write_text(f"[web]\nlisten = 127.0.0.1:{self.port}\ntokens = {name}-tokens.json\n"
                             f"spool = {name}-spool\n" + extra)
        self.scheme = "https" if "certificate" in extra else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.tokens = {who: self.token(who, who) for who in ("clinician", "researcher")}
        self.tokens["identified"] = self.token("identified", "clinician", "--identified")
        self.tokens["researcher-identified"] = self.token("researcher-identified", "researcher", "--identified")
        ready = fed.root / f"{name}.addr"
        ready.unlink(missing_ok=True)
        self.log_path = fed.root / "logs" / f"{name}.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(BIN / "dgf"), "web", "serve", "--config", str(self.conf),
                                      "--ready-file", str(ready)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 300          # the first start fetches the viewer
        while not ready.exists():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "dgf web serve did not start"
            time.sleep(0.1)

    def token(self, name: str, principal: str, *flags: str) -> str:
        done = subprocess.run([str(BIN / "dgf"), "web", "token", "create", name, "--config", str(self.conf),
                               "--principal", str(self.fed.config(principal)), *flags],
                              capture_output=True, text=True, check=True)
        return done.stdout.strip()

    def client(self, who: str, **kw: object) -> DICOMwebClient:
        return DICOMwebClient(f"{self.url}/dicomweb", headers={"Authorization": f"Bearer {self.tokens[who]}"},
                              **kw)  # type: ignore[arg-type]

    def get(self, path: str, who: str | None = "researcher", **headers: str) -> requests.Response:
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        return requests.get(self.url + path, headers=headers, timeout=30)

    def stop(self) -> None:
        serving.stop(self.proc)
        self.log.close()


def _series(out: Path, name: str, n: int) -> list[Path]:
    """``n`` instances of one new series of one new study, made from a real corpus file."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = pydicom.dcmread(corpus.file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        if "ImagePositionPatient" in ds:
            ds.ImagePositionPatient = [0, 0, float(i)]
        ds.save_as(out / f"{i}.dcm")
        paths.append(out / f"{i}.dcm")
    return paths


KINDS = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
         "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "emri_small.dcm"]


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebNode]:
    root = tmp_path_factory.mktemp("web")
    fed = local.up(root / "fed")
    sources = _series(root / "ct", "CT_small.dcm", 5)
    for kind in KINDS[1:]:
        sources += _series(root / kind, kind, 1)
    with Client(fed.config("clinician")) as c:
        report = c.upload(sources)
        assert not report.failed, report.failed
    node = WebNode(fed)
    node.sources = sources  # type: ignore[attr-defined]
    yield node
    node.stop()
    local.down(fed.root, quiet=True)


def _uid(ds: dict, tag: str) -> str:
    return str(ds[tag]["Value"][0])


def _study_of(web: WebNode, modality: str) -> dict:
    """The fixture's study of ``modality`` (for CT, the five-instance series; tests may add more)."""
    found = web.client("researcher").search_for_studies(search_filters={"ModalitiesInStudy": modality})
    if modality == "CT":
        found = [s for s in found if s["00201208"]["Value"] == [5]]
    assert len(found) == 1, found
    return found[0]


def test_qido_answers_from_the_index_with_dicom_matching(web: WebNode) -> None:
    dw = web.client("researcher")
    studies = dw.search_for_studies()
    assert len(studies) == len(KINDS)
    ct = _study_of(web, "CT")
    assert ct["00201208"]["Value"] == [5] and ct["00201206"]["Value"] == [1]      # instances, series
    assert ct["00080061"]["Value"] == ["CT"]
    # The index holds de-identified headers only: no original name can match or come back.
    original = str(pydicom.dcmread(corpus.file("CT_small.dcm")).PatientName)
    assert original not in json.dumps(studies)
    assert dw.search_for_studies(search_filters={"PatientName": original}) == []
    study = _uid(ct, "0020000D")
    series = dw.search_for_series(study)
    assert len(series) == 1 and series[0]["00201209"]["Value"] == [5]
    instances = dw.search_for_instances(study, _uid(series[0], "0020000E"))
    assert sorted(i["00200013"]["Value"][0] for i in instances) == [1, 2, 3, 4, 5]
    # Paging, wildcards, a date range, a UID list, includefield.
    page = dw.search_for_instances(study, _uid(series[0], "0020000E"), limit=2, offset=1)
    assert len(page) == 2 and {p["00080018"]["Value"][0] for p in page} < {i["00080018"]["Value"][0] for i in instances}
    assert len(dw.search_for_studies(search_filters={"ModalitiesInStudy": "M?"})) == 5
    assert len(dw.search_for_series(search_filters={"Modality": "C*"})) == 1
    date = ct["00080020"]["Value"][0]
    assert [_uid(s, "0020000D") for s in dw.search_for_studies(search_filters={"StudyDate": f"{date}-{date}"})
            if "CT" in s["00080061"]["Value"]] == [study]
    assert dw.search_for_studies(search_filters={"StudyDate": "20990101-"}) == []
    two = [_uid(s, "0020000D") for s in studies[:2]]
    assert sorted(_uid(s, "0020000D") for s in dw.search_for_studies(
        search_filters={"StudyInstanceUID": ",".join(two)})) == sorted(two)
    got = dw.search_for_instances(study, fields=["ImageType", "00280030"])
    assert "00080008" in got[0] and "00280030" in got[0]
    # Sequence matching: the RT dose whose referenced plan is an RT Plan, with the matched item.
    plan = "1.2.840.10008.5.1.4.1.1.481.5"
    with Client(web.fed.config("clinician")) as c:
        assert not c.upload(_series(web.fed.root / "rt", "rtdose.dcm", 1)).failed
    dose = dw.search_for_instances(search_filters={"ReferencedRTPlanSequence.ReferencedSOPClassUID": plan},
                                   fields=["ReferencedRTPlanSequence.ReferencedSOPInstanceUID"])
    assert len(dose) == 1
    item = dose[0]["300C0002"]["Value"][0]
    assert item["00081150"]["Value"] == [plan] and item["00081155"]["Value"][0].startswith("2.25.")
    assert dw.search_for_instances(search_filters={
        "ReferencedRTPlanSequence.ReferencedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}) == []
    # Wildcards inside items, and sequences inside sequences: the RT plan's second control point.
    with Client(web.fed.config("clinician")) as c:
        assert not c.upload(_series(web.fed.root / "rtplan", "rtplan.dcm", 1)).failed
    referring = dw.search_for_instances(search_filters={           # the dose, and the plan itself
        "ReferencedRTPlanSequence.ReferencedSOPClassUID": "1.2.840.10008.5.1.4.1.1.481*"})
    assert sorted(r["00080016"]["Value"][0] for r in referring) == ["1.2.840.10008.5.1.4.1.1.481.2",
                                                                    "1.2.840.10008.5.1.4.1.1.481.5"]
    beams = dw.search_for_instances(search_filters={"BeamSequence.RadiationType": "PHOT*",
                                                    "BeamSequence.ControlPointSequence.ControlPointIndex": "1"},
                                    fields=["BeamSequence.BeamType"])
    assert len(beams) == 1
    beam = beams[0]["300A00B0"]["Value"][0]
    assert beam["300A00C4"]["Value"] == ["STATIC"] and beam["300A00C6"]["Value"] == ["PHOTON"]
    assert beam["300A0111"]["Value"][0]["300A0112"]["Value"] == [1]
    assert dw.search_for_instances(search_filters={"BeamSequence.ControlPointSequence.ControlPointIndex": "7"}) == []
    assert web.get("/dicomweb/instances?BeamSequence.RadiationType.Modality=CT").status_code == 400
    # Mistakes are named, with a 400.
    bad = web.get("/dicomweb/studies?NoSuchAttribute=1")
    assert bad.status_code == 400 and "NoSuchAttribute" in bad.json()["error"]
    assert web.get("/dicomweb/studies?limit=many").status_code == 400


def test_wado_returns_the_verified_de_identified_instances(web: WebNode) -> None:
    dw = web.client("researcher")
    with Client(web.fed.config("researcher")) as c:
        archived = {pydicom.dcmread(DicomBytesIO(c.read_file(r["path"]))).SOPInstanceUID: c.read_file(r["path"])
                    for r in c.find("/DicomHeader", "/")}
    seen = 0
    for study in dw.search_for_studies():
        for inst in dw.search_for_instances(_uid(study, "0020000D")):
            st, se, sop = _uid(inst, "0020000D"), _uid(inst, "0020000E"), _uid(inst, "00080018")
            # As stored (transfer-syntax=*): the archive's exact bytes.
            r = requests.get(f"{web.url}/dicomweb/studies/{st}/series/{se}/instances/{sop}", timeout=30, headers={
                "Authorization": f"Bearer {web.tokens['researcher']}",
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
            assert r.status_code == 200
            body = r.content
            assert archived[sop] in body
            # No transfer syntax named: Explicit VR Little Endian, transcoded (decompressed) here.
            default = web.get(f"/dicomweb/studies/{st}/series/{se}/instances/{sop}",
                              Accept='multipart/related; type="application/dicom"')
            assert default.status_code == 200
            part = default.content.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
            ds = pydicom.dcmread(DicomBytesIO(part))
            assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE and ds.SOPInstanceUID == sop   # same instance
            stored = pydicom.dcmread(DicomBytesIO(archived[sop]))
            if "PixelData" in stored:
                assert np.array_equal(ds.pixel_array, stored.pixel_array)
            else:                                            # the RT plan: no pixels, same attributes
                assert [e.tag for e in ds] == [e.tag for e in stored]
                assert ds.BeamSequence[0].BeamType == stored.BeamSequence[0].BeamType
            seen += 1
    assert seen == len(archived) >= 4 + len(KINDS)
    study = _uid(_study_of(web, "CT"), "0020000D")
    assert len(dw.retrieve_study(study)) == 5
    assert web.get(f"/dicomweb/studies/{generate_uid()}").status_code == 404


def test_metadata_comes_from_the_headers_and_frames_from_the_pixels(web: WebNode) -> None:
    dw = web.client("researcher")
    for study in dw.search_for_studies():
        st = _uid(study, "0020000D")
        for inst in dw.search_for_instances(st):
            se, sop = _uid(inst, "0020000E"), _uid(inst, "00080018")
            ds = dw.retrieve_instance(st, se, sop)
            meta = dw.retrieve_instance_metadata(st, se, sop)
            if "PixelData" not in ds:                        # the RT plan: no image, no frames
                assert meta["00080018"]["Value"] == [sop] and "00280010" not in meta
                continue
            assert meta["00080018"]["Value"] == [sop] and meta["00280010"]["Value"] == [ds.Rows]
            assert "7FE00010" not in meta
            count = int(ds.get("NumberOfFrames", 1) or 1)
            # Native frames (transcoded when stored compressed) equal the decoded pixels.
            frames = dw.retrieve_instance_frames(st, se, sop, list(range(1, count + 1)))
            pixels = ds.pixel_array.reshape(count, -1)
            for i, frame in enumerate(frames):
                assert np.frombuffer(frame, dtype=pixels.dtype.newbyteorder("<")).tolist() == pixels[i].tolist()
            # As stored: compressed frames come back as the encapsulated fragments.
            if not ds.file_meta.TransferSyntaxUID.is_compressed:
                continue
            raw = dw.retrieve_instance_frames(st, se, sop, [1], media_types=(("application/octet-stream", "*"),))
            from pydicom.encaps import generate_frames
            assert raw[0] == next(generate_frames(ds.PixelData, number_of_frames=count))
    # Rendered: an image of the frame's size, windowed as asked.
    st = _uid(_study_of(web, "CT"), "0020000D")
    inst = dw.search_for_instances(st)[0]
    se, sop = _uid(inst, "0020000E"), _uid(inst, "00080018")
    from PIL import Image
    png = dw.retrieve_instance_rendered(st, se, sop, media_types=("image/png",))
    image = Image.open(io.BytesIO(png))
    assert image.size == (128, 128) and image.mode == "L"
    narrow = Image.open(io.BytesIO(dw.retrieve_instance_rendered(
        st, se, sop, media_types=("image/png",), params={"window": "40,1"})))
    assert set(np.asarray(narrow).ravel().tolist()) <= {0, 255}      # a 1-wide window is binary
    assert web.get(f"/dicomweb/studies/{st}/series/{se}/instances/{sop}/frames/2").status_code == 404
    assert web.get(f"/dicomweb/studies/{st}/series/{se}/instances/{sop}/frames/x").status_code == 400
    # Hostile values: '²' passes str.isdigit() and fails int() (was a 500); a frame list longer
    # than the instance cost a decode per item (20,000 mentions of frame 1: 17 s, answered 200).
    base = f"/dicomweb/studies/{st}/series/{se}/instances/{sop}"
    for path in ("/dicomweb/studies?limit=\u00b2", "/dicomweb/studies?offset=\u00b2",
                 f"{base}/frames/\u00b2", f"{base}/frames/" + ",".join(["1"] * 20_000)):
        t0 = time.monotonic()
        refused = web.get(path)
        assert refused.status_code == 400 and time.monotonic() - t0 < 5, (path[-40:], refused.text)
    assert "2 frame numbers were asked of an instance with 1" in web.get(f"{base}/frames/1,1").text
    assert web.get(f"{base}/rendered?quality=\u00b2", Accept="image/png").status_code == 200   # the default
    nul = requests.get(web.url + "/index.html%00", allow_redirects=False, timeout=30)
    assert nul.status_code == 303 and nul.headers["location"] == "/login"        # not a file; sign in
    assert "Traceback" not in web.log_path.read_text(errors="replace")


def test_thumbnails_of_a_study_a_series_an_instance_and_a_frame(web: WebNode, tmp_path: Path) -> None:
    """PS3.18 thumbnail resources: a study's or a series' is its representative instance's
    rendering (a study whose first series holds no pixels goes on to the next), fitted in 128
    pixels and never enlarged unless a viewport asks; an instance's keeps its aspect."""
    from PIL import Image

    def image(response: requests.Response, media: str = "image/jpeg") -> Image.Image:
        assert response.status_code == 200 and response.headers["content-type"] == media, response.text
        return Image.open(io.BytesIO(response.content))

    out = tmp_path / "thumbs"
    out.mkdir()
    study = generate_uid()
    ct = pydicom.dcmread(corpus.file("CT_small.dcm"))
    plan = pydicom.dcmread(corpus.file("rtplan.dcm"))
    plan.PatientID, plan.PatientName = ct.PatientID, ct.PatientName
    for ds, number in ((plan, 1), (ct, 2)):               # the series without pixels comes first
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = number
        ds.save_as(out / f"{number}.dcm")
    with Client(web.fed.config("clinician")) as c:
        assert not c.upload([out / "1.dcm", out / "2.dcm"], to="/thumbs").failed
        rows = c.find("/DicomHeader", "/thumbs", show=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                       "Modality"])
        frames10 = c.find("/DicomHeader[NumberOfFrames=10 and Rows=64]", "/",
                          show=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    ids = {r["values"]["Modality"]: [r["values"][k] for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                               "SOPInstanceUID")] for r in rows}
    st, ct_se, ct_sop = ids["CT"]
    _, plan_se, _ = ids["RTPLAN"]
    base = "/dicomweb/studies"
    rendered = web.get(f"{base}/{st}/series/{ct_se}/instances/{ct_sop}/rendered", Accept="image/png")
    # The study's: past the plan's series, the CT's rendering (128 x 128 fits as it is).
    thumb = web.get(f"{base}/{st}/thumbnail", Accept="image/png")
    assert image(thumb, "image/png").size == (128, 128) and thumb.content == rendered.content
    assert image(web.get(f"{base}/{st}/thumbnail")).mode == "L"                      # JPEG by default
    assert image(web.get(f"{base}/{st}/series/{ct_se}/thumbnail?viewport=64,32")).size == (32, 32)
    none = web.get(f"{base}/{st}/series/{plan_se}/thumbnail")
    assert none.status_code == 404 and "no pixel data" in none.text
    # An instance 256 wide and 1024 high keeps its aspect.
    nm = _study_of(web, "NM")
    [inst] = web.client("researcher").search_for_instances(_uid(nm, "0020000D"))
    nm_path = f"{base}/{_uid(nm, '0020000D')}/series/{_uid(inst, '0020000E')}/instances/{_uid(inst, '00080018')}"
    assert image(web.get(f"{nm_path}/thumbnail")).size == (32, 128)
    # A frame's: 64 x 64 stays 64 x 64, the frame's own rendering; a viewport enlarges it.
    [(fst, fse, fsop)] = {tuple(r["values"][k] for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
                          for r in frames10}
    frame = f"{base}/{fst}/series/{fse}/instances/{fsop}/frames/3"
    small = web.get(f"{frame}/thumbnail", Accept="image/png")
    assert image(small, "image/png").size == (64, 64)
    assert small.content == web.get(f"{frame}/rendered", Accept="image/png").content
    assert small.content != web.get(f"{frame.replace('/3', '/1')}/thumbnail", Accept="image/png").content
    assert image(web.get(f"{frame}/rendered?viewport=128,128")).size == (128, 128)
    assert web.get(f"{frame},x/rendered").status_code == 400            # a rendered list is checked whole
    assert image(web.get(f"{frame},1/thumbnail", Accept="image/png"), "image/png").tobytes() == \
        Image.open(io.BytesIO(small.content)).tobytes()                 # a thumbnail's list: its first frame
    # Refused with a reason: viewports out of bounds or malformed, a type not rendered, no study.
    for bad in ("0,10", "10,99999", "a,b", "1,2,3", "1,2,0,0,1,1"):
        refused = web.get(f"{base}/{st}/thumbnail?viewport={bad}")
        assert refused.status_code == 400 and "viewport" in refused.text, (bad, refused.text)
    assert web.get(f"{base}/{st}/thumbnail", Accept="image/gif").status_code == 406
    assert web.get(f"{base}/{generate_uid()}/thumbnail").status_code == 404
    # Not a pattern, nor XPath: a study's thumbnail is of the study the URL names, or none.
    for study_part in ("*", "1.2*", "1'or'1", f"{st}' or '1'='1"):
        assert web.get(f"{base}/{study_part}/thumbnail").status_code == 404, study_part
    assert web.get(f"{base}/{st}/series/{_uid(inst, '0020000E')}/thumbnail").status_code == 404  # NM's series
    assert "Traceback" not in web.log_path.read_text(errors="replace")


def test_a_series_thumbnail_is_its_middle_instance_by_number(web: WebNode, tmp_path: Path) -> None:
    """Files are named by SOP Instance UID, so the middle by path is any slice: a series'
    thumbnail is of its middle instance by Instance Number, found by the index when numbers start
    at 1, and from the headers when they do not (here 3-9, where the 4 that a series numbered
    from 1 would have in its middle is the second)."""
    study = generate_uid()
    for first in (1, 3):
        out = tmp_path / str(first)
        out.mkdir()
        series = generate_uid()
        for i in range(7):
            ds = pydicom.dcmread(corpus.file("CT_small.dcm"))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber, ds.SeriesNumber = first + i, first
            pixels = ds.pixel_array
            pixels[8 * i:8 * i + 8, :] = pixels.min()           # a dark band: each slice renders apart
            ds.PixelData = pixels.tobytes()
            ds.save_as(out / f"{i}.dcm")
    with Client(web.fed.config("clinician")) as c:
        assert not c.upload(sorted(tmp_path.rglob("*.dcm")), to="/middles").failed
        rows = c.find("/DicomHeader", "/middles", show=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                        "InstanceNumber"])
    assert len(rows) == 14
    base = "/dicomweb/studies"
    by_series: dict[str, list[dict]] = {}
    for r in rows:
        by_series.setdefault(r["values"]["SeriesInstanceUID"], []).append(r["values"])
    assert sorted(min(int(v["InstanceNumber"]) for v in mine) for mine in by_series.values()) == [1, 3]
    for se, mine in by_series.items():
        first = min(int(v["InstanceNumber"]) for v in mine)
        [st] = {v["StudyInstanceUID"] for v in mine}
        thumbs = {int(v["InstanceNumber"]): web.get(f"{base}/{st}/series/{se}/instances/{v['SOPInstanceUID']}"
                                                    "/thumbnail", Accept="image/png").content for v in mine}
        assert len(set(thumbs.values())) == 7                    # the slices render apart
        got = web.get(f"{base}/{st}/series/{se}/thumbnail", Accept="image/png")
        assert got.status_code == 200 and got.content == thumbs[first + 3], first


def test_identity_only_for_identified_tokens_of_principals_who_may_see_it(web: WebNode) -> None:
    ct = _study_of(web, "CT")
    st = _uid(ct, "0020000D")
    original = str(pydicom.dcmread(corpus.file("CT_small.dcm")).PatientName)
    got = web.client("identified").retrieve_study(st)
    assert {str(ds.PatientName) for ds in got} == {original}
    assert original not in {str(ds.PatientName) for ds in web.client("clinician").retrieve_study(st)}
    refused = web.get(f"/dicomweb/studies/{st}", who="researcher-identified",
                      Accept='multipart/related; type="application/dicom"; transfer-syntax=*')
    assert refused.status_code == 403, refused.text
    assert original not in refused.text
    with Client(web.fed.config("admin")) as admin:
        actions = [e for e in admin.audit_log(limit=500) if "identit" in json.dumps(e)]
    assert actions, "identified releases are audited"


def test_stow_de_identifies_through_the_upload_pipeline(web: WebNode, tmp_path: Path) -> None:
    sources = _series(tmp_path / "stow", "CT_small.dcm", 3)
    dw = web.client("clinician")
    reply = dw.store_instances([pydicom.dcmread(p) for p in sources])
    refs = reply.ReferencedSOPSequence
    assert len(refs) == 3 and "FailedSOPSequence" not in reply
    assert {r.ReferencedSOPInstanceUID for r in refs} == {pydicom.dcmread(p).SOPInstanceUID for p in sources}
    assert all(r.WarningReason == 0xB000 for r in refs)            # coerced: de-identified
    url = refs[0].RetrieveURL
    st = url.split("/studies/")[1].split("/")[0]
    stored = web.client("researcher").retrieve_study(st)
    assert len(stored) == 3
    original = str(pydicom.dcmread(sources[0]).PatientName)
    assert all(str(ds.PatientName) != original and ds.PatientIdentityRemoved == "YES" for ds in stored)
    # Sending again is idempotent.
    assert len(dw.store_instances([pydicom.dcmread(p) for p in sources]).ReferencedSOPSequence) == 3
    # The same new instance twice in one request (a retried part): both stored, neither failed
    # (the second was "not stored", 0x0110, though its twin was).
    twice = _series(tmp_path / "twice", "CT_small.dcm", 1)[0]
    reply = dw.store_instances([pydicom.dcmread(twice), pydicom.dcmread(twice)])
    assert len(reply.ReferencedSOPSequence) == 2 and "FailedSOPSequence" not in reply
    # A researcher may not store; nothing arrives.
    more = _series(tmp_path / "more", "CT_small.dcm", 1)
    with pytest.raises(requests.HTTPError) as refused:
        web.client("researcher").store_instances([pydicom.dcmread(more[0])])
    assert refused.value.response.status_code == 403
    # Storing into the wrong study's URL fails that instance (0xA900).
    with pytest.raises(requests.HTTPError) as wrong:
        dw.store_instances([pydicom.dcmread(more[0])], study_instance_uid=generate_uid())
    answer = wrong.value.response
    assert answer.status_code == 409 and "00081199" not in answer.json()
    assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]


def _post(web: WebNode, body: bytes, who: str = "clinician", ctype: str | None = None,
          **headers: str) -> requests.Response:
    headers.setdefault("Authorization", f"Bearer {web.tokens[who]}")
    headers["Content-Type"] = ctype or 'multipart/related; type="application/dicom"; boundary=XX'
    return requests.post(f"{web.url}/dicomweb/studies", data=body, headers=headers, timeout=30)


def test_hostile_requests_are_refused_and_leave_nothing(web: WebNode, tmp_path: Path) -> None:
    part = _series(tmp_path / "h", "CT_small.dcm", 1)[0].read_bytes()
    with Client(web.fed.config("researcher")) as c:
        before = c.find_count("/DicomHeader")
    # Truncated body, no parts, wrong media type, a body over max_body_mb (no read of it).
    cut = b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + part[: len(part) // 2]
    assert _post(web, cut).status_code == 400
    assert _post(web, b"garbage").status_code == 400
    assert _post(web, b"{}", ctype="application/json").status_code == 415
    huge = requests.post(f"{web.url}/dicomweb/studies", timeout=30, headers={
        "Authorization": f"Bearer {web.tokens['clinician']}", "Content-Length": str(1 << 40),
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'}, data=b"")
    assert huge.status_code in (400, 413)
    # A part that is not DICOM fails alone, with a reason.
    junk = b"--XX\r\nContent-Type: application/dicom\r\n\r\nnot dicom at all\r\n--XX--\r\n"
    failed = _post(web, junk)
    assert failed.status_code == 409 and "00081198" in failed.json()
    assert not any((web.fed.root / "web-spool").iterdir())           # nothing half-written stays
    with Client(web.fed.config("researcher")) as c:
        assert c.find_count("/DicomHeader") == before
    # Tokens: none, wrong, revoked; a cookie is honoured for reads only.
    assert web.get("/dicomweb/studies", who=None).status_code == 401
    assert web.get("/dicomweb/studies", who=None, Authorization="Bearer dgf_nope").status_code == 401
    spare = web.token("spare", "clinician")
    ok = requests.get(f"{web.url}/dicomweb/studies", headers={"Authorization": f"Bearer {spare}"}, timeout=10)
    assert ok.status_code == 200
    subprocess.run([str(BIN / "dgf"), "web", "token", "revoke", "spare", "--config", str(web.conf)], check=True)
    gone = requests.get(f"{web.url}/dicomweb/studies", headers={"Authorization": f"Bearer {spare}"}, timeout=10)
    assert gone.status_code == 401
    cookie = {"dgf_token": web.tokens["clinician"]}
    assert requests.get(f"{web.url}/dicomweb/studies", cookies=cookie, timeout=10).status_code == 200
    csrf = requests.post(f"{web.url}/dicomweb/studies", cookies=cookie, data=b"x", timeout=10,
                         headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'})
    assert csrf.status_code == 401
    # Signing in: a wrong token is refused; a right one gets an HttpOnly, SameSite=Strict cookie.
    assert requests.post(f"{web.url}/login", data={"token": "dgf_wrong"}, timeout=10).status_code == 401
    signed = requests.post(f"{web.url}/login", data={"token": web.tokens["researcher"]}, timeout=10,
                           allow_redirects=False)
    assert signed.status_code == 303
    assert signed.headers["x-frame-options"] == "DENY" and signed.headers["x-content-type-options"] == "nosniff"
    assert "httponly" in signed.headers["set-cookie"].lower() and "samesite=strict" in signed.headers["set-cookie"].lower()
    # Tokens are kept as digests only.
    kept = (web.fed.root / "web-tokens.json").read_text()
    assert web.tokens["clinician"] not in kept and oct((web.fed.root / "web-tokens.json").stat().st_mode)[-3:] == "600"


def test_qido_beyond_find_limit_answers_the_first_with_a_warning(web: WebNode) -> None:
    capped = WebNode(web.fed, "capped", "find_limit = 2\nviewer = off\n")
    try:
        r = capped.get("/dicomweb/studies")
        assert r.status_code == 200 and len(r.json()) == 2
        assert "narrow it" in r.headers.get("warning", "")
        counts = [s["00201208"]["Value"][0] for s in r.json()]
        everything = {_uid(s, "0020000D"): s["00201208"]["Value"][0] for s in web.client("researcher").search_for_studies()}
        assert counts == [everything[_uid(s, "0020000D")] for s in r.json()]      # the entities shown are whole
        one = capped.get(f"/dicomweb/studies?StudyInstanceUID={_uid(r.json()[0], '0020000D')}")
        assert len(one.json()) == 1 and "warning" not in one.headers
        # Item keys the index cannot answer cost a header read per candidate file: bounded too.
        wild = capped.get("/dicomweb/instances?BeamSequence.RadiationType=PHOT*")
        assert wild.status_code == 413 and "header" in wild.json()["error"]
    finally:
        capped.stop()


def test_a_study_list_page_reads_its_studies_not_the_archive(web: WebNode, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A viewer's first query (``/studies?limit=101``) stops once it has its studies, yet counts
    every file of each: those stored after the next study are found by the studies' UIDs."""
    from dgf import dimse

    # Study Z: a CT series, then study W of the same patient, then an MR series of Z.
    z1, w, z2 = (_series(tmp_path / n, "CT_small.dcm", k) for n, k in (("z1", 2), ("w", 1), ("z2", 1)))
    study = pydicom.dcmread(z1[0]).StudyInstanceUID
    for p in [*z1, *w, *z2]:
        ds = pydicom.dcmread(p)
        ds.PatientID = "DGF-STUDY-LIST"
        if p in z2:
            ds.StudyInstanceUID, ds.Modality = study, "MR"
        ds.save_as(p)
    with Client(web.fed.config("clinician")) as c:
        for batch in (z1, w, z2):
            report = c.upload(batch)
            assert not report.failed, report.failed
        patient = c.find("/DicomHeader", report.stored[str(z2[0])][0], show=["PatientID"])[0]["values"]["PatientID"]

    def studies(query: str) -> list[tuple[list[str], int, int]]:
        r = web.get(f"/dicomweb/studies?PatientID={patient}&{query}")
        assert r.status_code == 200, r.text
        return [(s["00080061"]["Value"], s["00201208"]["Value"][0], s["00201206"]["Value"][0]) for s in r.json()]

    z, only_w = (["CT", "MR"], 3, 2), (["CT"], 1, 1)
    assert studies("limit=1") == [z]
    assert studies("limit=1&offset=1") == [only_w]
    assert studies("limit=5") == [z, only_w]
    # Modalities in study: any of them, and the study's other files counted all the same.
    assert studies("ModalitiesInStudy=MR&limit=1") == [z]
    assert studies("ModalitiesInStudy=US%5CMR&limit=1") == studies("ModalitiesInStudy=US,MR") == [z]
    assert studies("ModalitiesInStudy=MR%5CCT") == [z, only_w]
    assert studies("ModalitiesInStudy=US") == []
    with Client(web.fed.config("researcher")) as c:
        # C-FIND's path (no truncation) reads a list of modalities the same way, and asks the
        # index for the MR file that picks Z, then for Z's two others: not for W's file.
        rows = 0
        every = c.find_iter

        def all_rows(*args: object, **kw: object) -> Iterator[dict]:
            nonlocal rows
            for row in every(*args, **kw):  # type: ignore[arg-type]
                rows += 1
                yield row
        monkeypatch.setattr(c, "find_iter", all_rows)
        found = dimse.find(c, "STUDY", [dimse.Key("PatientID", "LO", patient),
                                        dimse.Key("ModalitiesInStudy", "CS", "US\\MR")], 10)
        assert [len(e.paths) for e in found.values()] == [3] and rows == 3
        monkeypatch.undo()
        # The first study of the archive, in pages of 1, 2, 4...: the scan stops after the
        # first file of the second study, not at the end of the archive.
        everything = dimse.find(c, "STUDY", [dimse.Key("StudyInstanceUID", "UI", "")], 100)
        received = 0
        scan = c.find_iter

        def counted(*args: object, **kw: object) -> Iterator[dict]:
            nonlocal received
            for row in scan(*args, **kw):  # type: ignore[arg-type]
                received += bool(kw.get("page"))
                yield row
        monkeypatch.setattr(dimse, "FIRST_PAGE", 1)
        monkeypatch.setattr(c, "find_iter", counted)
        first = dimse.find(c, "STUDY", [dimse.Key("StudyInstanceUID", "UI", "")], 1, truncate=True)
        (uid, entity), = first.items()
        ahead = next(iter(everything.values()))
        assert uid == next(iter(everything)) and sorted(entity.paths) == sorted(ahead.paths)
        assert received <= 2 * (len(ahead.paths) + 1) < sum(len(e.paths) for e in everything.values())
        # A page further down: the studies before it are told apart by the index's levels (no
        # values asked for), and only the page's own files come with their values.
        shown = 0

        def counted_shown(*args: object, **kw: object) -> Iterator[dict]:
            nonlocal shown
            for row in scan(*args, **kw):  # type: ignore[arg-type]
                shown += bool(kw.get("show"))
                yield row
        monkeypatch.setattr(c, "find_iter", counted_shown)
        uids = list(everything)
        second = dimse.find(c, "STUDY", [dimse.Key("StudyInstanceUID", "UI", "")], 1, truncate=True, skip=1)
        assert list(second) == [uids[1]] and sorted(second[uids[1]].paths) == sorted(everything[uids[1]].paths)
        assert shown <= 2 * (len(everything[uids[1]].paths) + 1) < len(ahead.paths) + len(everything[uids[1]].paths) + 1
        # A date range is answered by the index: only the range's files come back to be matched.
        dates = [r["values"]["StudyDate"] for r in scan("/DicomHeader", "/", show=["StudyDate"])]
        received = 0
        monkeypatch.setattr(c, "find_iter", counted)
        day = dimse.find(c, "STUDY", [dimse.Key("StudyDate", "DA", f"{dates[0]}-{dates[0]}")], 100, truncate=True)
        assert sum(len(e.paths) for e in day.values()) == dates.count(dates[0]) == received < len(dates)
        assert dimse.xpath_for([dimse.Key("StudyDate", "DA", "-20000131"), dimse.Key("StudyTime", "TM", "07-12")]) \
            == "/DicomHeader[StudyDate <= 20000131]"
        # So are a prefix and a part of a single-valued attribute ('P4*', '*UF3*', '*H75').
        ids = [r["values"]["PatientID"] for r in scan("/DicomHeader", "/", show=["PatientID"])]
        for wildcard, hit, narrowed in (
                (patient[:5] + "*", lambda v: v.startswith(patient[:5]), lambda v: v.startswith(patient[:5])),
                ("*" + patient[3:9] + "*", lambda v: patient[3:9] in v, lambda v: patient[3:9] in v),
                ("*" + patient[-4:], lambda v: v.endswith(patient[-4:]), lambda v: patient[-4:] in v)):
            received = 0
            got = dimse.find(c, "STUDY", [dimse.Key("PatientID", "LO", wildcard)], 100, truncate=True)
            assert sum(len(e.paths) for e in got.values()) == sum(map(hit, ids)), wildcard
            assert received == sum(map(narrowed, ids)) < len(ids), wildcard
        assert dimse.xpath_for([dimse.Key("ImageType", "CS", "ORIG*"), dimse.Key("PatientID", "LO", "P?X*"),
                                dimse.Key("PatientName", "PN", "*A*B*")]) == "/DicomHeader"
    listed = web.get("/dicomweb/studies?limit=100").json()
    for offset in (1, 2, len(listed) - 1, len(listed)):
        page = web.get(f"/dicomweb/studies?limit=2&offset={offset}").json()
        assert [(_uid(s, "0020000D"), s["00201208"]) for s in page] == [
            (_uid(s, "0020000D"), s["00201208"]) for s in listed[offset:offset + 2]]


def test_slow_clients_cannot_hold_every_connection(web: WebNode) -> None:
    # Slowloris: more clients than connection slots, each sending its request head a byte at a
    # time. Each is cut off when its head is late, and a real client still gets its answer.
    small = WebNode(web.fed, "slow", "max_connections = 6\nconnections_per_address = 0\nheader_timeout_s = 2\n"
                                     "viewer = off\n")
    slow: list[socket.socket] = []
    try:
        for _ in range(12):
            s = socket.create_connection(("127.0.0.1", small.port), timeout=10)
            s.sendall(b"GET /dicomweb/studies HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        started = time.monotonic()
        while time.monotonic() - started < 3.5:
            for s in slow:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass
            time.sleep(0.5)
        ok = requests.get(f"{small.url}/dicomweb/studies", timeout=10,
                          headers={"Authorization": f"Bearer {small.tokens['researcher']}"})
        assert ok.status_code == 200, ok.text
        for s in slow:
            s.settimeout(5)
            try:
                assert s.recv(100) == b""            # closed by the server
            except ConnectionResetError:
                pass
    finally:
        for s in slow:
            s.close()
        small.stop()


def test_one_address_cannot_hold_every_connection(web: WebNode) -> None:
    # One client keeping max_connections connections alive with requests (refused ones do)
    # had every other client answered 503.  An address now holds connections_per_address of
    # them (half of max_connections by default); more are closed at once.
    small = WebNode(web.fed, "crowd", "max_connections = 8\nviewer = off\n")
    flood: list[socket.socket] = []

    def answer(s: socket.socket) -> bytes:
        try:
            s.sendall(b"GET /dicomweb/studies HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(5)
            return s.recv(12)
        except OSError:
            return b""                                     # closed (or reset) by the server
    try:
        for _ in range(12):
            flood.append(socket.create_connection(("127.0.0.1", small.port), timeout=10,
                                                  source_address=("127.0.0.2", 0)))
        time.sleep(0.3)
        answers = [answer(s) for s in flood]
        assert answers.count(b"HTTP/1.1 401") == 4 and answers.count(b"") == 8, answers
        ok = requests.get(f"{small.url}/dicomweb/studies", timeout=10,      # another address: served
                          headers={"Authorization": f"Bearer {small.tokens['researcher']}"})
        assert ok.status_code == 200, ok.text
    finally:
        for s in flood:
            s.close()
        small.stop()
    log = small.log_path.read_text()
    assert log.count("refused connections from 127.0.0.2") == 1 and "limit connections_per_address" in log
    # A negative bound would refuse every connection: refused as a config error instead.
    negative = web.fed.root / "negative.conf"
    negative.write_text("[web]\nconnections_per_address = -1\n")
    from dgf import errors
    from dgf.web import WebConfig
    with pytest.raises(errors.ConfigError, match="a .web. limit is negative"):
        WebConfig.load(negative)
    # A server already on the port: one line naming the address, no traceback.
    taken = subprocess.run([str(BIN / "dgf"), "web", "serve", "--config", str(web.conf)],
                           capture_output=True, text=True, timeout=60)
    assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{web.port} (Address already in use)" \
        in taken.stderr and "Traceback" not in taken.stderr, taken.stderr


def test_https_when_given_a_certificate(web: WebNode) -> None:
    crt, pem = tlscerts.issue(web.fed.root, "web")
    tls = WebNode(web.fed, "tls", f"certificate = {crt}\nprivate_key = {pem}\nviewer = off\n")
    try:
        session = requests.Session()
        session.trust_env = False            # else REQUESTS_CA_BUNDLE overrides the session's CA
        session.verify = str(crt)
        dw = tls.client("researcher", session=session)
        assert len(dw.search_for_studies()) >= len(KINDS)
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{tls.url}/dicomweb/studies", timeout=10)          # not trusted without the CA
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{tls.port}/dicomweb/studies", timeout=10)
        signed = session.post(f"{tls.url}/login", data={"token": tls.tokens["researcher"]}, allow_redirects=False)
        assert "secure" in signed.headers["set-cookie"].lower()
    finally:
        tls.stop()


def _chromium() -> object:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)


def test_the_viewer_shows_a_ct_frame_in_a_real_browser(web: WebNode, tmp_path: Path) -> None:
    from PIL import Image
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    ct = _study_of(web, "CT")
    study, pseudonym = _uid(ct, "0020000D"), _uid(ct, "00100020")
    inst = sorted(web.client("researcher").search_for_instances(study), key=lambda i: i["00200013"]["Value"][0])[0]
    reference = Image.open(io.BytesIO(web.client("researcher").retrieve_instance_rendered(
        study, _uid(inst, "0020000E"), _uid(inst, "00080018"), media_types=("image/png",))))
    driver = _chromium()
    try:
        driver.set_page_load_timeout(60)
        driver.get(web.url + "/")                                   # not signed in: the sign-in page
        WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.ID, "token")))
        driver.find_element(By.ID, "token").send_keys(web.tokens["researcher"])
        driver.find_element(By.ID, "signin").click()
        # The study list: every study, by its pseudonym (never a name). The page is replaced as
        # the viewer loads, so an element found a moment ago may be gone: looked up each time.
        patient = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: pseudonym in d.find_element(By.TAG_NAME, "body").text)
        assert patient
        listed = driver.find_element(By.TAG_NAME, "body").text
        assert str(pydicom.dcmread(corpus.file("CT_small.dcm")).PatientName).split("^")[0] not in listed
        driver.get(f"{web.url}/viewer?StudyInstanceUIDs={study}")
        ref = np.asarray(reference, dtype=np.float64)
        h, w = ref.shape
        # The middle of the frame: the viewer's own notices may cover its top and bottom edges.
        middle = (slice(h // 5, -h // 5), slice(w // 5, -w // 5))
        seen: dict[str, float] = {}

        def drawn(d: object) -> bool:
            """Does the viewport show the frame (as the archive renders it) yet?"""
            canvas = driver.find_element(By.CSS_SELECTOR, ".cornerstone-viewport-element canvas, canvas")
            shot = Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("L")
            cw, ch = shot.size
            side = min(cw, ch)
            square = shot.crop(((cw - side) // 2, (ch - side) // 2, (cw + side) // 2, (ch + side) // 2))
            pixels = np.asarray(square.resize(reference.size, Image.BILINEAR), dtype=np.float64)[middle]
            if pixels.std() <= 10:
                return False                                            # blank until drawn
            seen["corr"] = float(np.corrcoef(pixels.ravel(), ref[middle].ravel())[0, 1])
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "viewer.png")
            return seen["corr"] > 0.9
        try:
            WebDriverWait(driver, 90, poll_frequency=1,
                          ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)).until(drawn)
        except TimeoutException:
            pytest.fail(f"the viewer did not show the archive's frame within 90 s "
                        f"(last correlation {seen.get('corr')}; its view is in {tmp_path / 'viewer.png'})")
    finally:
        driver.quit()


def _pixel_bomb(frames: int, size: int) -> pydicom.Dataset:
    """A new instance of ``frames`` blank ``size`` x ``size`` JPEG 2000 frames (~300 bytes each)."""
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(corpus.file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows = ds.Columns = size
    ds.compress(JPEG2000Lossless, np.full((size, size), 100, dtype=np.int16))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.NumberOfFrames, ds.PixelData = frames, encapsulate([frame] * frames)
    return ds


def test_pixel_bombs_are_refused_before_they_are_decoded(web: WebNode) -> None:
    """A 300 KB instance of 1000 blank 4096 x 4096 JPEG 2000 frames declares 32 GiB of pixels:
    one native frame asked of it decoded all 1000 (a MemoryError, or the server killed), as did
    a transcode of it. Only the frames asked for are decoded now, and a request that would
    decode more than 1 GiB, or render a frame of more than 2^25 pixels, is refused (406)."""
    from pydicom.uid import JPEG2000Lossless

    dw = web.client("clinician")
    refs = dw.store_instances([_pixel_bomb(1000, 4096), _pixel_bomb(1, 8192)]).ReferencedSOPSequence
    (st, se, many), (st2, se2, wide) = [r.RetrieveURL.split("/studies/")[1].replace("/series/", "/instances/")
                                    .split("/instances/") for r in refs]
    reader = web.client("researcher")
    t0 = time.monotonic()
    [frame] = reader.retrieve_instance_frames(st, se, many, [500])
    assert time.monotonic() - t0 < 10
    assert np.frombuffer(frame, dtype="<i2").tolist() == [100] * 4096 * 4096
    base = f"/dicomweb/studies/{st}/series/{se}/instances"
    native = {"Accept": f'multipart/related; type="application/octet-stream"; transfer-syntax={EXPLICIT_LE}'}
    refused = [web.get(f"{base}/{many}/frames/" + ",".join(map(str, range(1, 41))), **native),
               web.get(f"{base}/{many}", Accept=f'multipart/related; type="application/dicom"; '
                                                f'transfer-syntax={EXPLICIT_LE}'),
               web.get(f"/dicomweb/studies/{st2}/series/{se2}/instances/{wide}/rendered", Accept="image/png")]
    assert [r.status_code for r in refused] == [406] * 3, [r.text for r in refused]
    assert "would decode to 1342177280 bytes, more than the 1073741824" in refused[0].json()["error"]
    assert "transfer-syntax=*" in refused[0].json()["error"]
    assert "would decode to 33554432000 bytes" in refused[1].json()["error"]
    assert "8192 x 8192 pixels is larger than this server renders" in refused[2].json()["error"]
    # As stored, both come whole: nothing is decoded for that.
    stored = reader.retrieve_instance(st, se, many)
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless and stored.NumberOfFrames == 1000
    status = Path(f"/proc/{web.proc.pid}/status").read_text()
    peak = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    assert peak < 1 << 30
    assert "Traceback" not in web.log_path.read_text(errors="replace")


def _memory(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) << 10 for line in status.splitlines() if line.startswith(field + ":"))


def test_frames_of_a_large_instance_are_read_by_range(web: WebNode, tmp_path: Path) -> None:
    """A viewer asks for a multi-frame instance's frames one request at a time; each request
    read the whole instance (past the 256 MB instance cache, again for every frame) and parsed
    it with pydicom. Frames of a large native instance are now read from the blocks that hold
    them, verified as every read is."""
    from bench import synth

    src = synth.multiframe(tmp_path / "large.dcm", 100 * 1024 * 1024)
    with Client(web.fed.config("clinician")) as c:
        assert not c.upload([src], to="/web-large").failed
        [row] = c.find("/DicomHeader[NumberOfFrames > 100]", "/web-large",
                       show=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "NumberOfFrames"])
    st, se, sop, count = (row["values"][k] for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                      "NumberOfFrames"))
    pixels = pydicom.dcmread(src).PixelData
    size = 512 * 512 * 2
    Path(f"/proc/{web.proc.pid}/clear_refs").write_text("5")         # the peak starts again from now
    before = _memory(web.proc.pid, "VmRSS")
    dw = web.client("researcher")
    frames = dw.retrieve_instance_frames(st, se, sop, [2, int(count)])
    assert frames == [pixels[size:2 * size], pixels[(int(count) - 1) * size:int(count) * size]]
    # Rendered: the header and the one frame, by range; the image is that frame's.
    from PIL import Image
    png = dw.retrieve_instance_frames_rendered(st, se, sop, [5], media_types=("image/png",),
                                               params={"window": "2048,4096"})
    image = np.asarray(Image.open(io.BytesIO(png)))
    head = pydicom.dcmread(src, stop_before_pixels=True)
    frame = np.frombuffer(pixels[4 * size:5 * size], dtype="<i2" if head.PixelRepresentation else "<u2")
    values = frame.reshape(512, 512) * float(head.RescaleSlope) + float(head.RescaleIntercept)
    want = np.clip((values - 2047.5) / 4095 + 0.5, 0, 1) * 255
    assert image.shape == (512, 512) and np.abs(image.astype(np.float64) - want).max() <= 1.0
    # The series' thumbnail: its first frame, by range too, fitted in 128 x 128.
    thumb = web.get(f"/dicomweb/studies/{st}/series/{se}/thumbnail", Accept="image/png")
    assert thumb.status_code == 200, thumb.text
    assert Image.open(io.BytesIO(thumb.content)).size == (128, 128)
    assert _memory(web.proc.pid, "VmHWM") - before < 48 * 1024 * 1024
    # Asked as stored (transfer-syntax=*), the same bytes; a frame past the end is still a 404.
    assert dw.retrieve_instance_frames(st, se, sop, [3], media_types=(("application/octet-stream", "*"),)) == \
        [pixels[2 * size:3 * size]]
    missing = web.get(f"/dicomweb/studies/{st}/series/{se}/instances/{sop}/frames/{int(count) + 1}")
    assert missing.status_code == 404 and "does not exist" in missing.text
    # The whole instance, de-identified and identified, is sent from a spool file a MiB at a
    # time (it was held in memory, the identified one twice: 2-4 GB for a 2 GB instance).
    Path(f"/proc/{web.proc.pid}/clear_refs").write_text("5")
    before = _memory(web.proc.pid, "VmRSS")
    assert dw.retrieve_instance(st, se, sop).PixelData == pixels
    identified = web.client("identified").retrieve_instance(st, se, sop)
    assert identified.PixelData == pixels
    assert str(identified.PatientName) == str(pydicom.dcmread(src, stop_before_pixels=True).PatientName)
    assert _memory(web.proc.pid, "VmHWM") - before < 128 * 1024 * 1024      # ~55 MB; 449 MB before
    assert not list(Path(tempfile.gettempdir(), "dgf-spool").glob("*"))     # nothing left spooled
