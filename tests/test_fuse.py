"""The archive through a real FUSE mount (libfuse3 via mfusepy): browse, read, write, xattrs,
queries as directories, identified mounts, concurrent readers, a dead site, and unmounting."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dgf import local
from dgf.client import Client
from tests import corpus, serving

BIN = Path(sys.executable).parent


def _dgf(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if config is not None:
        env["DGF_CONFIG"] = str(config)
    return subprocess.run([str(BIN / "dgf"), *args], capture_output=True, text=True, env=env, timeout=60)


class Mount:
    def __init__(self, config: Path, where: Path, *extra: str) -> None:
        self.path = where
        where.mkdir(exist_ok=True)
        done = _dgf("mount", str(where), *extra, config=config)
        assert done.returncode == 0, done.stderr
        self.log = Path(done.stdout.split("log: ", 1)[1].strip())

    def close(self) -> None:
        _dgf("umount", "--lazy", str(self.path))


@pytest.fixture()
def mounted(federation: local.Federation, tmp_path: Path) -> Iterator[Mount]:
    m = Mount(federation.config("clinician"), tmp_path / "mnt")
    yield m
    m.close()


def _upload(fed: local.Federation, to: str, *names: str) -> list[str]:
    with Client(fed.config("clinician")) as c:
        c.upload([corpus.file(n) for n in names], to=to)
        return [s.path for s in c.ls(to)]


def test_browse_read_and_xattrs(federation: local.Federation, mounted: Mount, tmp_path: Path) -> None:
    paths = _upload(federation, "/fuse/a", "CT_small.dcm", "MR_small.dcm")
    root = mounted.path
    ls = subprocess.run(["ls", "-l", str(root / "fuse/a")], capture_output=True, text=True, check=True)
    assert ls.stdout.count("-rw-r--r--") == 2
    with Client(federation.config("researcher")) as c:
        stats = {s.path: s for s in c.ls("/fuse/a")}
        expected = {p: c.read_file(p) for p in paths}
    for p in paths:
        st = os.stat(root / p.lstrip("/"))
        assert st.st_size == stats[p].size and st.st_nlink == 1 and abs(st.st_mtime - stats[p].mtime) < 1
        assert (root / p.lstrip("/")).read_bytes() == expected[p]
    assert os.stat(root / "fuse").st_nlink == 3
    subprocess.run(["cp", "-r", str(root / "fuse/a"), str(tmp_path / "out")], check=True)
    assert sorted(f.read_bytes() for f in (tmp_path / "out").iterdir()) == sorted(expected.values())
    dump = subprocess.run(["dcmdump", str(root / paths[0].lstrip("/"))], capture_output=True, text=True)
    assert dump.returncode == 0 and "(0012,0062) CS [YES]" in dump.stdout
    xattrs = subprocess.run(["getfattr", "-d", "-m", "-", str(root / paths[0].lstrip("/"))],
                            capture_output=True, text=True, check=True).stdout
    for name in ("user.dgf.dicom", "user.dgf.site", "user.dgf.checksum"):
        assert name in xattrs
    header = os.getxattr(root / paths[0].lstrip("/"), "user.dgf.dicom")
    assert header.startswith(b"<DicomHeader>")
    key = hashlib.sha256(expected[paths[0]]).hexdigest()
    assert os.getxattr(root / paths[0].lstrip("/"), "user.dgf.checksum") == f"sha256:{key}".encode()
    with pytest.raises(OSError) as no_identity:
        os.getxattr(root / paths[0].lstrip("/"), "user.dgf.identity")
    assert no_identity.value.errno == 61                       # ENODATA on a de-identified mount
    # Security labels and ACLs are not supported (ENOTSUP, so ls -l stops asking each file).
    for unsupported in ("security.selinux", "system.posix_acl_access"):
        with pytest.raises(OSError) as err:
            os.getxattr(root / paths[0].lstrip("/"), unsupported)
        assert err.value.errno == errno.ENOTSUP
    traced = subprocess.run(["strace", "-f", "-e", "trace=getxattr,lgetxattr", "ls", "-l", str(root / "fuse/a")],
                            capture_output=True, text=True)
    assert traced.stderr.count("getxattr(") <= 2, traced.stderr[-500:]       # once per device, not per file
    os.setxattr(root / paths[0].lstrip("/"), "user.note", b"reviewed")
    with Client(federation.config("researcher")) as c:
        assert c.getxattr(paths[0], "user.note") == b"reviewed"
    found = subprocess.run(["find", str(root / "fuse"), "-name", "*.dcm"], capture_output=True, text=True)
    assert len(found.stdout.split()) == 2
    with pytest.raises(FileNotFoundError):
        os.stat(root / "fuse/none")


def test_write_rename_remove(federation: local.Federation, mounted: Mount, tmp_path: Path) -> None:
    root = mounted.path
    os.makedirs(root / "fuse/w/sub")
    subprocess.run(["cp", str(corpus.file("CT_small.dcm")), str(root / "fuse/w/sub/in.dcm")], check=True)
    with Client(federation.config("clinician")) as c:
        assert [s.path for s in c.ls("/fuse/w/sub")] == ["/fuse/w/sub/in.dcm"]
        assert c.read_file("/fuse/w/sub/in.dcm", identified=True) == corpus.file("CT_small.dcm").read_bytes()
    bad = tmp_path / "notes.txt"
    bad.write_text("not dicom")
    cp = subprocess.run(["cp", str(bad), str(root / "fuse/w/notes.txt")], capture_output=True, text=True)
    assert cp.returncode != 0 and "Invalid argument" in cp.stderr
    assert not (root / "fuse/w/notes.txt").exists()
    assert "refused /fuse/w/notes.txt" in mounted.log.read_text()
    # A policy refusal (burned-in annotation risk) is "Operation not permitted", not EINVAL,
    # and the log names the remedy.
    us = pydicom.dcmread(corpus.file("CT_small.dcm"))
    us.Modality, us.SOPInstanceUID = "US", "1.2.3.4.5.6.7.8.9"
    us.save_as(tmp_path / "us.dcm")
    cp = subprocess.run(["cp", str(tmp_path / "us.dcm"), str(root / "fuse/w/us.dcm")], capture_output=True, text=True)
    assert cp.returncode != 0 and "Operation not permitted" in cp.stderr
    assert not (root / "fuse/w/us.dcm").exists()
    assert "refused /fuse/w/us.dcm: " in mounted.log.read_text() and "allow_burned_in" in mounted.log.read_text()
    subprocess.run(["cp", str(corpus.file("MR_small.dcm")), str(root / "fuse/w/sub/in.dcm")], check=True)
    with Client(federation.config("clinician")) as c:               # replaced whole
        assert c.read_file("/fuse/w/sub/in.dcm", identified=True) == corpus.file("MR_small.dcm").read_bytes()
    with pytest.raises(PermissionError):
        with open(root / "fuse/w/sub/in.dcm", "r+b") as f:         # no in-place edits
            f.write(b"x")
    os.rename(root / "fuse/w/sub/in.dcm", root / "fuse/w/moved.dcm")
    os.chmod(root / "fuse/w/moved.dcm", 0o600)
    assert sorted(os.listdir(root / "fuse/w")) == ["moved.dcm", "sub"]
    assert oct(os.stat(root / "fuse/w/moved.dcm").st_mode & 0o777) == "0o600"
    os.unlink(root / "fuse/w/moved.dcm")
    os.rmdir(root / "fuse/w/sub")
    with Client(federation.config("clinician")) as c:
        assert c.ls("/fuse/w") == []


def test_queries_as_directories(federation: local.Federation, mounted: Mount) -> None:
    _upload(federation, "/fuse/q", "CT_small.dcm", "MR_small.dcm")
    listing = os.listdir(mounted.path / ".find" / "Modality='MR'")
    with Client(federation.config("researcher")) as c:
        mr = [r["path"] for r in c.find("/DicomHeader[Modality='MR']")]
        c.save_query("mr-only", "/DicomHeader[Modality='MR']")
    assert len(listing) == len(mr) >= 1
    link = mounted.path / ".find" / "Modality='MR'" / listing[0]
    assert os.readlink(link).startswith("../../") and link.resolve().read_bytes()[128:132] == b"DICM"
    assert "researcher:mr-only" in os.listdir(mounted.path / ".queries")      # owner/name as owner:name
    assert sorted(os.listdir(mounted.path / ".queries" / "researcher:mr-only")) == sorted(listing)
    # ls shows only EINVAL for an invalid expression: the mount log says what is wrong with it.
    with pytest.raises(OSError) as invalid:
        os.listdir(mounted.path / ".find" / "Modality=")
    assert invalid.value.errno == 22
    assert os.listdir(mounted.path / ".find" / "Modalty='MR'") == []
    log = mounted.log.read_text()
    assert "/.find/Modality=: invalid XPath" in log
    assert "/.find/Modalty='MR': Modalty is not a DICOM keyword" in log and "did you mean Modality?" in log


def test_concurrent_readers(federation: local.Federation, mounted: Mount) -> None:
    paths = _upload(federation, "/fuse/c", "CT_small.dcm", "MR_small.dcm", "rtdose.dcm")
    with Client(federation.config("researcher")) as c:
        want = {p: c.read_file(p) for p in paths}
    errors: list[str] = []

    def reader(i: int) -> None:
        for p in paths[i % len(paths):] + paths[:i % len(paths)]:
            if (mounted.path / p.lstrip("/")).read_bytes() != want[p]:
                errors.append(p)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _cached_at(fed: local.Federation, cache: Path) -> Path:
    """A clinician's config whose cache (the mount's block cache among it) is ``cache``."""
    conf = fed.root / f"clinician-{cache.name}.conf"
    text = fed.config("clinician").read_text()
    conf.write_text("\n".join(f"cache_dir = {cache}" if line.startswith("cache_dir") else line
                              for line in text.splitlines()) + "\n")
    return conf


def test_the_disk_cache_serves_no_damaged_block(federation: local.Federation, tmp_path: Path) -> None:
    """The mount's disk cache returned what it found on disk unchecked: a block damaged there (a
    crash before it reached the disk, a bad sector) was served as file content."""
    [path] = _upload(federation, "/fuse/cache", "rtdose.dcm")
    with Client(federation.config("clinician")) as c:
        want = c.read_file(path)
    conf = _cached_at(federation, tmp_path / "cache")
    m = Mount(conf, tmp_path / "first")
    try:
        assert (m.path / path.lstrip("/")).read_bytes() == want
    finally:
        m.close()
    def written() -> list[Path]:                 # by the mount's writer thread, at the latest on unmount
        return [p for p in (tmp_path / "cache" / "mount" / "blocks").glob("*/*") if not p.name.startswith(".")]
    deadline = time.monotonic() + 10
    while not written() and time.monotonic() < deadline:
        time.sleep(0.1)
    [block] = written()
    damaged = bytearray(block.read_bytes())
    damaged[-1] ^= 0xFF
    block.write_bytes(damaged)
    m = Mount(conf, tmp_path / "second")                 # memory empty: the disk is read
    try:
        assert (m.path / path.lstrip("/")).read_bytes() == want
        assert "held damaged blocks; they are fetched again" in m.log.read_text()
    finally:
        m.close()


def test_a_full_cache_disk_fails_no_read(federation: local.Federation, tmp_path: Path, tmpfs: Path) -> None:
    """A full cache disk failed the read of a block already fetched and verified (ENOSPC)."""
    [path] = _upload(federation, "/fuse/full-cache", "rtdose.dcm")
    with Client(federation.config("clinician")) as c:
        want = c.read_file(path)
    m = Mount(_cached_at(federation, tmpfs), tmp_path / "mnt")
    try:
        serving.fill(tmpfs)                                  # the cache's disk, full
        assert (m.path / path.lstrip("/")).read_bytes() == want
    finally:
        m.close()
    # The unmount is lazy: the mount process closes its cache (its writer's last, failing
    # write included) after umount returns.  Once it has, no half-written block is left.
    deadline = time.monotonic() + 10
    while list((tmpfs / "mount" / "blocks").glob("*/.*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list((tmpfs / "mount" / "blocks").glob("*/.*"))


def test_identified_mount_is_for_clinicians(federation: local.Federation, tmp_path: Path) -> None:
    [path] = _upload(federation, "/fuse/id", "CT_small.dcm")
    refused = _dgf("mount", str(tmp_path), "--identified", config=federation.config("researcher"))
    assert refused.returncode == 4 and "only clinicians" in refused.stderr
    m = Mount(federation.config("clinician"), tmp_path / "id", "--identified")
    try:
        target = m.path / path.lstrip("/")
        original = corpus.file("CT_small.dcm").read_bytes()
        # stat before any read already gives the original's size (tar stats, then reads: a
        # de-identified size there was "File shrank by 32 bytes" and a corrupt archive).
        listed = {e.name: e.stat().st_size for e in os.scandir(target.parent)}
        assert listed[target.name] == os.stat(target).st_size == len(original)
        with Client(federation.config("clinician")) as c:
            assert c.stat(path).size != len(original)          # the stored object is smaller
        archive = tmp_path / "study.tar"
        tar = subprocess.run(["tar", "-cf", str(archive), "-C", str(target.parent), target.name],
                             capture_output=True, text=True, timeout=60)
        assert tar.returncode == 0 and tar.stderr == ""
        with tarfile.open(archive) as t:
            member = t.extractfile(target.name)
            assert member is not None and member.read() == original
        assert target.read_bytes() == original
        summary = json.loads(os.getxattr(target, "user.dgf.identity"))
        assert "CompressedSamples^CT1" in json.dumps(summary)
    finally:
        m.close()
    with Client(federation.config("admin")) as admin:
        assert any(e["action"] == "identity.release" and e["target"] == path for e in admin.audit_log(50))


def _mount_pid(where: Path) -> int:
    """The pid of the (daemonized) ``dgf mount`` serving ``where``."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mount" in argv and str(where).encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no dgf mount process serves {where}")


