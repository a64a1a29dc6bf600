"""A federation across machines, without loopback shortcuts: the metaserver and each site run in
a network namespace of their own (``ip netns``), joined by veth pairs to one bridge, and talk
only over those links.  One site's link goes down: the archive goes on from the other copies
(issue 14, "On several machines").  Needs root, as CI has."""

from __future__ import annotations

import configparser
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dgf import crypto, errors, local
from dgf.client import Client
from tests import corpus


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Hosts:
    fed: local.Federation
    net: str                      # the first three octets of the hosts' addresses
    links: dict[str, str]         # host name -> the bridge-side end of its link
    procs: dict[str, subprocess.Popen[bytes]]


def _config(path: Path, **changes: str) -> None:
    lines = []
    for line in path.read_text().splitlines():
        key = line.split(" = ", 1)[0]
        lines.append(f"{key} = {changes[key]}" if key in changes else line)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture()
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    # The metaserver, its database and the users' keys and configs as 'dgf local up' makes them
    # (with no site); then the metaserver moves to its own host, and each site is set up on its
    # host as an operator does and added by an admin (below).
    fed = local.up(tmp_path / "fed", sites=())
    local.down(fed.root)
    tag = f"{os.getpid() % 10000}"
    net = f"10.{77 + os.getpid() % 50}.{os.getpid() % 250}"
    bridge = f"dgfbr{tag}"
    names = {"meta": 2, "site-a": 3, "site-b": 4}
    links = {name: f"dgf{tag}{'m' if name == 'meta' else name[-1]}" for name in names}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    _ip("link", "add", bridge, "type", "bridge")
    try:
        _ip("addr", "add", f"{net}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for name, octet in names.items():
            ns, outside, inside = f"dgf{tag}-{name}", links[name], f"{links[name]}i"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{net}.{octet}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        meta = f"{net}.2:7101"
        _config(fed.root / "metaserver.conf", listen=meta)
        fed = dataclasses.replace(fed, metaserver=meta)
        for who in ("admin", "clinician", "researcher"):
            _config(fed.config(who), metaserver=meta)
            with open(fed.config(who), "a") as fh:
                fh.write("timeout = 3\n")

        def start(name: str, module: str, conf: str, spawn: bool = True, wait: bool = True) -> None:
            ready = fed.root / f"{name}.netns.addr"
            with open(fed.root / "logs" / f"{name}.netns.log", "ab") as log:
                procs[name] = procs[name] if not spawn else subprocess.Popen(
                    ["ip", "netns", "exec", f"dgf{tag}-{name}", sys.executable, "-m", module, "serve",
                     "--config", str(fed.root / conf), "--ready-file", str(ready)],
                    stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
            if not wait:
                return
            deadline = time.monotonic() + 30
            while not ready.exists():
                assert procs[name].poll() is None and time.monotonic() < deadline, \
                    (fed.root / "logs" / f"{name}.netns.log").read_text()
                time.sleep(0.05)

        start("meta", "metaserver.server", "metaserver.conf")
        for site, octet in (("site-a", 3), ("site-b", 4)):
            conf, fingerprint = _site_host(fed, site, f"{net}.{octet}", 7102)
            start(site, "ioserver.server", conf.name, wait=False)
            _await_log(fed.root / "logs" / f"{site}.netns.log", "not enrolled at the metaserver yet", procs[site])
            added = _dgf(fed.config("admin"), "admin", "site", "add", site, f"{net}.{octet}:7102",
                         "--key", str(fed.root / "keys" / f"{site}.pub"), "--host-key", fingerprint)
            assert added.returncode == 0, added.stderr
            start(site, "ioserver.server", conf.name, spawn=False)
        yield Hosts(fed, net, links, procs)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        for name in names:
            subprocess.run(["ip", "netns", "del", f"dgf{tag}-{name}"], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def test_a_federation_across_hosts_survives_a_link_going_down(hosts: Hosts, tmp_path: Path) -> None:
    fed, net = hosts.fed, hosts.net
    with Client(fed.config("admin")) as admin:
        registered = {s.name: s.host for s in admin.sites()}
        assert registered == {"site-a": f"{net}.3", "site-b": f"{net}.4"}        # no loopback anywhere
    with Client(fed.config("clinician")) as c:
        report = c.upload(corpus.fresh_instances(tmp_path / "src", 6), to="/hosts")
        assert report.uploaded == 6 and not report.failed
        assert all(len(c.stat(st.path).replicas) == 2 for st in c.ls("/hosts"))
    _ip("link", "set", hosts.links["site-b"], "down")                             # site-b's link is cut
    t0 = time.monotonic()
    with Client(fed.config("researcher")) as r:
        out = r.download(["/hosts"], tmp_path / "out")
    took = time.monotonic() - t0
    assert out.downloaded == 6 and not out.failed and took < 30, (out.failed, took)
    for f in (tmp_path / "out").rglob("*.dcm"):
        assert f.read_bytes()[128:132] == b"DICM"
    _ip("link", "set", hosts.links["site-b"], "up")                               # and comes back
    with Client(fed.config("admin")) as admin:
        proc = subprocess.run([str(Path(sys.executable).parent / "dgf"), "fsck"], capture_output=True, text=True,
                              env=dict(os.environ, DGF_CONFIG=str(fed.config("admin"))), timeout=120)
        assert proc.returncode == 0 and "12 copies checked" in proc.stdout, proc.stdout + proc.stderr


def _dgf(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "dgf"), *args], capture_output=True, text=True,
                          input=stdin, env=dict(os.environ, DGF_CONFIG=str(config)), timeout=120)


def _await_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.1)


