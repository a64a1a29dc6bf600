"""The embedded default: a whole federation on loopback, in one directory.

``up`` creates (once) the keys, vault key, database and configs, enrolls an admin, a clinician, a
researcher and two sites, then starts a metaserver and the I/O servers of ``site-a`` and
``site-b`` as background processes on free 127.0.0.1 ports, and writes one client config per
principal.  Running ``up`` again on a stopped directory restarts the same federation with its data.
The servers are started as processes (``python -m metaserver.server``), never imported here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgf import crypto, errors
from dgf.config import write_section

PRINCIPALS = (("admin", "admin"), ("clinician", "clinician"), ("researcher", "researcher"))
SITES = ("site-a", "site-b")
STATE = "federation.json"


@dataclass(frozen=True)
class Federation:
    root: Path
    metaserver: str
    sites: tuple[str, ...]
    pids: dict[str, int]

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
        return json.loads((root / STATE).read_text())
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


def up(root: Path, sites: tuple[str, ...] = SITES, limits: dict[str, str] | None = None) -> Federation:
    """Start (or restart) the federation in ``root``; ``limits`` overrides server limits (both
    servers read the same table, each the keys that concern it)."""
    root = root.resolve()
    state = _read_state(root)
    if state is not None and any(_alive(int(p)) for p in state["pids"].values()):
        raise errors.AlreadyExists(f"a federation is already running in {root}; 'dgf local down {root}' stops it.")
    root.mkdir(parents=True, exist_ok=True)
    keys = root / "keys"
    keys.mkdir(exist_ok=True)
    os.chmod(keys, 0o700)
    logs = root / "logs"
    meta_conf = root / "metaserver.conf"
    fresh = not meta_conf.exists()
    write_section(meta_conf, "metaserver", {
        "listen": "127.0.0.1:0", "db": f"sqlite:///{root / 'metadata.db'}",
        "host_key": "keys/metaserver_host", "vault_key": "keys/vault.key"})
    _add_limits(meta_conf, limits)
    _run(["metaserver.server", "init", "--config", str(meta_conf)])
    for name in [p for p, _ in PRINCIPALS] + list(sites):
        for suffix in ("", "_host") if name in sites else ("",):
            path = keys / f"{name}{suffix}"
            if not path.exists():
                crypto.generate_keypair(path, f"dgf-{name}{suffix}")
    if fresh:
        for name, role in list(PRINCIPALS) + [(s, "site") for s in sites]:
            _run(["metaserver.server", "enroll", "--config", str(meta_conf), "--name", name,
                  "--role", role, "--public-key", str(keys / f"{name}.pub")])
    pids: dict[str, int] = {}
    ready = root / "metaserver.addr"
    ready.unlink(missing_ok=True)
    proc = _spawn(["metaserver.server", "serve", "--config", str(meta_conf), "--ready-file", str(ready)],
                  logs / "metaserver.log")
    pids["metaserver"] = proc.pid
    try:
        address = _wait_for(ready, proc, logs / "metaserver.log", "metaserver")
        meta_host_key = (keys / "metaserver_host.pub").read_text().split()
        host_key_line = " ".join(meta_host_key[:2])
        procs = {}
        for site in sites:
            conf = root / f"{site}.conf"
            write_section(conf, "ioserver", {
                "site": site, "listen": "127.0.0.1:0", "store": f"store-{site}",
                "host_key": f"keys/{site}_host", "key": f"keys/{site}",
                "metaserver": address, "metaserver_host_key": host_key_line})
            _add_limits(conf, limits)
            (root / f"{site}.addr").unlink(missing_ok=True)
            procs[site] = _spawn(["ioserver.server", "serve", "--config", str(conf),
                                  "--ready-file", str(root / f"{site}.addr")], logs / f"{site}.log")
            pids[site] = procs[site].pid
        for principal, _ in PRINCIPALS:
            write_section(root / f"{principal}.conf", "dgf", {
                "principal": principal, "key": f"keys/{principal}", "metaserver": address,
                "metaserver_host_key": host_key_line, "cache_dir": f"cache-{principal}"})
        _write_state(root, address, sites, pids)
        for site, proc in procs.items():
            _wait_for(root / f"{site}.addr", proc, logs / f"{site}.log", f"I/O server of {site}")
    except BaseException:
        down(root, quiet=True, pids=pids)
        raise
    return Federation(root, address, sites, pids)


def _write_state(root: Path, address: str, sites: tuple[str, ...], pids: dict[str, int]) -> None:
    tmp = root / (STATE + ".tmp")
    tmp.write_text(json.dumps({"metaserver": address, "sites": list(sites), "pids": pids}, indent=1))
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


def status(root: Path) -> dict[str, Any]:
    root = root.resolve()
    state = _read_state(root)
    if state is None:
        raise errors.NotFound(f"no federation state in {root}; start one with 'dgf local up {root}'.")
    procs = {name: {"pid": pid, "running": _alive(int(pid))}
             for name, pid in state["pids"].items()}
    return {"root": str(root), "metaserver": state["metaserver"], "processes": procs}
