"""The embedded default: a whole federation on loopback, in one directory.

``up`` creates (once) the keys, vault key, database and configs, enrolls an admin, a clinician, a
researcher and two sites, then starts a metaserver and the I/O servers of ``site-a`` and
``site-b`` as background processes on free 127.0.0.1 ports, and writes one client config per
principal.  Running ``up`` again on a stopped directory restarts the same federation with its data.
The servers are started as processes (``python -m metaserver.server``), never imported here.
"""

from __future__ import annotations

import configparser
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgf import crypto, errors
from dgf.config import read_section, write_section

PRINCIPALS = (("admin", "admin"), ("clinician", "clinician"), ("researcher", "researcher"))
SITES = ("site-a", "site-b")
STATE = "federation.json"


@dataclass(frozen=True)
class Federation:
    root: Path
    metaserver: str
    sites: tuple[str, ...]
    pids: dict[str, int]
    #: The processes this call started (all of them, or the dead ones of a running federation).
    started: tuple[str, ...] = ()

    def config(self, principal: str) -> Path:
        return self.root / f"{principal}.conf"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not running
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _read_state(root: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((root / STATE).read_text())
        return state
    except (FileNotFoundError, ValueError):
        return None


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(lines[-n:])


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _run(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise errors.ServerError(f"'{' '.join(args[:2])}' failed: {proc.stderr.strip().splitlines()[-1:]}")


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise errors.ServerError(f"the {what} exited at start: {_tail(log)}")
        time.sleep(0.05)
    raise errors.ServerError(f"the {what} did not start within {timeout:.0f} s: {_tail(log)}")


def _add_limits(conf: Path, limits: dict[str, str] | None) -> None:
    """Append a [limits] section (dgf/limits.py) to a server config written by write_section."""
    if limits:
        with open(conf, "a", encoding="utf-8") as fh:
            fh.write("[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items()) + "\n")


def _free_port(address: str | None) -> int:
    """The port of ``address`` when it can be bound again (a restart keeps its port, so configs
    and site registrations stay valid), else 0 (any free port)."""
    if not address:
        return 0
    port = int(address.rpartition(":")[2])
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def up(root: Path, sites: tuple[str, ...] | None = None, limits: dict[str, str] | None = None,
       db: str | None = None, zones: dict[str, str] | None = None) -> Federation:
    """Start (or restart) the federation in ``root``; ``limits`` overrides server limits (both
    servers read the same table, each the keys that concern it).

    A restart keeps each server's port where it is free.  If some processes still run, only the
    dead ones are started: dead sites alone when the metaserver lives, else the whole federation
    (the live sites are stopped first, as they hold a session to the dead metaserver).  ``db``:
    a database URL (PostgreSQL) instead of the directory's SQLite file; ``zones``: site -> zone.
    ``sites`` defaults to those of the federation already in ``root``, else site-a and site-b."""
    root = root.resolve()
    state = _read_state(root)
    if sites is None:
        # A restart brings back the sites the federation was made with.
        sites = tuple(state["sites"]) if state is not None else SITES
    if state is not None:
        running = {name for name, pid in state["pids"].items() if _alive(int(pid))}
        dead = [name for name in ["metaserver", *state["sites"]] if name not in running]
        if running and not dead:
            raise errors.AlreadyExists(f"a federation is already running in {root}; "
                                       f"'dgf local down {root}' stops it.")
        if running and "metaserver" in running:
            return _restart_sites(root, state, dead)
        if running:
            down(root, quiet=True)
    root.mkdir(parents=True, exist_ok=True)
    keys = root / "keys"
    keys.mkdir(exist_ok=True)
    os.chmod(keys, 0o700)
    logs = root / "logs"
    meta_conf = root / "metaserver.conf"
    fresh = not meta_conf.exists()
    kept = read_section(meta_conf, "metaserver") if not fresh else {}
    if db is None:
        db = kept.get("db")                  # a restart keeps its database and its vault key source
    previous = state or {}
    write_section(meta_conf, "metaserver", {
        "listen": f"127.0.0.1:{_free_port(previous.get('metaserver'))}",
        "db": db or f"sqlite:///{root / 'metadata.db'}",
        "host_key": "keys/metaserver_host", "vault_key": kept.get("vault_key") or "keys/vault.key"})
    _add_limits(meta_conf, limits)
    for name in [p for p, _ in PRINCIPALS] + list(sites):
        for suffix in ("", "_host") if name in sites else ("",):
            path = keys / f"{name}{suffix}"
            if not path.exists():
                crypto.generate_keypair(path, f"dgf-{name}{suffix}")
    # One process initialises and (the first time) enrolls everyone: each start costs ~0.8 s.
    enroll = [a for name, role in list(PRINCIPALS) + [(s, "site") for s in sites]
              for a in ("--name", name, "--role", role, "--public-key", str(keys / f"{name}.pub"))] if fresh else []
    _run(["metaserver.server", "init", "--config", str(meta_conf), *enroll])
    pids: dict[str, int] = {}
    ready = root / "metaserver.addr"
    ready.unlink(missing_ok=True)
    proc = _spawn(["metaserver.server", "serve", "--config", str(meta_conf), "--ready-file", str(ready)],
                  logs / "metaserver.log")
    pids["metaserver"] = proc.pid
    addresses: dict[str, str] = {}
    try:
        address = _wait_for(ready, proc, logs / "metaserver.log", "metaserver")
        host_key_line = _host_key_line(root)
        procs = {}
        for site in sites:
            conf = root / f"{site}.conf"
            values = {
                "site": site, "listen": f"127.0.0.1:{_free_port(previous.get('addresses', {}).get(site))}",
                "store": f"store-{site}", "host_key": f"keys/{site}_host", "key": f"keys/{site}",
                "metaserver": address, "metaserver_host_key": host_key_line}
            zone = (zones or {}).get(site) or (read_section(conf, "ioserver").get("zone") if conf.exists() else None)
            if zone:
                values["zone"] = zone
            write_section(conf, "ioserver", values)
            _add_limits(conf, limits)
            procs[site] = _spawn_site(root, site)
            pids[site] = procs[site].pid
        for principal, _ in PRINCIPALS:
            write_section(root / f"{principal}.conf", "dgf", {
                "principal": principal, "key": f"keys/{principal}", "metaserver": address,
                "metaserver_host_key": host_key_line, "cache_dir": f"cache-{principal}"})
        if not (root / "dicom.conf").exists():
            # For 'dgf dicom serve --config DIR/dicom.conf' (kept once written: it is the user's).
            write_section(root / "dicom.conf", "dicom", {
                "ae_title": "DGF", "listen": "127.0.0.1:11112", "spool": "dicom-spool",
                "callers": "MODALITY=clinician.conf, WORKSTATION=clinician.conf, RESEARCH=researcher.conf",
                "identified": "WORKSTATION", "destinations": "WORKSTATION=127.0.0.1:11113"})
        if not (root / "web.conf").exists():
            # For 'dgf web serve --config DIR/web.conf'; tokens with 'dgf web token create'.
            write_section(root / "web.conf", "web", {
                "listen": "127.0.0.1:8042", "tokens": "web-tokens.json", "spool": "web-spool"})
        _write_state(root, address, sites, pids, addresses)
        for site, proc in procs.items():
            addresses[site] = _wait_for(root / f"{site}.addr", proc, root / "logs" / f"{site}.log",
                                        f"I/O server of {site}")
        _write_state(root, address, sites, pids, addresses)
    except BaseException:
        down(root, quiet=True, pids=pids)
        raise
    return Federation(root, address, sites, pids, ("metaserver", *sites))


def _host_key_line(root: Path) -> str:
    return " ".join((root / "keys" / "metaserver_host.pub").read_text().split()[:2])


def _spawn_site(root: Path, site: str) -> subprocess.Popen[bytes]:
    (root / f"{site}.addr").unlink(missing_ok=True)
    return _spawn(["ioserver.server", "serve", "--config", str(root / f"{site}.conf"),
                   "--ready-file", str(root / f"{site}.addr")], root / "logs" / f"{site}.log")


def _restart_sites(root: Path, state: dict[str, Any], dead: list[str]) -> Federation:
    """Start the dead sites of a federation whose metaserver runs, each on its old port where
    free (a site registers its address with the metaserver as it starts)."""
    pids = {name: int(pid) for name, pid in state["pids"].items()}
    addresses = dict(state.get("addresses", {}))
    procs = {}
    for site in dead:
        conf = root / f"{site}.conf"
        values = read_section(conf, "ioserver")
        values["listen"] = f"127.0.0.1:{_free_port(addresses.get(site))}"
        limits = _limits_of(conf)
        write_section(conf, "ioserver", values)
        _add_limits(conf, limits)
        procs[site] = _spawn_site(root, site)
        pids[site] = procs[site].pid
    _write_state(root, state["metaserver"], tuple(state["sites"]), pids, addresses)
    for site, proc in procs.items():
        addresses[site] = _wait_for(root / f"{site}.addr", proc, root / "logs" / f"{site}.log",
                                    f"I/O server of {site}")
    _write_state(root, state["metaserver"], tuple(state["sites"]), pids, addresses)
    return Federation(root, state["metaserver"], tuple(state["sites"]), pids, tuple(dead))


def _limits_of(conf: Path) -> dict[str, str] | None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(conf, encoding="utf-8")
    return dict(parser.items("limits")) if parser.has_section("limits") else None


def _write_state(root: Path, address: str, sites: tuple[str, ...], pids: dict[str, int],
                 addresses: dict[str, str]) -> None:
    tmp = root / (STATE + ".tmp")
    tmp.write_text(json.dumps({"metaserver": address, "sites": list(sites), "pids": pids,
                               "addresses": addresses}, indent=1))
    tmp.replace(root / STATE)


def down(root: Path, quiet: bool = False, pids: dict[str, int] | None = None) -> list[str]:
    """Stop the federation's processes; return the names stopped."""
    root = root.resolve()
    if pids is None:
        state = _read_state(root)
        if state is None:
            if quiet:
                return []
            raise errors.NotFound(f"no federation state in {root}; was it started with 'dgf local up'?")
        pids = {k: int(v) for k, v in state["pids"].items()}
    stopped = []
    for name, pid in pids.items():
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
                stopped.append(name)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for pid in pids.values():
        while _alive(pid) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return stopped


def pids(root: Path) -> dict[str, int]:
    """The process id of each server of the federation at ``root``, as started (alive or not)."""
    return {name: int(proc["pid"]) for name, proc in status(root)["processes"].items()}


def status(root: Path) -> dict[str, Any]:
    root = root.resolve()
    state = _read_state(root)
    if state is None:
        raise errors.NotFound(f"no federation state in {root}; start one with 'dgf local up {root}'.")
    procs = {name: {"pid": pid, "running": _alive(int(pid))}
             for name, pid in state["pids"].items()}
    return {"root": str(root), "metaserver": state["metaserver"], "processes": procs}
