"""End to end on a real federation: up, find, down (de-identified and identified), roles, audit,
namespace verbs, and the failure cases of the federation issue."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dgf import errors, local
from dgf.client import Client
from ioserver import server as ioserver_server
from ioserver.store import object_path
from tests import corpus, serving
from tests.conftest import copy_to, metaserver_calls

RT_FILES = ["rtplan.dcm", "rtdose.dcm", "rtstruct.dcm"]


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_round_trip_ct_mr_rt(clinician: Client, workdir: Path) -> None:
    """Upload real CT, MR and RT files; identified download equals the originals byte for byte,
    de-identified download carries none of their identifying values."""
    originals = [corpus.file(n) for n in ["CT_small.dcm", "MR_small.dcm", *RT_FILES]]
    for orig_path in originals:
        report = clinician.upload([orig_path], to=f"/roundtrip/{orig_path.stem}")
        assert report.uploaded == 1 and not report.failed
        assert report.paths[0].startswith(f"/roundtrip/{orig_path.stem}/2.25.")

    ident = clinician.download(["/roundtrip"], workdir / "ident", identified=True)
    assert ident.downloaded == len(originals) and not ident.failed
    deid = clinician.download(["/roundtrip"], workdir / "deid")
    assert deid.downloaded == len(originals)
    for orig_path in originals:
        [back] = _files_under(workdir / "ident" / "roundtrip" / orig_path.stem)
        assert back.read_bytes() == orig_path.read_bytes()
        [anon_path] = _files_under(workdir / "deid" / "roundtrip" / orig_path.stem)
        orig = pydicom.dcmread(orig_path, force=True)
        anon = pydicom.dcmread(anon_path)
        blob = anon_path.read_bytes()
        assert anon.PatientIdentityRemoved == "YES"
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName",
                   "ReferringPhysicianName", "OperatorsName", "AccessionNumber"):
            value = str(orig.get(kw, "") or "")
            if value:
                assert str(anon.get(kw, "") or "") != value, f"{kw} of {orig_path.name} kept"
        for kw in ("PatientName", "PatientID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = str(orig.get(kw, "") or "")
            if len(value) >= 6:
                assert value.encode() not in blob, f"{kw} of {orig_path.name} leaked"


def test_download_by_xpath(clinician: Client, researcher: Client, workdir: Path) -> None:
    """dgf_down --find: what the XPath matches under the paths given, at its full path; the
    metaserver resolves it (the matched paths do not travel to the client and back)."""
    got = clinician.download(["/roundtrip", "/roundtrip/MR_small"], workdir / "mr", identified=True,
                             xpath="/DicomHeader[Modality='MR']")
    [only] = _files_under(workdir / "mr")
    assert got.downloaded == 1 and only.read_bytes() == corpus.file("MR_small.dcm").read_bytes()
    assert only.relative_to(workdir / "mr").parts[:2] == ("roundtrip", "MR_small")
    assert clinician.download(["/roundtrip"], workdir / "none", xpath="/DicomHeader[Modality='XA']").downloaded == 0
    with pytest.raises(errors.PermissionDenied):
        researcher.download(["/roundtrip"], workdir / "r", identified=True, xpath="/DicomHeader[Modality='MR']")
    with pytest.raises(errors.DgfError, match="XPath|xpath|expression"):
        clinician.download(["/roundtrip"], workdir / "bad", xpath="/DicomHeader[")
    assert not (workdir / "bad").exists() or not any((workdir / "bad").rglob("*.dcm"))


def test_default_placement_and_header_query(clinician: Client, small_files: list[Path]) -> None:
    report = clinician.upload(small_files[:10])
    assert report.uploaded == 10
    for path in report.paths:
        parts = path.strip("/").split("/")
        assert len(parts) == 4 and parts[0].startswith("P") and parts[1].startswith("2.25.")
        assert parts[3].endswith(".dcm")
    ct = clinician.find("/DicomHeader[Modality='CT' and PatientSex='F']", "/", show=["Modality", "PatientSex"])
    assert ct and all(r["values"] == {"Modality": "CT", "PatientSex": "F"} for r in ct)
    everything = {r["path"] for r in clinician.find("/DicomHeader", "/")}
    assert set(report.paths) <= everything
    # The XML header is the xattr, and holds no identifying value.
    xml = clinician.getxattr(report.paths[0], "user.dgf.dicom")
    assert b"<DicomHeader>" in xml and b"SYN0" not in xml and b"General Hospital" not in xml
    assert b"<PatientIdentityRemoved" in xml


def test_sites_are_both_used_and_objects_are_by_key(clinician: Client, federation: local.Federation,
                                                    small_files: list[Path]) -> None:
    report = clinician.upload(small_files[10:40])
    assert report.uploaded == 30
    resolved = clinician.resolve(report.paths)
    used = {f[3][0] for f in resolved["files"]}
    assert used == {"site-a", "site-b"}
    for _, key, size, sites in resolved["files"]:
        obj = object_path(federation.root / f"store-{sites[0]}", key)
        assert obj.stat().st_size == size
        assert hashlib.sha256(obj.read_bytes()).hexdigest() == key


def test_researcher_is_refused_identity_and_audited(researcher: Client, clinician: Client,
                                                     admin: Client, workdir: Path) -> None:
    clinician.upload([corpus.file("MR_small.dcm")], to="/audit-me")
    with pytest.raises(errors.PermissionDenied, match="may not receive patient identity"):
        researcher.download(["/audit-me"], workdir, identified=True)
    assert not list(workdir.rglob("*.dcm"))
    log = admin.audit_log(20)
    assert any(e["principal"] == "researcher" and e["action"] == "identity.release"
               and e["outcome"] == "refused" for e in log)
    # De-identified data is fine for researchers.
    assert researcher.download(["/audit-me"], workdir).downloaded == 1
    # Researchers do not change the namespace.
    with pytest.raises(errors.PermissionDenied):
        researcher.mkdir("/researcher-dir")
    with pytest.raises(errors.PermissionDenied):
        researcher.upload([corpus.file("CT_small.dcm")])


def test_identified_download_is_audited_per_file(clinician: Client, admin: Client, workdir: Path) -> None:
    clinician.upload([corpus.file("CT_small.dcm")], to="/audit-ok")
    path = clinician.find("/DicomHeader", "/audit-ok")[0]["path"]
    clinician.download([path], workdir, identified=True)
    assert any(e["principal"] == "clinician" and e["target"] == path and e["outcome"] == "ok"
               for e in admin.audit_log(50))


def test_bad_files_are_reported_and_the_rest_goes_in(clinician: Client, workdir: Path) -> None:
    good = copy_to(corpus.file("CT_small.dcm"), workdir)
    text = workdir / "notes.txt"
    text.write_text("not dicom at all\n" * 20)
    truncated = workdir / "truncated.dcm"
    truncated.write_bytes(corpus.file("rtplan.dcm").read_bytes()[:900])
    report = clinician.upload([text, good, truncated, workdir / "missing.dcm"], to="/mixed")
    assert report.uploaded == 1
    failed = {Path(f.item).name: f.reason for f in report.failed}
    assert set(failed) == {"notes.txt", "truncated.dcm", "missing.dcm"}
    assert "not a DICOM file" in failed["notes.txt"]
    assert "truncated" in failed["truncated.dcm"]
    assert [s.path for s in clinician.ls("/mixed")] == [report.paths[0]]


def test_namespace_verbs(clinician: Client) -> None:
    clinician.upload([corpus.file("CT_small.dcm")], to="/ns/a")
    src = clinician.ls("/ns/a")[0].path
    clinician.mkdir("/ns/b/c", parents=True)
    clinician.mv(src, "/ns/b/c/moved.dcm")
    assert clinician.ls("/ns/a") == []
    st = clinician.stat("/ns/b/c/moved.dcm")
    assert not st.is_dir and st.size > 0 and st.object_key
    assert clinician.stat("/ns/b").nlink == 3
    with pytest.raises(errors.DirectoryNotEmpty):
        clinician.rmdir("/ns/b/c")
    with pytest.raises(errors.NotFound):
        clinician.stat("/ns/nope")
    with pytest.raises(errors.AlreadyExists):
        clinician.mkdir("/ns/b")
    clinician.chmod("/ns/b/c/moved.dcm", 0o600)
    assert clinician.stat("/ns/b/c/moved.dcm").mode == 0o600
    clinician.setxattr("/ns/b/c/moved.dcm", "user.project", b"lung-screening")
    assert clinician.getxattr("/ns/b/c/moved.dcm", "user.project") == b"lung-screening"
    assert set(clinician.listxattr("/ns/b/c/moved.dcm")) == {"user.dgf.dicom", "user.project"}
    with pytest.raises(errors.PermissionDenied):
        clinician.setxattr("/ns/b/c/moved.dcm", "user.dgf.dicom", b"<forged/>")
    with pytest.raises(errors.NoAttribute):
        clinician.getxattr("/ns/b/c/moved.dcm", "user.absent")
    assert clinician.rm("/ns", recursive=True) == 1
    with pytest.raises(errors.NotFound):
        clinician.stat("/ns")


def test_rm_r_removes_a_tree_in_one_transaction_and_frees_its_objects(federation: local.Federation,
                                                                     clinician: Client, admin: Client,
                                                                     tmp_path: Path) -> None:
    for sub, n in (("/rmtree/a", 2), ("/rmtree/a/b/c", 2), ("/rmtree/d", 1)):
        clinician.upload(corpus.fresh_instances(tmp_path / sub.strip("/").replace("/", "_"), n), to=sub)
    clinician.setxattr("/rmtree/a/b", "user.note", b"a directory's attribute goes too")
    keys = [f[1] for f in clinician.resolve(["/rmtree"])["files"]]
    assert len(keys) == 5 and all(_on_a_site(federation, k) for k in keys)
    with pytest.raises(errors.UsageError, match="root"):
        admin.meta.call("ns.rmtree", path="/")
    with metaserver_calls(clinician) as calls:
        assert clinician.rm("/rmtree", recursive=True) == 5
    assert calls == ["ns.stat", "ns.rmtree"]                   # not one request per file
    with pytest.raises(errors.NotFound):
        clinician.stat("/rmtree")
    assert not any(_on_a_site(federation, k) for k in keys)    # the bytes are freed at the sites
    entries = admin.audit_log(40)
    assert any(e["action"] == "rmtree" and e["target"] == "/rmtree" for e in entries)
    assert sum(e["action"] == "object.release" and e["target"] in keys for e in entries) == 5


def test_rm_r_of_more_files_than_a_header_holds_frees_every_object(federation: local.Federation,
                                                                  clinician: Client, tmp_path: Path) -> None:
    # An rm -r's release (each object's delete capability and keys) travelled in the reply's
    # header, and every site's capability in one token: past ~9,000 objects a site refused the
    # token's frame, past ~45,000 files the client refused the reply, both after the commit,
    # and the bytes stayed.  Now more than RELEASE_IN_HEADER objects travel in the payload,
    # in tokens of DELETE_CAP_KEYS each.
    from metaserver import server

    n = server.RELEASE_IN_HEADER + 50
    assert n > server.DELETE_CAP_KEYS
    report = clinician.upload(corpus.fresh_instances(tmp_path / "many", n), to="/many")
    assert report.uploaded == n
    keys = [f[1] for f in clinician.resolve(["/many"])["files"]]
    assert len(keys) == n and all(_on_a_site(federation, k) for k in keys[::97])
    reply, payload = clinician.meta.call("ns.rmtree", path="/many")
    assert reply["files"] == n and "release" not in reply
    release = json.loads(payload)["release"]
    for grant in release.values():
        assert len(grant["cap"].split()) == -(-len(grant["keys"]) // server.DELETE_CAP_KEYS) >= 2
    clinician._free(reply, payload)
    assert not any(_on_a_site(federation, k) for k in keys)


def test_a_late_delete_keeps_the_bytes_an_upload_stored_since(federation: local.Federation,
                                                             clinician: Client, tmp_path: Path) -> None:
    # An unlink released an object; the delete it sends the site arrives late, after an upload
    # of the same instance stored the bytes there again (the site held them: nothing written)
    # and published them under a new name.  The delete took those bytes, and the new file was
    # left with a name and nothing behind it.
    src = corpus.fresh_instances(tmp_path / "late", 1)
    clinician.upload(src, to="/late/a")
    [(a_path, key, *_)] = clinician.resolve(["/late/a"])["files"]
    reply, _ = clinician.meta.call("ns.unlink", path=a_path)     # released; its delete held back
    assert list(reply["release"].values())[0]["keys"] == [key]
    clinician.upload(src, to="/late/b")
    [(b_path, b_key, *_)] = clinician.resolve(["/late/b"])["files"]
    assert b_key == key
    clinician._free(reply)                                       # the late delete
    assert _on_a_site(federation, key)
    assert hashlib.sha256(clinician.read_file(b_path)).hexdigest() == key
    clinician.rm(b_path)                                         # its own release frees it
    assert not _on_a_site(federation, key)


def test_an_upload_naming_an_instance_removed_meanwhile_sends_it_again(federation: local.Federation,
                                                                      tmp_path: Path) -> None:
    # An instance the archive holds is uploaded as one more name of its object, with no bytes
    # sent.  If its last name is removed between the upload's check and its commit, the
    # commit refuses the name (its bytes are being deleted): the upload failed, and the whole
    # commit with it.  Now the others are published and that file is sent again.
    src = corpus.fresh_instances(tmp_path / "gone", 3)
    with Client(federation.config("clinician")) as c:
        c.upload(src[:1], to="/gone/a")
        [(a_path, key, *_)] = c.resolve(["/gone/a"])["files"]
        original, removed = c.meta.call, []

        def racing(verb: str, *args: Any, **kwargs: Any) -> Any:
            if verb == "up.commit" and not removed:
                removed.append(True)
                c._free(*original("ns.unlink", path=a_path))     # its bytes leave the sites
                assert not _on_a_site(federation, key)
            return original(verb, *args, **kwargs)

        c.meta.call = racing  # type: ignore[method-assign]
        try:
            report = c.upload(src, to="/gone/b")
        finally:
            c.meta.call = original  # type: ignore[method-assign]
        assert removed and not report.failed
        assert (report.uploaded, report.already) == (3, 0)
        assert set(report.stored) == {str(p) for p in src}
        files = c.resolve(["/gone/b"])["files"]
        assert len(files) == 3 and key in {f[1] for f in files} and _on_a_site(federation, key)
        for path, k, *_ in files:
            assert hashlib.sha256(c.read_file(path)).hexdigest() == k
        c.rm("/gone", recursive=True)


def test_delete_batch_checks_every_key_before_it_deletes_one(federation: local.Federation,
                                                            clinician: Client, tmp_path: Path) -> None:
    src = corpus.fresh_instances(tmp_path / "delbatch", 3)
    clinician.upload(src, to="/delbatch")
    reply, _ = clinician.meta.call("ns.rmtree", path="/delbatch")
    site, grant = sorted(reply["release"].items())[0]
    keys, store, link = grant["keys"], federation.root / f"store-{site}", clinician.site_link(site)
    assert len(keys) == 3
    stranger = hashlib.sha256(b"an object no capability names").hexdigest()
    for bad, refusal in ((stranger, errors.PermissionDenied), ("../../etc/passwd", errors.UsageError)):
        with pytest.raises(refusal):
            link.call("delete.batch", grant["cap"], keys=[*keys, bad])
        assert all(object_path(store, k).exists() for k in keys)      # nothing of the frame went
    with pytest.raises(errors.LimitExceeded, match="batch_objects"):
        link.call("delete.batch", grant["cap"], keys=keys * 100)
    # The first instance is uploaded again before the delete arrives: that object is kept.
    clinician.upload(src[:1], to="/delbatch2")
    again = clinician.resolve(["/delbatch2"])["files"][0][1]
    result, _ = link.call("delete.batch", grant["cap"], keys=keys)
    assert result == {"deleted": [k != again for k in keys], "kept": [k == again for k in keys]}
    assert [object_path(store, k).exists() for k in keys] == [k == again for k in keys]
    result, _ = link.call("delete.batch", grant["cap"], keys=keys)   # gone: neither deleted nor kept
    assert result == {"deleted": [False] * 3, "kept": [k == again for k in keys]}
    clinician._free({"release": {s: g for s, g in reply["release"].items() if s != site}})
    clinician.rm(clinician.resolve(["/delbatch2"])["files"][0][0])
    assert not any(_on_a_site(federation, k) for k in keys)


#: A site from before ``delete.batch``: today's I/O server without that verb.
OLDER_SITE = """
import sys
import ioserver.server as site
del site.IoService.delete_batch
sys.exit(site.main(["serve", "--config", sys.argv[1], "--ready-file", sys.argv[2]]))
"""


def test_a_site_older_than_delete_batch_gets_one_delete_per_object(fresh_federation: local.Federation,
                                                                    tmp_path: Path) -> None:
    # Released objects go to a site many to a delete.batch frame; a site that does not know the
    # verb refuses each frame as unknown, and its objects were left for fsck.  Now the client
    # sends those one delete each.
    import subprocess
    import sys
    import time

    from dgf import transport

    fed = fresh_federation
    serving.kill(_pids(fed)["site-b"])
    ready = fed.root / "site-b.addr"
    ready.unlink(missing_ok=True)
    with open(fed.root / "logs" / "site-b-older.log", "ab") as log:
        older = subprocess.Popen([sys.executable, "-c", OLDER_SITE, str(fed.root / "site-b.conf"), str(ready)],
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert older.poll() is None and time.monotonic() < deadline, "the older site did not start"
            time.sleep(0.05)
        n = transport.BATCH_OBJECTS + 6                          # two frames to each site
        with Client(fed.config("clinician")) as c:
            with pytest.raises(errors.UsageError, match="unknown verb 'delete.batch'"):
                c.site_link("site-b").call("delete.batch", None, keys=[])
            assert c.upload(corpus.fresh_instances(tmp_path / "older", n), to="/older").uploaded == n
            keys = [f[1] for f in c.resolve(["/older"])["files"]]
            stores = [fed.root / f"store-{s}" for s in fed.sites]
            assert all(object_path(st, k).exists() for st in stores for k in keys)
            assert c.rm("/older", recursive=True) == n
        assert not any(object_path(st, k).exists() for st in stores for k in keys)
    finally:
        serving.stop(older)


def _on_a_site(fed: local.Federation, key: str) -> bool:
    return any(object_path(fed.root / f"store-{s}", key).exists() for s in fed.sites)


def test_bad_xpath_is_a_clear_error_and_server_survives(clinician: Client) -> None:
    with pytest.raises(errors.UsageError, match="invalid XPath"):
        clinician.find("/DicomHeader[Modality=", "/")
    assert isinstance(clinician.find("/DicomHeader[Modality='NONE']", "/"), list)


def test_unknown_key_is_refused(federation: local.Federation, tmp_path: Path) -> None:
    from dgf import crypto
    from dgf.config import ClientConfig, write_section

    crypto.generate_keypair(tmp_path / "stranger")
    src = ClientConfig.load(federation.config("researcher"))
    conf = tmp_path / "stranger.conf"
    write_section(conf, "dgf", {"principal": "stranger", "key": str(tmp_path / "stranger"),
                                "metaserver": "{}:{}".format(*src.metaserver[0]),
                                "metaserver_host_key": src.metaserver_host_key})
    with pytest.raises(errors.AuthenticationFailed, match="refused our key"):
        Client(conf)


def test_pinned_host_key_mismatch_is_refused(federation: local.Federation, tmp_path: Path) -> None:
    from dgf import crypto
    from dgf.config import ClientConfig, write_section

    src = ClientConfig.load(federation.config("clinician"))
    other = crypto.generate_keypair(tmp_path / "impostor")
    conf = tmp_path / "pinned.conf"
    write_section(conf, "dgf", {"principal": "clinician", "key": str(src.key),
                                "metaserver": "{}:{}".format(*src.metaserver[0]),
                                "metaserver_host_key": " ".join(other.split()[:2])})
    with pytest.raises(errors.AuthenticationFailed, match="does not match the pinned key"):
        Client(conf)


def test_principal_enrollment_and_removal(admin: Client, federation: local.Federation, tmp_path: Path) -> None:
    from dgf import crypto
    from dgf.config import ClientConfig, write_section

    pub = crypto.generate_keypair(tmp_path / "newbie")
    admin.principal_add("newbie", "researcher", pub)
    src = ClientConfig.load(federation.config("researcher"))
    conf = tmp_path / "newbie.conf"
    write_section(conf, "dgf", {"principal": "newbie", "key": str(tmp_path / "newbie"),
                                "metaserver": "{}:{}".format(*src.metaserver[0]),
                                "metaserver_host_key": src.metaserver_host_key})
    with Client(conf) as c:
        assert c.whoami() == {"name": "newbie", "role": "researcher"}
    admin.principal_remove("newbie")
    with pytest.raises(errors.AuthenticationFailed):
        Client(conf)
    assert any(e["action"] == "grant" and e["target"] == "newbie" for e in admin.audit_log(50))


def _pids(fed: local.Federation) -> dict[str, int]:
    return {k: int(v) for k, v in local.status(fed.root)["processes"].items()
            for v in [v["pid"]]}  # type: ignore[index]


def test_site_dies_mid_upload_then_rerun_completes(fresh_federation: local.Federation,
                                                   small_files: list[Path], workdir: Path) -> None:
    """Kill site-b as the upload starts: every file wants a copy there (two copies on two
    sites), so the files not yet durable on both fail and are not visible; after a restart the
    same upload completes, with no duplicate paths or objects."""
    fed = fresh_federation
    files = small_files[:30]
    killed = []

    def progress(n: int) -> None:
        if not killed:
            os.kill(_pids(fed)["site-b"], signal.SIGKILL)
            killed.append(True)

    with Client(fed.config("clinician")) as c:
        first = c.upload(files, to="/batch", batch=10, progress=progress)
        assert killed and first.failed and first.uploaded < len(files)
        assert all("site-b" in f.reason for f in first.failed)
        try:
            visible = {s.path for s in c.ls("/batch")}
        except errors.NotFound:
            visible = set()
        assert visible == set(first.paths)
    # Nothing half-written in site-b's store is an object.
    for obj in (fed.root / "store-site-b" / "objects").rglob("*"):
        if obj.is_file():
            assert hashlib.sha256(obj.read_bytes()).hexdigest() == obj.name
    # 'dgf local up' on a federation with one dead server starts that server only.
    before = _pids(fed)
    again = local.up(fed.root)
    assert again.started == ("site-b",) and again.metaserver == fed.metaserver
    assert again.pids["metaserver"] == before["metaserver"] and again.pids["site-a"] == before["site-a"]
    with Client(fed.config("clinician")) as c:
        second = c.upload(files, to="/batch", batch=10)
        # The re-run sends only what is missing: stored files are verified and skipped.
        assert not second.failed and second.already == len(first.paths)
        assert second.uploaded == len(files) - len(first.paths)
        listing = c.ls("/batch")
        assert len(listing) == len(files) == len({s.path for s in listing})
        keys = {s.object_key for s in listing}
        stored = collections.Counter(p.name for site in ("site-a", "site-b")
                                     for p in (fed.root / f"store-{site}" / "objects").rglob("*") if p.is_file())
        assert stored == {k: 2 for k in keys}          # every object in its two copies, once each
        assert c.download(["/batch"], workdir, identified=True).downloaded == len(files)
    originals = {hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in _files_under(workdir)} == originals


def test_metaserver_restart_keeps_everything(fresh_federation: local.Federation, workdir: Path) -> None:
    fed = fresh_federation
    src = corpus.file("CT_small.dcm")
    with Client(fed.config("clinician")) as c:
        c.upload([src], to="/keep")
        c.setxattr(c.ls("/keep")[0].path, "user.note", b"persist")
    config_before = fed.config("clinician").read_text()
    pid = _pids(fed)["metaserver"]
    serving.kill(pid)
    # The sites still run: up restarts the whole federation, the metaserver on its old port, so
    # configs handed out before stay valid.
    again = local.up(fed.root)
    assert set(again.started) == {"metaserver", *fed.sites} and again.metaserver == fed.metaserver
    assert fed.config("clinician").read_text() == config_before
    with pytest.raises(errors.AlreadyExists):
        local.up(fed.root)
    with Client(fed.config("clinician")) as c:
        path = c.ls("/keep")[0].path
        assert c.getxattr(path, "user.note") == b"persist"
        c.download(["/keep"], workdir, identified=True)
    assert _files_under(workdir)[0].read_bytes() == src.read_bytes()


def test_download_fails_over_and_reports_dead_sites(fresh_federation: local.Federation, workdir: Path) -> None:
    fed = fresh_federation
    with Client(fed.config("admin")) as admin:
        admin.mkdir("/one")
        admin.meta.call("admin.replicas.set", path="/one", copies=1)
    with Client(fed.config("clinician")) as c:
        c.upload([corpus.file("CT_small.dcm")], to="/one", site="site-a")
        c.upload([corpus.file("MR_small.dcm")], to="/two", site="site-a")     # two copies, the default
        assert [len(c.stat(s.path).replicas) for s in c.ls("/one") + c.ls("/two")] == [1, 2]
        serving.kill(_pids(fed)["site-a"])
        # The second copy serves what the dead site held.
        both = c.download(["/two"], workdir / "two")
        assert both.downloaded == 1 and not both.failed
        assert _files_under(workdir / "two")[0].read_bytes()[128:132] == b"DICM"
        report = c.download(["/one"], workdir)
    assert report.downloaded == 0 and len(report.failed) == 1
    # The reason names the dead site and what happened, not just that no replica answered.
    assert "site site-a" in report.failed[0].reason and "is it running?" in report.failed[0].reason
    assert not _files_under(workdir / "one")


def test_ioserver_serves_stdio_as_a_forced_command(federation: local.Federation, clinician: Client) -> None:
    """The same verb loop behind a site's own OpenSSH: 'dgf-ioserver serve --stdio'."""
    import subprocess
    import sys

    from dgf import wire

    clinician.upload([corpus.file("MR_small.dcm")], to="/stdio", site="site-a")
    resolved = clinician.resolve(["/stdio"])
    _, key, size, _ = resolved["files"][0]
    proc = subprocess.Popen([sys.executable, "-m", "ioserver.server", "serve", "--config",
                             str(federation.root / "site-a.conf"), "--stdio", "--principal", "clinician"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        chan = wire.RpcChannel(wire.StdioStream(proc.stdout, proc.stdin), "stdio")  # type: ignore[arg-type]
        assert chan.call("hello")[0] == {"site": "site-a", "principal": "clinician"}
        with pytest.raises(errors.PermissionDenied):
            chan.call("get", key=key)
        chan.call("auth", token=resolved["caps"]["site-a"])
        _, data = chan.call("get", key=key)
        assert len(data) == size and hashlib.sha256(data).hexdigest() == key
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        assert proc.wait(timeout=20) == 0


def test_large_uploads_use_worker_processes(fresh_federation: local.Federation, small_files: list[Path],
                                            workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker-process path (taken for large uploads) de-identifies, spools large outputs,
    reports bad files and round-trips exactly, like the in-process path."""
    import dgf.upload
    from bench import synth

    monkeypatch.setattr(dgf.upload, "POOL_MIN_FILES", 4)
    monkeypatch.setattr(dgf.upload, "POOL_WORKERS", 2)      # on any machine, even one of 2 cores
    big = synth.ct_corpus(workdir / "ct", 3, patients=2)
    bad = workdir / "bad.dcm"
    bad.write_bytes(b"\0" * 200)
    files = [*small_files[:12], *big, bad, workdir / "gone.dcm"]
    with Client(fresh_federation.config("clinician")) as c:
        report = c.upload(files, batch=5)
        assert report.uploaded == 15
        assert {Path(f.item).name for f in report.failed} == {"bad.dcm", "gone.dcm"}
        got = c.download(["/"], workdir / "out", identified=True)
    assert got.downloaded == 15
    expected = {hashlib.sha256(p.read_bytes()).hexdigest() for p in files[:15]}
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in _files_under(workdir / "out")} == expected


def test_de_identification_options_are_the_archives(fresh_federation: local.Federation, workdir: Path) -> None:
    """An admin sets the archive's options (audited); uploads use them; an uploader cannot
    pick others; researchers cannot change them."""
    from dgf.dicom.profile import Options

    fed = fresh_federation
    # A client that learnt the options before an admin changed them, kept open (a gateway's).
    early = Client(fed.config("clinician"))
    early.upload(corpus.fresh_instances(workdir / "before", 1), to="/before")
    with Client(fed.config("admin")) as admin:
        assert admin.meta.call("deid.options")[0]["options"] == Options().enabled()
        admin.meta.call("admin.deid.set", options=["retain_device_identity", "retain_safe_private"])
        assert any(e["action"] == "deid.options" and e["detail"] == "retain_device_identity,retain_safe_private"
                   for e in admin.audit_log(10))
        with pytest.raises(errors.UsageError, match="either full dates or modified dates"):
            admin.meta.call("admin.deid.set", options=["retain_long_full_dates", "retain_long_modified_dates"])
    with Client(fed.config("researcher")) as researcher, pytest.raises(errors.PermissionDenied):
        researcher.meta.call("admin.deid.set", options=[])
    # The sites read the profile for the early upload; one asks again for an object its copy
    # refuses, at most once a PROFILE_RECHECK_S (a flood of refused objects is not a flood of
    # requests to the metaserver).
    time.sleep(ioserver_server.PROFILE_RECHECK_S)
    src = corpus.file("CT_small.dcm")
    with Client(fed.config("clinician")) as c:
        # It remembers the options the early client learnt (no deid.options asked); the batch's
        # up.prepare names the archive's, so the batch is analysed again with those.
        with metaserver_calls(c) as calls:
            report = c.upload([src], to="/policy")
        assert report.uploaded == 1 and not report.failed, report.failed
        assert "deid.options" not in calls and calls.count("up.prepare") == 2
        path = c.ls("/policy")[0].path
        c.download([path], workdir / "policy")
        xml = c.getxattr(path, "user.dgf.dicom")
        with metaserver_calls(c) as calls:
            c.upload(corpus.fresh_instances(workdir / "again", 1), to="/policy-again")
        assert calls.count("up.prepare") == 1          # learnt: nothing done twice
    anon = pydicom.dcmread(_files_under(workdir / "policy")[0])
    orig = pydicom.dcmread(src)
    codes = [item.CodeValue for item in anon.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113109", "113111"]  # Basic + Device Identity + Safe Private, nothing else
    with early:                                     # the long-lived client learns them too
        early.upload(corpus.fresh_instances(workdir / "late", 1), to="/late")
        early.download(["/late"], workdir / "late-out")
    late = pydicom.dcmread(_files_under(workdir / "late-out")[0])
    assert [item.CodeValue for item in late.DeidentificationMethodCodeSequence] == ["113100", "113109", "113111"]
    assert anon[0x00431027].value == orig[0x00431027].value  # GE's scan pitch ratio, a safe private
    assert b'creator="GEMS_PARM_01"' in xml and 0x00091001 not in anon  # GE's identity block is not
    assert anon.get("StudyDate", "") == "" and anon.StationName == orig.StationName
    assert "LongitudinalTemporalInformationModified" not in anon
    with Client(fed.config("clinician"), Options(retain_uids=True)) as c:
        with pytest.raises(errors.UsageError, match="set per archive"):
            c.upload([src], to="/policy2")


def test_identity_summary_for_clinicians_only(clinician: Client, researcher: Client) -> None:
    """'dgf identity PATH': what de-identification removed, with the original values, for a
    clinician (audited); refused to a researcher."""
    src = corpus.file("CT_small.dcm")
    clinician.upload([src], to="/summary")
    path = clinician.ls("/summary")[0].path
    summary = clinician.identity_summary(path)
    orig = pydicom.dcmread(src)
    by_path = {e["path"]: e for e in summary["removed"]}
    assert by_path["(0010,0010)"]["value"] == str(orig.PatientName)
    assert by_path["(0010,0020)"]["value"] == orig.PatientID
    assert by_path["(0020,000D)"] == {"path": "(0020,000D)", "vr": "UI", "action": "U",
                                     "value": orig.StudyInstanceUID}
    assert any(e.get("creator") for e in summary["removed"])  # private elements name their creator
    assert summary["original_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    with pytest.raises(errors.PermissionDenied):
        researcher.identity_summary(path)


def test_identity_summary_of_a_large_object_is_rebuilt_on_disk(federation: local.Federation, clinician: Client,
                                                               workdir: Path) -> None:
    """'dgf identity' (and the mount's user.dgf.identity) of an object past the download's
    streaming threshold rebuilds the original on disk: it held the object and the original in
    memory, 2x the object (~320 MB here, 4 GB for a 2 GB multi-frame)."""
    import json
    import subprocess
    import sys

    from bench import synth

    src = synth.multiframe(workdir / "large.dcm", 150 * 1024 * 1024)
    clinician.upload([src], to="/summary-large")
    path = clinician.ls("/summary-large")[0].path
    # The command's own peak RSS, printed as it exits (wait4 would add any helper it started,
    # such as the connection master).
    run = ("import sys\nfrom dgf.cli import main\nsys.argv = ['dgf', 'identity', sys.argv[1], '--config', sys.argv[2]]\n"
           "try:\n    main()\nfinally:\n    print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0],"
           " file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", run, path, str(federation.config("clinician"))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["original_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    by_path = {e["path"]: e for e in summary["removed"]}
    assert by_path["(0010,0010)"]["value"] == str(pydicom.dcmread(src, stop_before_pixels=True).PatientName)
    peak = int(done.stderr.rsplit("VmHWM:", 1)[1].split()[0]) << 10
    assert peak < 150 * 1024 * 1024, peak


def test_a_fetch_stops_asking_the_sites_once_its_consumer_goes_away(federation: local.Federation,
                                                                    clinician: Client, workdir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A WADO-RS client that goes away, a C-GET cancelled: the fetch behind them went on asking
    the sites for every object and threw each away. With ``stop`` set, no further request is
    sent; the objects already asked for may still arrive."""
    import threading

    from bench import synth

    sources = [synth.multiframe(workdir / f"big-{i}.dcm", 9 * 1024 * 1024, seed=100 + i) for i in range(12)]
    assert not clinician.upload(sources, to="/stopped").failed
    paths = [s.path for s in clinician.ls("/stopped")]
    # One request in flight per channel (of four: two sites, two channels each), so what a stop
    # saves shows with twelve objects rather than hundreds.
    monkeypatch.setattr("dgf.transport.BATCH_WINDOW", 1)
    stop = threading.Event()
    got: list[str] = []

    def on_file(path: str, data: Any) -> None:
        got.append(path)
        if not isinstance(data, bytes):
            data.close()
        stop.set()                                       # the consumer leaves after the first

    report = clinician.fetch_streams(paths, on_file, stop=stop)
    assert 1 <= len(got) <= 8 and report.downloaded == len(got), (len(got), report.downloaded)
    # Unstopped, the same fetch delivers all twelve, and the links still work after a stop.
    everything: list[str] = []
    clinician.fetch_streams(paths, lambda p, d: (everything.append(p), None if isinstance(d, bytes) else d.close()))
    assert sorted(everything) == sorted(paths)
    # fetch, on top of fetch_streams, hands over bytes, large objects read back from their spool.
    sizes: dict[str, int] = {}
    clinician.fetch(paths[:3], lambda p, d: sizes.__setitem__(p, len(d) if isinstance(d, bytes) else -1))
    assert sizes == {s.path: s.size for s in clinician.ls("/stopped") if s.path in paths[:3]}


def test_a_capability_sent_ahead_of_its_frames_is_read_first_and_refused_by_name(
        clinician: Client, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transfer sends its capability and its first frames without waiting for the
    capability's reply (one round trip less on a long link), then reads the replies in order.
    A refused capability fails the transfer by name with nothing delivered, and the link's next
    transfer, on a fresh channel, goes through."""
    from dgf import wire

    clinician.upload(corpus.fresh_instances(workdir / "ahead", 3), to="/ahead")
    resolved = clinician.resolve(["/ahead"])
    site = resolved["files"][0][3][0]
    wanted = [(f[1], f[2]) for f in resolved["files"] if site in f[3]]
    cap = resolved["caps"][site]
    order: list[str] = []
    send, receive_header = wire.RpcChannel.send, wire.RpcChannel.receive_header

    def sent(self: wire.RpcChannel, verb_name: str, *args: Any, **kwargs: Any) -> None:
        order.append(verb_name)
        send(self, verb_name, *args, **kwargs)

    def received(self: wire.RpcChannel) -> dict[str, Any]:
        order.append("reply")
        return receive_header(self)
    monkeypatch.setattr(wire.RpcChannel, "send", sent)
    monkeypatch.setattr(wire.RpcChannel, "receive_header", received)
    link = clinician.site_link(site)
    got: list[Any] = []
    forged = cap[:-8] + ("A" * 8 if not cap.endswith("A" * 8) else "B" * 8)
    with pytest.raises(errors.DgfError) as refused:
        link.get_many(wanted, forged, got.append)
    assert got == [] and "capabilit" in str(refused.value).lower()
    assert order[:3] == ["auth", "get.batch", "reply"], order
    order.clear()
    link.get_many(wanted, cap, got.append)
    assert order[:3] == ["auth", "get.batch", "reply"], order
    assert len(got) == len(wanted) and all(r.error is None for r in got)
    assert all(hashlib.sha256(r.data).hexdigest() == r.key for r in got)


def test_calls_one_after_another_share_one_metaserver_channel(federation: local.Federation) -> None:
    """A call after another takes the channel that one used: the pool handed the second call
    an unopened slot, and opening a channel costs two round trips (0.2 s of a `dgf stat` over a
    100 ms link).  Calls at once still each get a channel."""
    import threading

    with Client(federation.config("clinician")) as c:
        opened: list[int] = []
        real = c.meta.conn.channel

        def counted() -> Any:
            opened.append(1)
            return real()
        c.meta.conn.channel = counted  # type: ignore[method-assign]
        c.whoami()
        c.stat("/")
        c.ls("/")
        assert len(opened) == 1
        hold = threading.Event()
        with c.meta._channel():                      # one call in progress ...
            done = threading.Thread(target=lambda: hold.set() if c.whoami() else None)
            done.start()
            done.join(30)                            # ... and another at once: a second channel
        assert hold.is_set() and len(opened) == 2


def test_a_bulk_command_opens_links_to_the_sites_it_used_last_while_the_metaserver_answers(
        federation: local.Federation, tmp_path: Path) -> None:
    """dgf_up and dgf_down connect to the sites the last of them used (kept in the config's
    cache) while their metaserver connection is made: six round trips less on a long link.  A
    link opened ahead is used only if the metaserver names its site at the same address with the
    same host key; one to a site that moved is closed unused, and the transfer goes through."""
    from dgf.config import read_section, write_section

    conf = tmp_path / "ahead.conf"
    section = read_section(federation.config("clinician"), "dgf")
    section.update(key=str((federation.root / section["key"]).resolve()), cache_dir=str(tmp_path / "cache"))
    write_section(conf, "dgf", section)
    with Client(conf) as c:
        c.upload(corpus.fresh_instances(tmp_path / "src", 4), to="/ahead-links")
    with Client(conf, links_ahead=True) as first:                 # nothing cached yet
        assert first._ahead == {}
        assert first.download(["/ahead-links"], tmp_path / "one").downloaded == 4
        used = sorted(first._links)
    cached = tmp_path / "cache" / "sites.json"
    assert sorted(s["name"] for s in json.loads(cached.read_text())) == used
    assert oct(cached.stat().st_mode & 0o777) == oct(0o600)
    with Client(conf, links_ahead=True) as second:
        assert sorted(second._ahead) == used
        opened = {name: pending.result(30) for name, (_, pending) in second._ahead.items()}
        assert second.download(["/ahead-links"], tmp_path / "two").downloaded == 4
        assert all(second._links[name] is link for name, link in opened.items() if name in second._links)
        assert set(second._links) & set(opened)
    with Client(conf, links_ahead=True) as idle:                  # needs no site this time
        assert idle.stat("/").is_dir and all(p.result(30) for _, p in idle._ahead.values())
    assert sorted(s["name"] for s in json.loads(cached.read_text())) == used    # kept for the next
    # The cache says a site is where another one listens (its host key too): the handshake
    # succeeds, but the metaserver names the site elsewhere, so that link carries nothing.
    sites = {s["name"]: s for s in json.loads(cached.read_text())}
    name = used[0]
    other = next(s for s in federation.sites if s != name)
    host, _, port = (federation.root / f"{other}.addr").read_text().strip().rpartition(":")
    with Client(conf) as c:
        other_key = next(s.host_key for s in c.sites() if s.name == other)
    cached.write_text(json.dumps([{**sites[name], "port": int(port), "host_key": other_key}]))
    with Client(conf, links_ahead=True) as third:
        moved = third._ahead[name][1].result(30)
        assert moved.conn.transport.is_active()
        out = third.download(["/ahead-links"], tmp_path / "three")
        assert out.downloaded == 4 and not out.failed
        assert all(link is not moved for link in third._links.values())
    assert not moved.conn.transport.is_active()                    # closed unused
    remembered = {s["name"]: s for s in json.loads(cached.read_text())}
    assert remembered[name]["port"] == sites[name]["port"] != int(port)   # where the metaserver says
    for d in ("one", "two", "three"):
        got = sorted(p.read_bytes() for p in (tmp_path / d).rglob("*.dcm"))
        assert len(got) == 4
