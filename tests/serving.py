"""Helpers for tests that run a server process of their own (the DICOM and web gateways), and
for the faults they put it through (a full disk, no file descriptors left)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def fill(disk: Path) -> None:
    """Write zeros to ``disk`` until it has no room left (``filler`` there).  Unbuffered: a
    buffered file kept the bytes of the write that did not fit and raised again on close."""
    with open(disk / "filler", "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)


@contextlib.contextmanager
def descriptors_spent(pid: int, spare: int = 0) -> Iterator[None]:
    """Process ``pid`` may open ``spare`` more descriptors (about) until the block ends.  The
    limit bounds descriptor numbers, not how many are open, and a new one takes the lowest free
    number: set at the lowest free number plus ``spare``, the next opens soon fail."""
    numbers = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (min(set(range(len(numbers) + 1)) - numbers) + spare, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def kill(pid: int, timeout: float = 10) -> None:
    """SIGKILL ``pid`` and return once it is dead (reaped if it is our child, else gone or a
    zombie): a test that kills a server must not race the signal."""
    import time

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:                # not our child: watch /proc instead
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                return
            if state in ("Z", "X"):
                return
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} did not die within {timeout:.0f} s of SIGKILL")
