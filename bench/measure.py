"""How the benchmarks time a command: wall seconds, CPU seconds (the command's, plus what the
given server processes spent meanwhile) and peak RSS, from ``wait4`` and ``/proc``; and how
they report (``save``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a running process has spent so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    wall: float          # seconds
    cpu: float           # seconds, the command and the servers together
    rss: int             # the command's peak RSS, bytes
    stdout: str


def run(cmd: list[str], env: dict[str, str] | None = None, servers: Iterable[int] = (),
        ok: tuple[int, ...] = (0,)) -> Run:
    """Run ``cmd`` to its end; raise SystemExit with its stderr unless its status is in ``ok``."""
    servers = list(servers)
    before = sum(cpu_of(p) for p in servers)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        spent = usage.ru_utime + usage.ru_stime + sum(cpu_of(p) for p in servers) - before
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) not in ok:
            raise SystemExit(f"{Path(cmd[0]).name} failed: {err.read().decode(errors='replace')}")
        return Run(wall, spent, usage.ru_maxrss * 1024, out.read().decode(errors="replace"))


def stop(*procs: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM each process, then SIGKILL any that has not exited within ``timeout`` seconds."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def create_cost(directory: Path, files: int = 500) -> float:
    """Milliseconds of kernel CPU to create (and write 1 byte to) one file in ``directory``: a
    floor under any per-file figure that writes files (on this VM's ext4 it ranges from 0.02 to
    0.7 ms with the directory's place on disk)."""
    where = Path(tempfile.mkdtemp(dir=directory, prefix="create-cost-"))
    try:
        t0 = os.times()
        for i in range(files):
            fd = os.open(where / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"x")
            os.close(fd)
        return (os.times().system - t0.system) / files * 1000
    finally:
        shutil.rmtree(where, ignore_errors=True)


def save(name: str, report: dict[str, object]) -> None:
    """Print a benchmark's report as JSON and keep it as ``bench/out/<name>.json``."""
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
