"""Faults tried for real (issue 14): a full disk, the metaserver killed mid-upload, a site killed
mid-repair.  Each asserts nothing lost, nothing half-visible, a clear error, and recovery by
``dgf fsck --repair``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import synth
from dgf import errors, local
from dgf.client import Client
from ioserver.store import object_path
from tests import corpus, serving

BIN = Path(sys.executable).parent


def _dgf(fed: local.Federation, principal: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DGF_CONFIG=str(fed.config(principal)))
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env, timeout=300)


def _pid(fed: local.Federation, name: str) -> int:
    return int(local.status(fed.root)["processes"][name]["pid"])  # type: ignore[index]


def _wait_dead(fed: local.Federation, name: str) -> None:
    deadline = time.monotonic() + 10
    while local.status(fed.root)["processes"][name]["running"] and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.05)


def test_a_full_disk_is_named_and_keeps_nothing(tmp_path: Path, tmpfs: Path) -> None:
    root = tmp_path / "fed"
    root.mkdir()
    (root / "store-site-b").symlink_to(tmpfs)            # site-b's store on the small disk
    fed = local.up(root)
    try:
        big = synth.multiframe(tmp_path / "big.dcm", 6 * 1024 * 1024, seed=9)   # more than the disk
        (tmp_path / "small").mkdir()
        # The small file first, on its own: sent beside the big one (another channel), it could
        # find the disk already filled by the big one's partial write, and fail with it.
        up = _dgf(fed, "clinician", "dgf_up", str(corpus.fresh_instances(tmp_path / "small", 1)[0]), "--to", "/full")
        assert up.returncode == 0 and "uploaded 1 file(s)" in up.stdout, up.stderr
        up = _dgf(fed, "clinician", "dgf_up", str(big), "--to", "/full")
        assert up.returncode == 8, up.stderr
        assert f"error: {big}: site site-b refused the object: the site's disk is full" in up.stderr
        with Client(fed.config("clinician")) as c:
            assert len(c.ls("/full")) == 1
        # Nothing half-written stays on the full disk; site-a's copy of the big one is an orphan.
        assert not [p for p in (tmpfs / "tmp").iterdir()]
        check = _dgf(fed, "admin", "dgf", "fsck")
        assert check.returncode == 0 and "1 orphans:" in check.stdout and "site site-a" in check.stdout
        repaired = _dgf(fed, "admin", "dgf", "fsck", "--repair", "--grace", "0")
        assert "1 orphans removed" in repaired.stdout and repaired.returncode == 0
    finally:
        local.down(fed.root, quiet=True)


def test_a_full_metaserver_disk_is_named_and_reads_go_on(tmp_path: Path, tmpfs: Path) -> None:
    """The metaserver's database on a disk that fills up: every write (a mkdir, an upload's
    audited pseudonyms) was "the server failed on verb ... (OperationalError)" with a traceback
    per request.  Now the refusal names the full disk, reads go on, the log says so once, and
    writes work again once space is freed."""
    fed = local.up(tmp_path / "fed", db=f"sqlite:///{tmpfs / 'metadata.db'}")
    try:
        first, second = corpus.fresh_instances(tmp_path / "src", 2)
        assert _dgf(fed, "clinician", "dgf_up", str(first), "--to", "/in").returncode == 0
        serving.fill(tmpfs)                                  # the disk, full
        full = "the metadata server's database has no room left (its disk is full); nothing was changed"
        for args in (("dgf", "mkdir", "/more"), ("dgf_up", str(second), "--to", "/in")):
            refused = _dgf(fed, "clinician", *args)
            assert refused.returncode == 8 and full in refused.stderr, refused.stderr
        listed = _dgf(fed, "clinician", "dgf", "ls", "/in")                 # reads go on
        assert listed.returncode == 0 and len(listed.stdout.split()) == 1, listed.stderr
        log = (fed.root / "logs" / "metaserver.log").read_text()
        assert log.count("the database has no room left") == 1 and "OperationalError" not in log
        (tmpfs / "filler").unlink()
        assert _dgf(fed, "clinician", "dgf", "mkdir", "/more").returncode == 0
        again = _dgf(fed, "clinician", "dgf_up", str(second), "--to", "/in")
        assert again.returncode == 0 and "uploaded 1 file(s)" in again.stdout, again.stderr
    finally:
        local.down(fed.root, quiet=True)


def test_the_metaserver_killed_mid_upload(tmp_path: Path) -> None:
    """The objects reached the sites, the commit never happened: nothing is visible, the upload
    fails with a named error, a re-run after the restart completes, and the first run's copies
    are found as orphans (or reused by the re-run)."""
    fed = local.up(tmp_path / "fed")
    try:
        files = synth.small_corpus(tmp_path / "src", 40, seed=3)
        meta = _pid(fed, "metaserver")
        killed: list[str] = []

        with Client(fed.config("clinician")) as c:
            original = c.meta.call

            def call(verb: str, payload: bytes = b"", wait_s: float | None = None,
                     **args: object) -> tuple[dict[str, object], bytes]:
                # The fault at its point, not after a guessed delay (an upload of 40 small files
                # can be over in 50 ms): every object is on the sites, the commit is next.
                if verb == "up.commit" and not killed:
                    killed.append(verb)
                    os.kill(meta, signal.SIGKILL)
                    _wait_dead(fed, "metaserver")
                return original(verb, payload, wait_s, **args)

            c.meta.call = call  # type: ignore[method-assign]
            with pytest.raises(errors.TransportError, match="metaserver"):
                c.upload(files, to="/cut", batch=40)
        assert killed == ["up.commit"]
        again = local.up(fed.root)
        assert set(again.started) == {"metaserver", "site-a", "site-b"}
        with Client(fed.config("clinician")) as c:
            with pytest.raises(errors.NotFound):
                c.stat("/cut")                                       # nothing half-visible
            report = c.upload(files, to="/cut")
            assert report.uploaded == 40 and not report.failed
        assert _dgf(fed, "admin", "dgf", "fsck").returncode == 0
    finally:
        local.down(fed.root, quiet=True)


@contextlib.contextmanager
def _kill_when_logged(fed: local.Federation, logs: str, text: str, pick: Callable[[Path], int]) -> Iterator[None]:
    """While the block runs, SIGKILL the process ``pick(log)`` names as soon as a log matching
    ``logs`` (under the federation's logs/) shows ``text``: a fault at a known point, not after
    a guessed delay."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for log in (fed.root / "logs").glob(logs):
                if text in log.read_text(errors="replace"):
                    os.kill(pick(log), signal.SIGKILL)
                    return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _kill_on_first_progress(pid: int) -> tuple[Callable[[int], None], list[int]]:
    """A progress callback that SIGKILLs ``pid`` when the first bytes move, and the list that
    records it happened."""
    killed: list[int] = []

    def progress(n: int) -> None:
        if not killed:
            killed.append(n)
            os.kill(pid, signal.SIGKILL)

    return progress, killed


def _three_sites_with_large_files(tmp_path: Path, seed: int) -> local.Federation:
    """Three sites holding /big: eight 20 MiB objects, two copies each, every first copy on
    site-a.  Placement is by the series' pseudonym (a random vault key per federation), so
    without ``site`` site-a held one or two of the eight in a few runs in a hundred: the tests
    that kill it and then a site mid-repair had a repair of one or two copies, which could end
    before the kill."""
    fed = local.up(tmp_path / "fed", sites=("site-a", "site-b", "site-c"))
    big = tmp_path / "big"
    big.mkdir()
    for i in range(8):
        synth.multiframe(big / f"b{i}.dcm", 20 * 1024 * 1024, seed=seed + i)
    try:
        with Client(fed.config("clinician")) as c:
            assert c.upload(sorted(big.iterdir()), to="/big", site="site-a").uploaded == 8
            assert all("site-a" in dict(c.stat(st.path).replicas) for st in c.ls("/big"))
    except BaseException:
        local.down(fed.root, quiet=True)
        raise
    return fed


def test_a_site_killed_mid_repair(tmp_path: Path) -> None:
    """The target of site-to-site copies dies after its first one: the repair names it, every
    copy recorded there is whole, and a later repair completes."""
    fed = _three_sites_with_large_files(tmp_path, seed=20)
    try:
        # Lose site-a for good, then kill whichever site first finishes a copy of the repair.
        os.kill(_pid(fed, "site-a"), signal.SIGKILL)
        _wait_dead(fed, "site-a")
        killed: list[str] = []

        def victim(log: Path) -> int:
            killed.append(log.stem)
            return _pid(fed, log.stem)

        with _kill_when_logged(fed, "site-[bc].log", "replicated", victim):
            first = _dgf(fed, "admin", "dgf", "fsck", "/big", "--repair")
        assert killed and first.returncode == 6
        assert f"site {killed[0]}" in first.stdout and "repairs that failed" in first.stdout
        with Client(fed.config("clinician")) as c:
            for st in c.ls("/big"):
                for site, _ in c.stat(st.path).replicas:
                    if site == killed[0]:     # recorded there: the whole object is there
                        stored = object_path(fed.root / f"store-{site}", st.object_key or "")
                        assert hashlib.sha256(stored.read_bytes()).hexdigest() == st.object_key
        _wait_dead(fed, killed[0])
        local.up(fed.root)                                         # site-a and the victim come back
        healed = _dgf(fed, "admin", "dgf", "fsck", "/big", "--repair")
        assert healed.returncode == 0, healed.stdout
        with Client(fed.config("clinician")) as c:
            out = c.download(["/big"], tmp_path / "out")
            assert out.downloaded == 8 and not out.failed
    finally:
        local.down(fed.root, quiet=True)


def _two_and_one(fed: local.Federation, tmp: Path, two: int, one: int) -> None:
    """``two`` files under /two (two copies, the default) and ``one`` under /only-b, whose only
    copies are on site-b: what a fault of site-b costs, with and without a second copy."""
    with Client(fed.config("admin")) as admin:
        admin.mkdir("/only-b")
        admin.meta.call("admin.replicas.set", path="/only-b", copies=1)
    with Client(fed.config("clinician")) as c:
        c.upload(corpus.fresh_instances(tmp / "two", two), to="/two")
        c.upload(corpus.fresh_instances(tmp / "one", one), to="/only-b", site="site-b")


class _Proxy:
    """A TCP relay in front of a site that can stop forwarding (a network partition: packets
    vanish, no connection is refused or reset)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.forwarding = True
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if self.forwarding:
                    b.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()


def test_a_partitioned_site_costs_a_named_error_and_reads_go_to_the_other_copy(tmp_path: Path) -> None:
    fed = local.up(tmp_path / "fed")
    proxy: _Proxy | None = None
    try:
        _two_and_one(fed, tmp_path, 4, 2)
        # site-b is reached through the relay from now on: it registers the relay's address (as
        # a site behind NAT would), with its own key.
        address = (fed.root / "site-b.addr").read_text().strip()
        proxy = _Proxy(int(address.rsplit(":", 1)[1]))
        from dgf import crypto, ssh

        host, port = fed.metaserver.rsplit(":", 1)
        meta_key = " ".join((fed.root / "keys" / "metaserver_host.pub").read_text().split()[:2])
        conn = ssh.Connection(host, int(port), crypto.load_paramiko_key(fed.root / "keys" / "site-b"), meta_key,
                               "dgf-meta", name="the metaserver")
        try:
            conn.channel().call("site.register", site="site-b", host="127.0.0.1", port=proxy.port,
                                host_key=" ".join((fed.root / "keys" / "site-b_host.pub").read_text().split()[:2]))
        finally:
            conn.close()
        cfg = fed.root / "clinician-3s.conf"
        cfg.write_text(fed.config("clinician").read_text() + "timeout = 3\n")
        with Client(cfg) as c:
            assert c.download(["/two"], tmp_path / "before").downloaded == 4      # through the relay
        proxy.forwarding = False                                                 # the partition
        with Client(cfg) as c:
            t0 = time.monotonic()
            both = c.download(["/two"], tmp_path / "two-out")
            assert both.downloaded == 4 and not both.failed                      # the other copies
            only = c.download(["/only-b"], tmp_path / "one-out")
            took = time.monotonic() - t0
        assert only.downloaded == 0 and len(only.failed) == 2
        assert all("site site-b" in f.reason for f in only.failed)
        assert took < 20, took
    finally:
        if proxy is not None:
            proxy.close()
        local.down(fed.root, quiet=True)


def _libfaketime() -> str:
    import glob

    found = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    assert found, "libfaketime is needed (Debian package faketime; make test installs it as root)"
    return found[0]


@pytest.mark.parametrize("skew", ["+2h", "-2h"])
def test_a_site_with_a_skewed_clock(tmp_path: Path, skew: str) -> None:
    """A site whose clock is two hours off refuses every capability with an error that names
    the clock (never a silent failure), and reads go to the other copy; within a minute of
    difference nothing is refused."""
    fed = local.up(tmp_path / "fed")
    try:
        _two_and_one(fed, tmp_path, 3, 1)

        faked: list[int] = []

        def restart_site_b(offset: str) -> None:
            pid = _pid(fed, "site-b")
            os.kill(pid, signal.SIGKILL)
            _wait_dead(fed, "site-b")
            if pid in faked:              # libfaketime's shared memory outlives a killed process
                for leftover in (f"/dev/shm/faketime_shm_{pid}", f"/dev/shm/sem.faketime_sem_{pid}"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
            saved = {k: os.environ.get(k) for k in ("LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_RESET")}
            os.environ.update(LD_PRELOAD=_libfaketime(), FAKETIME=offset, FAKETIME_DONT_RESET="1")
            try:
                assert local.up(fed.root).started == ("site-b",)
                faked.append(_pid(fed, "site-b"))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

        restart_site_b(skew)
        with Client(fed.config("clinician")) as c:
            both = c.download(["/two"], tmp_path / "two-out")
            assert both.downloaded == 3 and not both.failed                     # the other copies
            only = c.download(["/only-b"], tmp_path / "one-out")
        assert only.downloaded == 0 and "clock" in only.failed[0].reason and "site-b" in only.failed[0].reason
        restart_site_b("+30s")                                                  # within the leeway
        with Client(fed.config("clinician")) as c:
            assert c.download(["/only-b"], tmp_path / "near").downloaded == 1
    finally:
        local.down(fed.root, quiet=True)


def test_the_metaserver_killed_mid_repair(tmp_path: Path) -> None:
    """The metaserver dies while a repair copies: the repair stops with a named error; copies
    made but not yet recorded are orphans, not half-recorded replicas; after the restart the
    repair completes and the archive is whole."""
    fed = _three_sites_with_large_files(tmp_path, seed=40)
    try:
        os.kill(_pid(fed, "site-a"), signal.SIGKILL)                      # copies to make again
        _wait_dead(fed, "site-a")
        meta = _pid(fed, "metaserver")
        # The metaserver dies as soon as a site reports a finished copy: mid-repair.
        with _kill_when_logged(fed, "site-*.log", "replicated", lambda _: meta):
            cut = _dgf(fed, "admin", "dgf", "fsck", "--repair")
        assert cut.returncode != 0
        assert "metaserver" in cut.stdout + cut.stderr
        _wait_dead(fed, "metaserver")
        local.up(fed.root)                                               # everything back, site-a too
        healed = _dgf(fed, "admin", "dgf", "fsck", "--repair", "--grace", "0")
        assert healed.returncode == 0, healed.stdout + healed.stderr
        with Client(fed.config("clinician")) as c:
            for st in c.ls("/big"):
                assert len([s for s, state in c.stat(st.path).replicas if state == "ok"]) >= 2
            assert c.download(["/big"], tmp_path / "out").downloaded == 8
        assert _dgf(fed, "admin", "dgf", "fsck").returncode == 0
    finally:
        local.down(fed.root, quiet=True)


def test_a_site_killed_mid_download_and_mid_reconstruction(tmp_path: Path) -> None:
    """Large objects stream from a site that dies part-way: the download finishes from the other
    copies, every file whole (no half-written file left); a reconstruction whose site dies while
    it back-projects redoes that share on the other copies."""
    import numpy as np

    from dgf.dicom.projections import projection_series, read_projection
    from ioserver.recon import circular, fdk, phantom

    fed = local.up(tmp_path / "fed")
    try:
        big = tmp_path / "big"
        big.mkdir()
        for i in range(4):
            synth.multiframe(big / f"b{i}.dcm", 40 * 1024 * 1024, seed=60 + i)
        # A volume large enough that back-projecting takes a while: the kill lands mid-partial.
        g = circular(30, 500.0, 800.0, (64, 64), (1.6, 1.6), (64, 64, 64), (1.0, 1.0, 1.0))
        projections = phantom.project(g, 25.0)
        with Client(fed.config("clinician")) as c:
            assert c.upload(sorted(big.iterdir()), to="/big").uploaded == 4
            c.recon_import(projections, g, "/scan")
            keys = {st.path: st.object_key for st in c.ls("/big")}
        # site-b dies as soon as the first object has arrived: others are streaming meanwhile.
        out = tmp_path / "out"
        progress, killed = _kill_on_first_progress(_pid(fed, "site-b"))
        with Client(fed.config("researcher")) as r:
            report = r.download(["/big"], out, progress=progress)
        assert killed
        assert report.downloaded == 4 and not report.failed, [f.reason for f in report.failed]
        got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.dcm")}
        assert sorted(got.values()) == sorted(keys.values())
        assert not [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".dcm")]
        _wait_dead(fed, "site-b")
        local.up(fed.root)
        # The same for a reconstruction: site-a dies as it starts back-projecting.
        with _kill_when_logged(fed, "site-a.log", "back-projecting", lambda _: _pid(fed, "site-a")):
            with Client(fed.config("clinician")) as c:
                with Client(fed.config("admin")) as admin:
                    admin.mkdir("/scan-fdk")
                    admin.meta.call("admin.replicas.set", path="/scan-fdk", copies=1)   # one site is left
                done = c.recon("/scan", "/scan-fdk")
        # Whichever sites did the work, every projection was summed once: the single-node result.
        stack = np.stack([read_projection(f)[3] for f in projection_series(projections, g)])
        single = fdk(stack, g, "hann")
        np.testing.assert_allclose(done.volume, single, atol=1e-5 * float(np.abs(single).max()))
        assert len(done.paths) == 64 and "site-a" not in done.sites
    finally:
        local.down(fed.root, quiet=True)


@pytest.mark.parametrize("spare", [True, False], ids=["with-a-spare-site", "without"])
def test_a_site_killed_mid_upload(tmp_path: Path, spare: bool) -> None:
    """A site dies while large objects stream to it.  With a spare site its copies go there and
    every file is published with its two copies; without one, the files that lost a copy are
    reported by the site's name and not published, the others are whole.  Nothing half-written
    is visible, and once the site is back 'fsck --repair' finds the archive whole."""
    sites = ("site-a", "site-b", "site-c") if spare else ("site-a", "site-b")
    fed = local.up(tmp_path / "fed", sites=sites)
    try:
        big = tmp_path / "big"
        big.mkdir()
        for i in range(6):
            synth.multiframe(big / f"b{i}.dcm", 24 * 1024 * 1024, seed=80 + i)
        progress, killed = _kill_on_first_progress(_pid(fed, "site-b"))
        with Client(fed.config("clinician")) as c:
            # Progress counts the bytes of each file's first copy.  Without a spare, site-b holds
            # every first copy, so the kill lands while site-b still has objects to take (a
            # placement that streamed site-b's copies before site-a's first bytes once let
            # site-b finish everything before it was killed).  A named site is not replaced.
            report = c.upload(sorted(big.iterdir()), to="/streamed", progress=progress,
                              site=None if spare else "site-b")
            assert killed
            published = {st.path: c.stat(st.path) for st in c.ls("/streamed")} if report.paths else {}
            assert sorted(published) == sorted(report.paths)
            for st in published.values():
                assert len([s for s, state in st.replicas if state == "ok"]) == 2
            if spare:
                assert report.uploaded == 6 and not report.failed, [f.reason for f in report.failed]
            else:
                assert report.failed and report.uploaded + len(report.failed) == 6
                assert all("site site-b" in f.reason for f in report.failed), [f.reason for f in report.failed]
        with Client(fed.config("researcher")) as r:                # site-b is still down
            out = r.download(["/streamed"], tmp_path / "out") if published else None
        if out is not None:
            assert out.downloaded == len(published) and not out.failed
            for f in (tmp_path / "out").rglob("*.dcm"):
                data = f.read_bytes()
                assert hashlib.sha256(data).hexdigest() in {st.object_key for st in published.values()}
        _wait_dead(fed, "site-b")
        local.up(fed.root)
        assert not list((fed.root / "store-site-b" / "tmp").iterdir())   # the half-written copy is gone
        repaired = _dgf(fed, "admin", "dgf", "fsck", "--repair", "--grace", "0")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert _dgf(fed, "admin", "dgf", "fsck").returncode == 0
    finally:
        local.down(fed.root, quiet=True)
