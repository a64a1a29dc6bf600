"""FDK near the data on a real federation: projections stored as DICOM across two sites, each
site back-projects its share, the coordinator sums and stores the result."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pydicom
import pytest

from dgf import errors, local
from dgf.client import Client
from dgf.dicom.projections import projection_series, read_projection
from ioserver.recon import circular, fdk, phantom
from tests import serving

R = 25.0


def _scan():  # type: ignore[no-untyped-def]
    return circular(40, 500.0, 800.0, (48, 48), (1.6, 1.6), (24, 24, 24), (2.5, 2.5, 2.5))


def test_distributed_fdk_equals_single_node(clinician: Client) -> None:
    g = _scan()
    p = phantom.project(g, R)
    imported = clinician.recon_import(p, g, "/recon/scan1", {"PatientID": "PHANTOM-7", "PatientName": "Shepp^Logan"})
    assert imported.uploaded == 40 and not imported.failed
    sites = {f[3][0] for f in clinician.resolve(["/recon/scan1"])["files"]}
    assert sites == {"site-a", "site-b"}  # the series is spread, so both sites work

    result = clinician.recon("/recon/scan1", "/recon/scan1-fdk", window="hann")
    assert result.sites == ["site-a", "site-b"]
    # The same quantised projections reconstructed in one process.
    stack = np.stack([read_projection(f)[3] for f in projection_series(p, g)])
    single = fdk(stack, g, "hann")
    np.testing.assert_allclose(result.volume, single, atol=1e-5 * float(np.abs(single).max()))
    ref = phantom.voxelize(g, R)
    assert float(np.sqrt(np.mean((result.volume - ref)[:, 10:14, :] ** 2))) < 0.14  # measured 0.126 (coarse case)

    # Stored as a CT series with provenance, under the source's pseudonymous patient.
    slices = clinician.ls("/recon/scan1-fdk")
    assert len(slices) == 24
    provenance = json.loads(clinician.getxattr(slices[0].path, "user.dgf.provenance"))
    assert provenance["source_series"] == "/recon/scan1" and provenance["filter"] == "hann"
    source = clinician.find("/DicomHeader", "/recon/scan1", show=["PatientID"])[0]["values"]["PatientID"]
    out = clinician.find("/DicomHeader[Modality='CT']", "/recon/scan1-fdk", show=["PatientID", "ImageType"])
    assert len(out) == 24 and {r["values"]["PatientID"] for r in out} == {source}
    assert source != "PHANTOM-7"
    xml = clinician.getxattr(slices[0].path, "user.dgf.dicom")
    assert b'creator="DGF RECON 1"' in xml and b"PHANTOM-7" not in xml

    # The slices inherit the projections' identity: identified, the patient is back.
    projection = pydicom.dcmread(io.BytesIO(clinician.read_file(
        clinician.ls("/recon/scan1")[0].path, identified=True)))
    identified = pydicom.dcmread(io.BytesIO(clinician.read_file(slices[0].path, identified=True)))
    assert identified.PatientID == "PHANTOM-7" and str(identified.PatientName) == "Shepp^Logan"
    assert identified.StudyInstanceUID == projection.StudyInstanceUID
    assert identified.SOPInstanceUID == pydicom.dcmread(io.BytesIO(clinician.read_file(slices[0].path))).SOPInstanceUID
    assert np.array_equal(identified.pixel_array, pydicom.dcmread(
        io.BytesIO(clinician.read_file(slices[0].path))).pixel_array)
    with pytest.raises(errors.NoAttribute, match="derived data"):
        clinician.identity_summary(slices[0].path)

    # A second run into the same --out is refused, or replaces the series with --replace.
    with pytest.raises(errors.AlreadyExists, match="already holds 24 file"):
        clinician.recon("/recon/scan1", "/recon/scan1-fdk")
    again = clinician.recon("/recon/scan1", "/recon/scan1-fdk", replace=True)
    assert sorted(s.path for s in clinician.ls("/recon/scan1-fdk")) == sorted(again.paths)
    assert not {s.path for s in slices} & set(again.paths) and len(again.paths) == 24


def test_a_site_lost_mid_task_is_reported_or_replaced_by_a_replica(fresh_federation: local.Federation) -> None:
    g = _scan()
    with Client(fresh_federation.config("admin")) as admin:
        for d in ("/scan", "/kept-fdk"):
            admin.mkdir(d)
        admin.meta.call("admin.replicas.set", path="/scan", copies=1)      # one copy of each projection
        admin.meta.call("admin.replicas.set", path="/kept-fdk", copies=1)  # a result one site can hold
    with Client(fresh_federation.config("clinician")) as c:
        stack = phantom.project(g, R)
        c.recon_import(stack, g, "/scan")
        c.recon_import(stack, g, "/kept")                                  # two copies (the default)
        pid = int(local.status(fresh_federation.root)["processes"]["site-b"]["pid"])
        serving.kill(pid)
        with pytest.raises(errors.TransportError, match="site site-b failed during reconstruction.*no other replica"):
            c.recon("/scan", "/scan-fdk")
        assert sorted(s.path for s in c.ls("/")) == ["/kept", "/kept-fdk", "/scan"]  # nothing half-stored
        # With a second copy of every projection, site-a does site-b's share as well.
        done = c.recon("/kept", "/kept-fdk")
        assert done.sites == ["site-a"]
        assert len(c.ls("/kept-fdk")) == 24
        single = fdk(np.stack([read_projection(f)[3] for f in projection_series(stack, g)]), g, "hann")
        np.testing.assert_allclose(done.volume, single, atol=1e-5 * float(np.abs(single).max()))


def test_recon_of_a_path_without_projections_is_a_clear_error(clinician: Client) -> None:
    clinician.mkdir("/recon-empty", parents=True)
    with pytest.raises(errors.NotFound, match="no projection instances under /recon-empty"):
        clinician.recon("/recon-empty", "/nowhere")


def test_cli_import_and_reconstruct(federation: local.Federation, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys
    from pathlib import Path

    g = circular(24, 500.0, 800.0, (32, 32), (1.6, 1.6), (16, 16, 16), (3.0, 3.0, 3.0))
    np.save(tmp_path / "proj.npy", phantom.project(g, 20.0))
    (tmp_path / "geometry.json").write_text(g.to_json())
    (tmp_path / "bad.json").write_text('{"sid": 500, "sdd": 300}')
    dgf = str(Path(sys.executable).parent / "dgf")
    env = dict(os.environ, DGF_CONFIG=str(federation.config("clinician")))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([dgf, *args], capture_output=True, text=True, env=env)

    imported = run("recon", "import", str(tmp_path / "proj.npy"), str(tmp_path / "geometry.json"), "--to", "/cli-scan")
    assert imported.returncode == 0, imported.stderr
    assert "imported 24 projection(s) to /cli-scan" in imported.stdout
    bad = run("recon", "import", str(tmp_path / "proj.npy"), str(tmp_path / "bad.json"), "--to", "/x")
    assert bad.returncode == 2 and "geometry field" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    done = run("recon", "/cli-scan", "--out", "/cli-fdk", "--shape", "8,8,8", "--filter", "cosine")
    assert done.returncode == 0, done.stderr
    assert "reconstructed 8x8x8 from 24 projections" in done.stdout and "site site-" in done.stderr
    assert len(run("ls", "/cli-fdk").stdout.split()) == 8
    twice = run("recon", "/cli-scan", "--out", "/cli-fdk", "--shape", "8,8,8")
    assert twice.returncode == 3 and "pass --replace" in twice.stderr
    replaced = run("recon", "/cli-scan", "--out", "/cli-fdk", "--shape", "8,8,8", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert len(run("ls", "/cli-fdk").stdout.split()) == 8
    wrong = run("recon", "/cli-scan", "--out", "/y", "--shape", "8,8")
    assert wrong.returncode == 2 and "three positive integers" in wrong.stderr