def test_one_listing_gives_the_kernel_every_entry_attributes(federation: local.Federation, mounted: Mount,
                                                             tmp_path: Path) -> None:
    """The mount answers READDIRPLUS with each entry's attributes, so a stat of every listed
    entry asks the mount nothing more: the FUSE replies for a listing of 16 files stay a handful
    (one LOOKUP per entry before; the first ``ls -l`` of 1000 files took 157 ms).  The attributes
    the kernel got that way are the archive's, exactly.  Listed again at once, the mount hands
    names only (the kernel still holds the attributes): that costs no LOOKUPs either."""
    files = corpus.fresh_instances(tmp_path / "src", 16)
    with Client(federation.config("clinician")) as c:
        c.upload(files, to="/fuse/plus")
        archived = {os.path.basename(s.path): s for s in c.ls("/fuse/plus")}
    directory = mounted.path / "fuse/plus"
    os.stat(directory)
    tracer = subprocess.Popen(["strace", "-f", "-y", "-e", "trace=writev", "-o", str(tmp_path / "replies"),
                               "-p", str(_mount_pid(mounted.path))], stderr=subprocess.PIPE, text=True)
    try:
        assert tracer.stderr is not None and "attached" in tracer.stderr.readline()
        seen = {e.name: e.stat() for e in os.scandir(directory)}
        again = {e.name: e.stat() for e in os.scandir(directory)}
    finally:
        tracer.terminate()
        tracer.wait(10)
    replies = (tmp_path / "replies").read_text().count("</dev/fuse>")
    assert 1 <= replies < 10, f"{replies} FUSE replies for two listings and two stats of each of 16 files"
    assert sorted(seen) == sorted(again) == sorted(archived) and len(seen) == 16
    for name, st in [*seen.items(), *again.items()]:
        want = archived[name]
        assert (st.st_size, st.st_nlink, st.st_mtime_ns, stat.S_IMODE(st.st_mode)) == \
            (want.size, want.nlink, int(want.mtime * 1e9), want.mode), name


