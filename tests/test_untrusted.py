"""Untrusted sites hold only ciphertext (issue 13): objects placed there are sealed by the
uploading client under a key per study, the metaserver checks what it is shown of the
plaintext, readers unseal with keys released beside their capabilities, and erasing a patient
destroys the keys (crypto-shredding).  Real servers, real corpus files."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import synth
from dgf import envelope, errors, local
from dgf.client import Client, UploadReport
from dgf.reader import ObjectRef
from dgf.transport import PutItem
from dgf.types import Site
from dgf.upload import Uploads, _Prepared
from ioserver.server import KEY_REFRESH_S
from tests import corpus

UNTRUSTED = "site-b"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.Federation]:
    fed = local.up(tmp_path_factory.mktemp("untrusted") / "fed")
    with Client(fed.config("admin")) as admin:
        admin.meta.call("admin.site.trust", site=UNTRUSTED, untrusted=True)
        admin.mkdir("/plain")
        admin.meta.call("admin.replicas.set", path="/plain", copies=1)      # one copy, on site-a
    time.sleep(KEY_REFRESH_S + 1)          # the site learns it is untrusted with the enrolled keys
    yield fed
    local.down(fed.root, quiet=True)


def _store(fed: local.Federation, site: str) -> list[Path]:
    return [p for p in (fed.root / f"store-{site}" / "objects").rglob("*") if p.is_file()]


def test_an_untrusted_site_holds_only_ciphertext_and_readers_get_every_byte_back(
        fed: local.Federation, tmp_path: Path) -> None:
    sources = [f for n in ("CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                           "JPEG2000.dcm") for f in corpus.fresh_instances(tmp_path / "corpus", 1, n)]
    sources += [synth.multiframe(tmp_path / "native.dcm", 5 << 20),             # holes: pixel blocks
                synth.multiframe(tmp_path / "rle.dcm", 3 << 20, encapsulated=True),
                synth.multiframe(tmp_path / "streamed.dcm", 40 << 20, seed=9)]   # de-identified streaming
    with Client(fed.config("clinician")) as c:
        report = c.upload(sources, to="/sealed", site=UNTRUSTED)
        assert report.uploaded == len(sources) and not report.failed, report.failed
        paths = sorted(report.paths)
        plain = {p: c.read_file(p) for p in paths}
        # Re-identification goes through the seal: the exact original comes back.
        originals = {src.read_bytes() for src in sources}
        assert {c.read_file(p, identified=True) for p in paths} == originals
        pseudonyms = {row["path"]: row["values"]["PatientID"] for row in c.find("/DicomHeader", "/sealed",
                                                                                 show=["PatientID"])}

    stored = _store(fed, UNTRUSTED)
    assert len(stored) == len(sources)
    for obj in stored:
        data = obj.read_bytes()
        assert envelope.trailer_of(data) is not None and data[128:132] != b"DICM"
        # Nothing of any plaintext is readable there: no UID, no pseudonym.
        for p in paths:
            for text in (p.rsplit("/", 1)[1][:-4], pseudonyms[p]):
                assert text.encode() in plain[p] and text.encode() not in data
    # The trusted site's copies (two copies with two sites) are the same sealed objects.
    assert {p.name for p in _store(fed, "site-a")} == {p.name for p in stored}

    with Client(fed.config("researcher")) as r:
        for p in paths:
            assert r.stat(p).size == len(plain[p])
        found = {row["path"] for row in r.find("/DicomHeader[PatientIdentityRemoved='YES']", "/sealed")}
        assert found == set(paths)            # headers derived by the metaserver, indexed
        got = r.download(["/sealed"], tmp_path / "down")
        assert got.downloaded == len(paths) and not got.failed
        for p in paths:
            assert (tmp_path / "down" / p.lstrip("/")).read_bytes() == plain[p]
        # Ranged reads authenticate and decrypt just the chunks they need.
        for ref in ObjectRef.all_of(r.resolve(["/sealed"])):
            whole = plain[ref.path]
            for off, n in ((0, 132), (len(whole) // 2, 4 << 20), (len(whole) - 7, 7), (70_000, 65_520)):
                assert r.reader.read(ref, off, n) == whole[off:off + n], (ref.path, off, n)


def _deidentified(c: Client, tmp_path: Path) -> bytes:
    """A file stored unsealed (on the trusted site only)."""
    c.upload(corpus.fresh_instances(tmp_path / "src", 1), to="/plain", site="site-a")
    data = c.read_file(c.ls("/plain")[-1].path)
    assert envelope.trailer_of(data) is None and c.ls("/plain")[-1].object_key == hashlib.sha256(data).hexdigest()
    return data


def test_writers_cannot_give_an_untrusted_site_plaintext_nor_the_metaserver_a_false_plaintext(
        fed: local.Federation, tmp_path: Path) -> None:
    with Client(fed.config("clinician")) as c:
        clean = _deidentified(c, tmp_path)
        # A plaintext object, even de-identified, is refused by the untrusted site itself.
        prep = c.meta.call("up.prepare", uids=[], patients=[])[0]
        c._learn_sites([Site.from_wire(s) for s in prep["sites"]])
        got: list[tuple[str | None, str | None]] = []
        key = hashlib.sha256(clean).hexdigest()
        c.site_link(UNTRUSTED).put_many([PutItem(key, clean)], prep["caps"][UNTRUSTED],
                                        lambda item, receipt, error: got.append((receipt, error)))
        assert got[0][0] is None and "stores sealed objects only" in str(got[0][1])
        assert not any(p.name == key for p in _store(fed, UNTRUSTED))

    class Tampered(Uploads):
        """Shows the metaserver one plaintext and seals another."""

        def _sealed(self, prepared: list[_Prepared], report: UploadReport) -> list[_Prepared]:
            out = super()._sealed(prepared, report)
            for p in out:
                if p.seal is not None:
                    shown = bytearray(base64.b64decode(p.seal["shown"]))
                    at = shown.find(b"ANONYMIZED")
                    shown[at:at + 10] = b"J.DOE^JOHN"
                    p.seal["shown"] = base64.b64encode(bytes(shown)).decode()
            return out

    with Client(fed.config("clinician")) as t, \
            pytest.raises(errors.PolicyRefused, match="not what the sealed object holds"):
        t.uploads = Tampered(t)
        t.upload([corpus.file("CT_small.dcm")], to="/forged", site=UNTRUSTED)
    with Client(fed.config("researcher")) as r, pytest.raises(errors.NotFound):
        r.stat("/forged")

    # An unsealed object may not be copied to the untrusted site, nor may a site holding
    # unsealed objects be marked untrusted before it is drained.
    with Client(fed.config("admin")) as admin:
        with pytest.raises(errors.PermissionDenied, match="is not sealed"):
            admin.meta.call("admin.fsck.copy", source="site-a", target=UNTRUSTED, keys=[key])
        with pytest.raises(errors.UsageError, match="drain it first"):
            admin.meta.call("admin.site.trust", site="site-a", untrusted=True)


def test_erasing_a_patient_shreds_their_sealed_objects(fed: local.Federation, tmp_path: Path) -> None:
    src = corpus.fresh_instances(tmp_path / "erase", 1, "MR_small.dcm")
    with Client(fed.config("clinician")) as c:
        report = c.upload(src, to="/shred", site=UNTRUSTED)
        assert report.uploaded == 1, report.failed
        path = report.paths[0]
        resolved: dict[str, Any] = c.resolve([path])
        ref = ObjectRef.all_of(resolved)[0]
        assert ref.env is not None
        kept = next(p for p in _store(fed, UNTRUSTED) if p.name == ref.key).read_bytes()
        plain = ref.env.open(kept)                    # the key released to a reader opens it
        assert plain == c.read_file(path)
        patient = c.find("/DicomHeader", path, show=["PatientID"])[0]["values"]["PatientID"]
        study = resolved["seals"][ref.key][1]

    with Client(fed.config("admin")) as admin:
        reply = admin.meta.call("admin.erase", patient=patient)[0]
        assert reply["files"] >= 1          # this file, and the patient's others

    with Client(fed.config("clinician")) as c:
        with pytest.raises(errors.NotFound):
            c.stat(path)
        # A copy kept anywhere (a site that ignored the delete, a backup tape) stays ciphertext:
        # the study's key went with the patient's, and the archive now issues another.
        fresh = base64.b64decode(c.meta.call("up.keys", studies={study: patient})[0]["keys"][study])
        assert fresh != ref.env.key
        with pytest.raises(errors.IntegrityError, match="failed to authenticate"):
            envelope.Envelope(fresh, ref.env.salt, ref.env.size).open(kept)


def test_sealed_projections_are_reconstructed_on_a_trusted_site_only(fed: local.Federation) -> None:
    import numpy as np

    from dgf.dicom.projections import projection_series, read_projection
    from ioserver.recon import circular, fdk, phantom

    g = circular(24, 500.0, 800.0, (32, 32), (2.4, 2.4), (16, 16, 16), (3.5, 3.5, 3.5))
    p = phantom.project(g, 25.0)
    with Client(fed.config("clinician")) as c:
        assert c.recon_import(p, g, "/scan", {"PatientID": "PHANTOM-9", "PatientName": "Shepp^Logan"}).uploaded == 24
        refs = ObjectRef.all_of(c.resolve(["/scan"]))
        assert refs and all(r.env is not None for r in refs)      # a copy on the untrusted site: sealed
        result = c.recon("/scan", "/scan-fdk")
    # The trusted site got the keys and did all the work; the untrusted one was never asked.
    assert result.sites == ["site-a"]
    single = fdk(np.stack([read_projection(f)[3] for f in projection_series(p, g)]), g, "hann")
    np.testing.assert_allclose(result.volume, single, atol=1e-5 * float(np.abs(single).max()))


def test_the_mount_reads_sealed_files(fed: local.Federation, tmp_path: Path) -> None:
    import os

    from tests.test_fuse import Mount

    sources = corpus.fresh_instances(tmp_path / "src", 2) + [synth.multiframe(tmp_path / "mf.dcm", 9 << 20, seed=21)]
    with Client(fed.config("clinician")) as c:
        report = c.upload(sources, to="/mounted", site=UNTRUSTED)
        assert report.uploaded == 3, report.failed
    with Client(fed.config("researcher")) as r:
        expected = {p: r.read_file(p) for p in report.paths}
    m = Mount(fed.config("researcher"), tmp_path / "mnt")
    try:
        for p, data in expected.items():
            local_path = m.path / p.lstrip("/")
            assert os.stat(local_path).st_size == len(data)
            assert local_path.read_bytes() == data
            fd = os.open(local_path, os.O_RDONLY)
            try:          # reads across chunk and block boundaries, out of order
                for off in (len(data) - 3, 65_519, 4 << 20, 0, (4 << 20) - 10, 1_048_000):
                    assert os.pread(fd, 70_000, off) == data[off:off + 70_000], (p, off)
            finally:
                os.close(fd)
    finally:
        m.close()