def _site_host(fed: local.Federation, name: str, host: str, port: int) -> tuple[Path, str]:
    """A site host set up as an operator does: a config, then 'dgf-ioserver init' (keys, store);
    returns the config and the host key fingerprint init printed."""
    conf = fed.root / f"{name}.conf"
    conf.write_text("[ioserver]\n"
                    f"site = {name}\nlisten = {host}:{port}\nstore = store-{name}\n"
                    f"host_key = keys/{name}_host\nkey = keys/{name}\nmetaserver = {fed.metaserver}\n"
                    f"metaserver_host_key = {local._host_key_line(fed.root)}\n")
    out = subprocess.run([sys.executable, "-m", "ioserver.server", "init", "--config", str(conf)],
                         capture_output=True, text=True, check=True).stdout
    assert f"dgf admin site add {name} HOST:{port}" in out, out
    return conf, out.split("host key ")[1].split()[0]


def _serve(conf: Path, ready: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "ioserver.server", "serve", "--config", str(conf),
                                 "--ready-file", str(ready)], stdout=fh, stderr=subprocess.STDOUT)


def test_an_admin_adds_a_site_and_its_host_key_stays_pinned(tmp_path: Path) -> None:
    """'dgf admin site add NAME HOST:PORT': the site already listens but is not enrolled, so it
    waits; the admin sees its host key on first contact and confirms it; the site then
    registers and takes copies.  A site that comes back with another host key is refused."""
    fed = local.up(tmp_path / "fed")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with socket.socket() as probe:                          # a free port, named in the config
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        conf, fingerprint = _site_host(fed, "site-c", "127.0.0.1", port)
        ready, log = fed.root / "site-c.addr", fed.root / "logs" / "site-c.log"
        procs.append(_serve(conf, ready, log))
        _await_log(log, "not enrolled at the metaserver yet", procs[0])
        deadline = time.monotonic() + 30
        assert not ready.exists()                                   # listening, but not yet added
        admin, key = fed.config("admin"), str(fed.root / "keys" / "site-c.pub")
        # A fingerprint that is not the one presented: nothing is pinned.
        wrong = _dgf(admin, "admin", "site", "add", "site-c", f"127.0.0.1:{port}", "--key", key,
                     "--host-key", "SHA256:" + "A" * 43)
        assert wrong.returncode != 0 and f"presents host key {fingerprint}" in wrong.stderr, wrong.stderr
        # Shown and declined at the prompt: nothing is pinned either.
        declined = _dgf(admin, "admin", "site", "add", "site-c", f"127.0.0.1:{port}", "--key", key, stdin="n\n")
        assert declined.returncode != 0 and fingerprint in declined.stderr, declined.stderr
        assert "site-c" not in _dgf(admin, "admin", "site", "list").stdout
        # Confirmed at the prompt: pinned, and the waiting site registers.
        added = _dgf(admin, "admin", "site", "add", "site-c", f"127.0.0.1:{port}", "--key", key, "--zone", "c",
                     stdin="y\n")
        assert added.returncode == 0 and f"host key {fingerprint} pinned" in added.stdout, added.stderr
        while not ready.exists():
            assert time.monotonic() < deadline + 30 and procs[0].poll() is None, log.read_text()
            time.sleep(0.1)
        listing = _dgf(admin, "admin", "site", "list").stdout
        assert f"site-c\t127.0.0.1:{port}\tzone c" in listing, listing
        with Client(fed.config("clinician")) as c:
            c.mkdir("/three")
        assert _dgf(admin, "admin", "replicas", "set", "/three", "3").returncode == 0
        with Client(fed.config("clinician")) as c:
            report = c.upload(corpus.fresh_instances(tmp_path / "src", 2), to="/three")
            assert report.uploaded == 2 and not report.failed, report.failed
            assert {s for st in c.ls("/three") for s, _ in c.stat(st.path).replicas} == {"site-a", "site-b", "site-c"}
        assert "site.add" in _dgf(admin, "admin", "audit").stdout
        # The site is rebuilt with a new host key: its registration is refused, it stops, and
        # the pinned key stays (clients would refuse the new one).
        procs[0].kill()
        procs[0].wait()
        for p in fed.root.glob("keys/site-c_host*"):
            p.unlink()
        subprocess.run([sys.executable, "-m", "ioserver.server", "init", "--config", str(conf)], check=True,
                       capture_output=True)
        ready.unlink(missing_ok=True)
        procs.append(_serve(conf, ready, log))
        assert procs[1].wait(timeout=30) != 0
        assert f"not the key {fingerprint} an admin pinned" in log.read_text()
        assert not ready.exists()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        local.down(fed.root, quiet=True)