def test_a_listing_of_many_kernel_pages_gives_each_entry_once(federation: local.Federation,
                                                              mounted: Mount) -> None:
    """A directory whose READDIRPLUS answer fills more than one kernel buffer (~1 MiB here: 3000
    entries of 250-byte names are ~1.2 MB) is listed over several calls, each continuing at the
    offset the last one gave: every entry once, none lost or repeated, each with its own
    attributes.

    Then 24 listings at once, each midway (its first call made), while names are added that
    sort before all others: each goes on from its own snapshot and gives the entries it began
    with, each once.  The mount kept 16 unfinished listings (a 17th pushed the oldest out, which
    went on in a new listing, offsets shifted), and forgot a listing once its last entry was
    handed, so the kernel's call at the end offset listed again and gave the names added
    meanwhile as entries repeated."""
    names = [f"{i:04d}-" + "n" * 245 for i in range(3000)]
    with Client(federation.config("clinician")) as c:
        c.mkdir("/fuse/pages", parents=True)
        for name in names:
            c.mkdir(f"/fuse/pages/{name}")
    directory = mounted.path / "fuse/pages"
    listed = list(os.scandir(directory))
    got = sorted(e.name for e in listed)
    assert len(got) == len(names), f"{len(got)} entries listed of {len(names)}"
    assert got == names, "entries listed are not the directory's"
    assert all(e.is_dir(follow_symlinks=False) and e.stat().st_nlink == 2 for e in listed)

    listings = [os.scandir(directory) for _ in range(24)]
    try:
        firsts = [next(it).name for it in listings]          # one call each, at offset 0
        for k in range(30):
            os.mkdir(directory / f"+{k:02d}")                # listed before every other name
        for first, it in zip(firsts, listings):
            again = [first, *(e.name for e in it)]
            assert len(again) == len(set(again)), f"{len(again) - len(set(again))} entries listed twice"
            assert sorted(again) == names
    finally:
        for it in listings:
            it.close()
    assert len(os.listdir(directory)) == 3030                 # a listing begun now has them


