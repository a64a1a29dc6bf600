"""Helpers for tests that run a server process of their own (the DICOM and web gateways)."""

from __future__ import annotations

import signal
import socket
import subprocess


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


def kill(pid: int, timeout: float = 10) -> None:
    """SIGKILL ``pid`` and return once it is dead (reaped if it is our child, else gone or a
    zombie): a test that kills a server must not race the signal."""
    import os
    import time
    from pathlib import Path

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