DEPLOY = Path(__file__).resolve().parent.parent / "examples" / "deploy"


def _unit_commands(unit: str, etc: Path, instance: str = "") -> list[list[str]]:
    """ExecStartPre and ExecStart of a shipped unit, pointed at this test's directories."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / unit)
    return [_localize(parser["Service"][key].replace("%i", instance).split(), etc)
            for key in ("ExecStartPre", "ExecStart")]


def _localize(words: list[str], etc: Path) -> list[str]:
    bin_dir = str(Path(sys.executable).parent) + "/"
    return [w.replace("/usr/local/bin/", bin_dir).replace("/etc/dgf/", f"{etc}/") for w in words]


def _docker_cmd(etc: Path) -> list[str]:
    line = next(ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if ln.startswith("CMD "))
    words: list[str] = json.loads(line[4:])
    return _localize([str(Path(sys.executable).parent / words[0]), *words[1:]], etc)


def test_the_shipped_units_and_image_run_a_federation(tmp_path: Path) -> None:
    """examples/deploy as an operator uses it: the metaserver and a site started by the commands
    of their systemd units (init, then serve), the site added by an admin, a file stored and
    read back; then the metaserver restarted by the container image's command."""
    etc, var = tmp_path / "etc", tmp_path / "var"
    etc.mkdir()
    var.mkdir()
    free = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free.append(probe.getsockname()[1])
    meta_port, site_port = free
    (etc / "metaserver.conf").write_text(
        f"[metaserver]\nlisten = 127.0.0.1:{meta_port}\ndb = sqlite:///{var}/metadata.db\n"
        "host_key = metaserver_host\nvault_key = vault.key\n")
    pre, serve = _unit_commands("dgf-metaserver.service", etc)
    out = subprocess.run(pre, capture_output=True, text=True, check=True).stdout
    host_key = out.split("metaserver_host_key = ")[1].strip()
    for who in ("admin", "clinician"):
        crypto.generate_keypair(etc / who, who)
        (etc / f"{who}.conf").write_text(
            f"[dgf]\nprincipal = {who}\nkey = {who}\nmetaserver = 127.0.0.1:{meta_port}\n"
            f"metaserver_host_key = {host_key}\ncache_dir = {var}/cache-{who}\n")
    subprocess.run([pre[0], "enroll", "--config", str(etc / "metaserver.conf"), "--name", "admin",
                    "--role", "admin", "--public-key", str(etc / "admin.pub")], check=True, capture_output=True)
    uneven = subprocess.run([pre[0], "enroll", "--config", str(etc / "metaserver.conf"), "--name", "clinician",
                             "--name", "other", "--role", "clinician", "--public-key", str(etc / "clinician.pub")],
                            capture_output=True, text=True)
    assert uneven.returncode != 0 and "one --role and one --public-key per --name" in uneven.stderr
    procs: list[subprocess.Popen[bytes]] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("meta", "site", "image")}

    def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT))
        return procs[-1]

    def await_client(who: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client(etc / f"{who}.conf") as c:
                    c.whoami()
                return
            except errors.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.1)

    try:
        meta = start(serve, logs["meta"])
        await_client("admin", meta, logs["meta"])
        assert _dgf(etc / "admin.conf", "admin", "principal", "add", "clinician", "--role", "clinician",
                    "--public-key", str(etc / "clinician.pub")).returncode == 0
        (etc / "site-x.conf").write_text(
            f"[ioserver]\nsite = site-x\nlisten = 127.0.0.1:{site_port}\nstore = {var}/site-x\n"
            f"host_key = site-x_host\nkey = site-x\nmetaserver = 127.0.0.1:{meta_port}\n"
            f"metaserver_host_key = {host_key}\n")
        pre, serve_site = _unit_commands("dgf-ioserver@.service", etc, "site-x")
        fingerprint = subprocess.run(pre, capture_output=True, text=True, check=True).stdout.split("host key ")[1].split()[0]
        site = start(serve_site, logs["site"])
        _await_log(logs["site"], "not enrolled at the metaserver yet", site)
        added = _dgf(etc / "admin.conf", "admin", "site", "add", "site-x", f"127.0.0.1:{site_port}",
                     "--key", str(etc / "site-x.pub"), "--host-key", fingerprint)
        assert added.returncode == 0, added.stderr
        _await_log(logs["site"], "site site-x registered", site)
        src = corpus.fresh_instances(tmp_path / "src", 2)
        with Client(etc / "clinician.conf") as c:
            assert c.upload(src, to="/deployed").uploaded == 2
        meta.kill()
        meta.wait()
        image = start(_docker_cmd(etc), logs["image"])             # the container's command, same config
        await_client("clinician", image, logs["image"])
        with Client(etc / "clinician.conf") as c:
            got = c.download(["/deployed"], tmp_path / "out", identified=True)
        assert got.downloaded == 2 and not got.failed
        originals = sorted(Path(p).read_bytes() for p in src)
        assert sorted(f.read_bytes() for f in (tmp_path / "out").rglob("*.dcm")) == originals
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