def test_identified_mount_rebuilds_large_originals_on_disk(federation: local.Federation, tmp_path: Path) -> None:
    """An identified open of an object over 8 MiB rebuilds the original into an unlinked file in
    the mount's spool: it held the object and its original in memory for each open (two opens of
    a 150 MB multi-frame: ~700 MB in the mount's process)."""
    from bench import synth

    src = synth.multiframe(tmp_path / "large.dcm", 150 * 1024 * 1024)
    with Client(federation.config("clinician")) as c:
        c.upload([src], to="/fuse/large-id")
        [path] = [s.path for s in c.ls("/fuse/large-id")]
    cache = tmp_path / "cache"
    m = Mount(_cached_at(federation, cache), tmp_path / "id", "--identified")
    try:
        target = m.path / path.lstrip("/")
        want = hashlib.sha256(src.read_bytes()).hexdigest()
        with open(target, "rb") as one, open(target, "rb") as two:      # two originals open at once
            assert two.read(1 << 20) == src.read_bytes()[:1 << 20]
            assert hashlib.sha256(one.read()).hexdigest() == want
            spooled = cache / "mount" / "spool" / "originals"
            assert spooled.is_dir() and not any(spooled.iterdir())     # unlinked once open
        status = (Path("/proc") / str(_mount_pid(m.path)) / "status").read_text()
        peak = next(int(line.split()[1]) << 10 for line in status.splitlines() if line.startswith("VmHWM:"))
        assert peak < 300 * 1024 * 1024, peak
        assert json.loads(os.getxattr(target, "user.dgf.identity"))["original_sha256"] == want
    finally:
        m.close()


