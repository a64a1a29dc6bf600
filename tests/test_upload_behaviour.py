"""Upload and download as a user meets them: large objects streamed byte-exact, exit codes per
failure kind, grouped summaries, per-file conflicts naming --replace, re-runs that skip what is
stored, and an instance stored once (a second path is a link)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from bench import synth
from dgf import local
from dgf.client import Client
from dgf.dicom import deid
from tests import corpus
from tests.test_cli import _run

MiB = 1024 * 1024


@pytest.mark.parametrize("encapsulated", [False, True])
def test_large_object_streams_byte_exact(federation: local.Federation, tmp_path: Path,
                                         encapsulated: bool) -> None:
    """An object above the streaming threshold goes up from a memory map and comes down to a
    spool in the output directory; de-identified and identified copies are exact."""
    src = synth.multiframe(tmp_path / "mf.dcm", deid.STREAM_MIN + 3 * MiB, seed=11 + encapsulated,
                           encapsulated=encapsulated)
    original = src.read_bytes()
    name = str(pydicom.dcmread(src, stop_before_pixels=True).PatientName)
    with Client(federation.config("clinician")) as c:
        report = c.upload([src], to=f"/large/{int(encapsulated)}")
        assert not report.failed and report.uploaded == 1
        [path] = report.paths
        st = c.stat(path)
        assert st.size > deid.STREAM_MIN
        xml = c.getxattr(path, "user.dgf.dicom").decode()
        assert 'bulk="true"' in xml and "<NumberOfFrames" in xml and name.split("^")[0] not in xml
        out = tmp_path / "out"
        down = c.download([path], out)
        assert not down.failed
        [got] = out.rglob("*.dcm")
        assert hashlib.sha256(got.read_bytes()).hexdigest() == st.object_key
        assert not (out / ".dgf-partial").exists()
        ident = c.download([path], tmp_path / "ident", identified=True)
        assert not ident.failed
        [back] = (tmp_path / "ident").rglob("*.dcm")
        assert back.read_bytes() == original
        # The stored object parses as pydicom reads it, pixels untouched.
        ds = pydicom.dcmread(io.BytesIO(got.read_bytes()))
        assert ds.NumberOfFrames == pydicom.dcmread(src, stop_before_pixels=True).NumberOfFrames
        assert "PatientName" not in ds or str(ds.PatientName) != name


def _variant(tmp: Path, name: str, **changes: object) -> Path:
    ds = pydicom.dcmread(corpus.file("CT_small.dcm"))
    for k, v in changes.items():
        setattr(ds, k, v)
    out = tmp / name
    ds.save_as(out)
    return out


def test_exit_codes_and_grouped_summary(federation: local.Federation, tmp_path: Path) -> None:
    clin = federation.config("clinician")
    missing = _run(["dgf_up", str(tmp_path / "nope.dcm")], clin)
    assert missing.returncode == 3 and "no such file" in missing.stderr
    assert "uploaded 0 file(s)" in missing.stdout
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(corpus.file("CT_small.dcm").read_bytes())
    no_r = _run(["dgf_up", str(folder)], clin)
    assert no_r.returncode == 2 and "use -r" in no_r.stderr
    # A pipe or a device: opening a FIFO waited for a writer and /dev/zero was read for ever.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for special in (fifo, Path("/dev/zero")):
        refused = _run(["dgf_up", str(special), "--to", "/special"], clin, timeout=60)
        assert refused.returncode == 2 and "is not a regular file" in refused.stderr, refused.stderr
    os.mkfifo(folder / "b.dcm")               # met inside a folder (-r): that file fails, a.dcm goes
    walked = _run(["dgf_up", "-r", str(folder), "--to", "/special"], clin, timeout=60)
    assert "uploaded 1 file(s)" in walked.stdout and "not a regular file" in walked.stderr, walked.stderr
    (folder / "b.dcm").unlink()
    us = tmp_path / "us"
    us.mkdir()
    for i in range(6):
        _variant(us, f"us{i}.dcm", Modality="US", SOPInstanceUID=generate_uid())
    burned = _run(["dgf_up", str(us), "-r", "--to", "/us"], clin)
    assert burned.returncode == 4, burned.stderr
    lines = burned.stderr.strip().splitlines()
    # Three files named, then one line for the kind, with its count, detail and remedy.
    assert sum(line.startswith("error: ") for line in lines) == 3
    assert lines[-1] == "6 refused: burned-in annotation risk (US) - use -O allow_burned_in once the pixels are clean"
    assert "6 failed" in burned.stdout


def test_conflicts_are_per_file_and_reruns_skip_stored(federation: local.Federation, tmp_path: Path) -> None:
    clin = federation.config("clinician")
    uid = generate_uid()
    first = tmp_path / "first"
    first.mkdir()
    _variant(first, "a.dcm", SOPInstanceUID=uid, KVP="120")
    _variant(first, "b.dcm", SOPInstanceUID=generate_uid())
    up = _run(["dgf_up", str(first), "-r", "--to", "/conflict"], clin)
    assert up.returncode == 0 and "uploaded 2 file(s)" in up.stdout
    again = _run(["dgf_up", str(first), "-r", "--to", "/conflict"], clin)
    assert again.returncode == 0 and "uploaded 0 file(s)" in again.stdout and "2 already stored" in again.stdout
    second = tmp_path / "second"
    second.mkdir()
    _variant(second, "a.dcm", SOPInstanceUID=uid, KVP="135")   # same path, other bytes
    _variant(second, "c.dcm", SOPInstanceUID=generate_uid())
    clash = _run(["dgf_up", str(second), "-r", "--to", "/conflict"], clin)
    assert clash.returncode == 3
    assert "already exists with other content; use --replace" in clash.stderr
    assert "uploaded 1 file(s)" in clash.stdout and "1 failed" in clash.stdout      # c.dcm went in
    replaced = _run(["dgf_up", str(second / "a.dcm"), "--to", "/conflict", "--replace"], clin)
    assert replaced.returncode == 0 and "uploaded 1 file(s)" in replaced.stdout


def test_an_instance_is_stored_once(federation: local.Federation, tmp_path: Path) -> None:
    src = _variant(tmp_path, "once.dcm", SOPInstanceUID=generate_uid())
    with Client(federation.config("clinician")) as c:
        one = c.upload([src], to="/once/x")
        two = c.upload([src], to="/once/y")
        assert one.uploaded == 1 and two.uploaded == 1 and two.already == 1 and not two.failed
        [x], [y] = c.ls("/once/x"), c.ls("/once/y")
        assert x.object_key == y.object_key            # one object, two names
        stored = [site for site in ("site-a", "site-b")
                  for _ in (federation.root / f"store-{site}" / "objects").rglob(x.object_key)]
        assert stored == ["site-a", "site-b"]          # one object, in its two copies (not four)
        # Another version of the same instance elsewhere is refused, naming where it is.
        edited = _variant(tmp_path, "edited.dcm", SOPInstanceUID=pydicom.dcmread(src).SOPInstanceUID,
                          KVP="135")
        three = c.upload([edited], to="/once/z")
        assert three.uploaded == 0 and three.failed
        assert "/once/x/" in three.failed[0].reason and three.failed[0].code == 3


def test_a_file_twice_in_one_upload_is_accounted_for(federation: local.Federation, tmp_path: Path) -> None:
    """Two copies of one new instance in one batch: the second was dropped from the report (not
    uploaded, not already stored, not failed; a STOW-RS request called it "not stored")."""
    src = _variant(tmp_path, "a.dcm", SOPInstanceUID=generate_uid())
    copy = tmp_path / "copy-of-a.dcm"
    copy.write_bytes(src.read_bytes())
    with Client(federation.config("clinician")) as c:
        report = c.upload([src, copy], to="/twice")
        assert (report.uploaded, report.already, report.failed) == (1, 1, [])
        assert report.stored[str(src)] == report.stored[str(copy)]
    # A copy of a file that fails at the archive fails with it, for the same reason: here
    # another version of the instance holds the path.
    edited = tmp_path / "edited"
    edited.mkdir()
    _variant(edited, "b.dcm", SOPInstanceUID=pydicom.dcmread(src).SOPInstanceUID, KVP="135")
    (edited / "copy-of-b.dcm").write_bytes((edited / "b.dcm").read_bytes())
    up = _run(["dgf_up", str(edited), "-r", "--to", "/twice"], federation.config("clinician"))
    assert up.returncode == 3 and up.stderr.count("already exists with other content") == 2, up.stderr
    assert "uploaded 0 file(s)" in up.stdout and "2 failed" in up.stdout


def test_batches_stored_side_by_side_count_every_file_once(federation: local.Federation, tmp_path: Path) -> None:
    """Uploads keep STORE_STAGES batches in flight (one's commit beside the next one's
    transfer): stored, already stored and failed files are each counted once, whatever the
    batch they fell in."""
    import dgf.upload

    assert dgf.upload.STORE_STAGES >= 2
    old = corpus.fresh_instances(tmp_path / "old", 10)
    new = corpus.fresh_instances(tmp_path / "new", 12)
    bad = [tmp_path / "bad1.dcm", tmp_path / "bad2.dcm"]
    for b in bad:
        b.write_bytes(b"\0" * 300)
    with Client(federation.config("clinician")) as c:
        first = c.upload(old, to="/stages", batch=4)
        assert (first.uploaded, first.already, len(first.failed)) == (10, 0, 0)
        mixed = [p for pair in zip(old, new) for p in pair] + new[len(old):] + bad
        report = c.upload(mixed, to="/stages", batch=3)               # 8 batches
        assert (report.uploaded, report.already, len(report.failed)) == (12, 10, 2)
        assert len(report.paths) == 12 and len(set(report.paths)) == 12
        assert {Path(f.item).name for f in report.failed} == {"bad1.dcm", "bad2.dcm"}
        assert len(c.find("/DicomHeader", "/stages")) == 22


def test_commits_run_one_at_a_time_in_batch_order(federation: local.Federation, tmp_path: Path) -> None:
    """Batches are sent to the sites side by side, but committed by one committer: never two
    commits in flight at once (they only contended at the metaserver), and in batch order even
    when a later batch reaches the sites first."""
    import threading
    import time
    files = corpus.fresh_instances(tmp_path / "in", 12)
    in_flight, most, order = [0], [0], []
    lock = threading.Lock()
    with Client(federation.config("clinician")) as c:
        original = c.meta.call

        def call(verb: str, payload: bytes = b"", wait_s: float | None = None,
                 **args: object) -> tuple[dict[str, object], bytes]:
            if verb != "up.commit":
                return original(verb, payload, wait_s, **args)
            with lock:
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
            try:
                return original(verb, payload, wait_s, **args)
            finally:
                with lock:
                    in_flight[0] -= 1
                    order.append(payload)

        # The first batch reaches the sites last: its commit must still go first.
        put = c.uploads._put

        def slow_first(prepared: list[Any], *args: Any, **kwargs: Any) -> None:
            if any(p.source == str(files[0]) for p in prepared):
                time.sleep(0.5)
            put(prepared, *args, **kwargs)

        c.meta.call = call  # type: ignore[method-assign]
        c.uploads._put = slow_first  # type: ignore[method-assign]
        report = c.upload(files, to="/one-committer", batch=3)               # 4 batches
    assert report.uploaded == 12 and not report.failed
    assert most[0] == 1 and len(order) == 4
    # Each commit holds its batch's files, in the order the batches were read.
    placed = [report.stored[str(f)][0] for f in files]
    assert report.paths == placed
    for i, body in enumerate(order):
        assert all(p.encode() in body for p in placed[3 * i:3 * i + 3])


def test_one_batch_goes_without_stage_threads_and_more_go_through_them(federation: local.Federation,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload of one batch (a STOW-RS request, one file) has nothing to overlap: it is read,
    stored and committed in the caller's thread, with no stage threads started for it (they
    cost a sixth of a one-file upload's CPU).  Two batches still go through the stages."""
    from dgf import upload

    pools: list[str] = []
    real = upload.ThreadPoolExecutor

    def counted(*args: Any, **kwargs: Any) -> Any:
        pools.append(kwargs.get("thread_name_prefix", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(upload, "ThreadPoolExecutor", counted)
    files = corpus.fresh_instances(tmp_path / "src", 3)
    with Client(federation.config("clinician")) as c:
        one = c.upload(files[:1], to="/one-batch")
        assert one.uploaded == 1 and not one.failed and pools == []
        empty = c.upload([], to="/one-batch")
        assert empty.uploaded == 0 and not empty.failed and pools == []
        two = c.upload(files[1:], to="/one-batch", batch=1)
        assert two.uploaded == 2 and not two.failed and pools == ["dgf-commit", "dgf-store"]
        assert sorted(s.path for s in c.ls("/one-batch")) == sorted(one.paths + two.paths)


def test_a_batch_refused_between_its_steps_keeps_no_file_open(federation: local.Federation,
                                                              tmp_path: Path) -> None:
    """A long-lived uploader (the mount, the gateway) whose batch ends between de-identification's
    two steps (here ``up.prepare`` refused to a researcher) keeps no plan of it, nor the
    descriptor a large file's plan holds."""
    from dgf import errors
    from dgf.dicom import pipeline

    big = tmp_path / "big.dcm"
    big.write_bytes(corpus.file("CT_small.dcm").read_bytes())
    corpus.pad(big, (deid.STREAM_MIN >> 20) + 1)
    with Client(federation.config("researcher")) as c:
        c.meta.call("whoami")                           # the links are up before counting
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(errors.PermissionDenied):
            c.upload([big], to="/refused")
        assert pipeline._KEPT.plans == {}
        assert len(os.listdir("/proc/self/fd")) == fds
