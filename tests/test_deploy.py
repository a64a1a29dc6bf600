"""A federation across machines, without loopback shortcuts: the metaserver and each site run in
a network namespace of their own (``ip netns``), joined by veth pairs to one bridge, and talk
only over those links.  One site's link goes down: the archive goes on from the other copies
(issue 14, "On several machines").  Needs root, as CI has."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from dgf import local
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
    # Keys, database, enrolments and configs as 'dgf local up' makes them; then the servers move
    # to their own hosts.
    fed = local.up(tmp_path / "fed")
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
        for site, octet in (("site-a", 3), ("site-b", 4)):
            _config(fed.root / f"{site}.conf", listen=f"{net}.{octet}:7102", metaserver=meta)
        for who in ("admin", "clinician", "researcher"):
            _config(fed.config(who), metaserver=meta)
            with open(fed.config(who), "a") as fh:
                fh.write("timeout = 3\n")

        def start(name: str, module: str, conf: str) -> None:
            ready = fed.root / f"{name}.netns.addr"
            with open(fed.root / "logs" / f"{name}.netns.log", "ab") as log:
                procs[name] = subprocess.Popen(
                    ["ip", "netns", "exec", f"dgf{tag}-{name}", sys.executable, "-m", module, "serve",
                     "--config", str(fed.root / conf), "--ready-file", str(ready)],
                    stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
            deadline = time.monotonic() + 30
            while not ready.exists():
                assert procs[name].poll() is None and time.monotonic() < deadline, \
                    (fed.root / "logs" / f"{name}.netns.log").read_text()
                time.sleep(0.05)

        start("meta", "metaserver.server", "metaserver.conf")
        for site in ("site-a", "site-b"):
            start(site, "ioserver.server", f"{site}.conf")
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