def test_dead_site_gives_clean_eio_and_unmount_with_open_files(fresh_federation: local.Federation,
                                                              tmp_path: Path) -> None:
    fed = fresh_federation
    with Client(fed.config("admin")) as admin:
        admin.mkdir("/dead")
        admin.meta.call("admin.replicas.set", path="/dead", copies=1)     # its only copy dies
    with Client(fed.config("clinician")) as c:
        c.upload([corpus.file("CT_small.dcm")], to="/dead", site="site-a")
        c.upload([corpus.file("MR_small.dcm")], to="/kept", site="site-a")  # two copies
        path = c.ls("/dead")[0].path
        kept = c.ls("/kept")[0].path
    m = Mount(fed.config("clinician"), tmp_path / "m")
    try:
        pid = int(local.status(fed.root)["processes"]["site-a"]["pid"])  # type: ignore[index]
        serving.kill(pid)
        assert (m.path / kept.lstrip("/")).read_bytes() == corpus.file("MR_small.dcm").read_bytes() or \
            (m.path / kept.lstrip("/")).read_bytes()[128:132] == b"DICM"    # read from the other copy
        with pytest.raises(OSError) as eio:
            (m.path / path.lstrip("/")).read_bytes()
        assert eio.value.errno == 5
        assert os.listdir(m.path / "dead")                   # metadata still browses
        held = open(m.path / "dead" / os.path.basename(path), "rb")
        busy = _dgf("umount", str(m.path))
        assert busy.returncode == 2 and "busy" in busy.stderr
        held.close()
    finally:
        m.close()
    deadline = time.time() + 10
    while os.path.ismount(m.path) and time.time() < deadline:
        time.sleep(0.1)
    assert not os.path.ismount(m.path)


def test_a_copy_moved_while_a_file_is_open_is_found_again(fresh_federation: local.Federation,
                                                           tmp_path: Path) -> None:
    """A drain moves the only copy of an open file to another site: the mount's next read finds
    it there (the file is resolved again), instead of failing with EIO."""
    from bench import synth

    fed = fresh_federation
    with Client(fed.config("admin")) as admin:
        admin.mkdir("/moved")
        admin.meta.call("admin.replicas.set", path="/moved", copies=1)
    big = synth.multiframe(tmp_path / "big.dcm", 30 * 1024 * 1024, seed=5)   # 8 blocks; readahead takes 4
    with Client(fed.config("clinician")) as c:
        c.upload([big], to="/moved", site="site-a")
        path = c.ls("/moved")[0].path
        want = c.read_file(path)
    m = Mount(fed.config("researcher"), tmp_path / "m")
    try:
        with open(m.path / path.lstrip("/"), "rb") as fh:
            assert fh.read(4096) == want[:4096]                       # resolved, first block read
            drained = subprocess.run([str(BIN / "dgf"), "admin", "site", "drain", "site-a"],
                                     capture_output=True, text=True, timeout=120,
                                     env=dict(os.environ, DGF_CONFIG=str(fed.config("admin"))))
            assert drained.returncode == 0 and "1 object(s) moved" in drained.stdout, drained.stdout
            fh.seek(28 * 1024 * 1024)
            assert fh.read(1024 * 1024) == want[28 * 1024 * 1024:29 * 1024 * 1024]   # from site-b now
    finally:
        m.close()


def test_the_mount_daemonizes_only_when_no_other_thread_runs() -> None:
    """libfuse forks in C with the GIL let go: a thread alive then (a closing SSH transport)
    could leave the daemon waiting for a GIL no thread of it holds (seen once: every access to
    the mount hung).  The mount first waits for other threads to end, and says so if one does
    not."""
    code = ("import threading, time\nfrom dgf import errors, fuse\n"
            "t = threading.Thread(target=time.sleep, args=(0.3,)); t.start()\n"
            "fuse._only_this_thread(5)\nassert not t.is_alive()\n"
            "threading.Thread(target=time.sleep, args=(30,), daemon=True, name='stuck').start()\n"
            "try:\n    fuse._only_this_thread(0.2)\nexcept errors.ServerError as e:\n    print(e.message)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "stuck" in out.stdout and "--foreground" in out.stdout


def test_an_mfusepy_with_another_readdir_mounts_without_listing_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mount overrides mfusepy 3.1's readdir (not a public interface).  An mfusepy whose
    readdir differs gets its own FUSE class: listings without attributes, but a working mount
    rather than one whose every readdir fails on a signature it does not know."""
    import mfusepy

    from dgf import fuse

    assert fuse._fuse_class() is fuse._Fuse            # the mfusepy this project installs

    class Changed(mfusepy.FUSE):
        def readdir_fuse_3(self, path: bytes, buf: object, filler: object, offset: int, fip: object) -> int:
            return 0

    class ChangedRelease(mfusepy.FUSE):
        def releasedir(self, path: bytes, fip: object, flags: int) -> int:
            return 0

    for changed in (Changed, ChangedRelease):
        monkeypatch.setattr(mfusepy, "FUSE", changed)
        assert fuse._fuse_class() is changed


def test_open_listings_are_bounded_in_names_as_well_as_in_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each open listing keeps its names until its directory is closed; all of them together
    keep at most LISTED_NAMES_KEPT names (256 open listings of a directory of a million entries
    would hold 2 GB), the oldest let go first, never the one being read.  (The kernel's side is
    stubbed: a filler whose buffer is full after one entry, so every listing stays open.)"""
    import collections
    import threading
    import types

    from dgf import fuse

    monkeypatch.setattr(fuse, "LISTED_NAMES_KEPT", 2500)
    f = fuse._Fuse.__new__(fuse._Fuse)
    f._listings, f._handed, f._listings_lock = collections.OrderedDict(), collections.OrderedDict(), threading.Lock()
    f.encoding, f.errors = "utf-8", "surrogateescape"
    listed: list[int] = []

    def readdir(path: str, fh: int) -> list[str]:
        listed.append(fh)
        return [".", "..", *(f"n{i:04d}" for i in range(1000))]
    f.operations = types.SimpleNamespace(readdir=readdir)
    full = lambda buf, name, st, off, plus: 1                 # noqa: E731 - one entry fills it
    for fh in range(1, 6):
        assert f.readdir_fuse_3(b"/big", None, full, 0, types.SimpleNamespace(contents=types.SimpleNamespace(fh=fh)), 0) == 0
    assert list(f._listings) == [4, 5]                        # 2 x 1002 names kept, not 3
    given: list[bytes] = []
    assert f.readdir_fuse_3(b"/big", None, lambda buf, name, st, off, plus: given.append(name) or 0, 1,
                            types.SimpleNamespace(contents=types.SimpleNamespace(fh=5)), 0) == 0
    assert len(given) == 1001 and listed == [1, 2, 3, 4, 5]   # listing 5 went on from its snapshot
