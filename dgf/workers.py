"""Worker processes for CPU work (de-identification at upload, header evaluation at query).

A worker is ``python -c "from MODULE import FUNCTION; FUNCTION()"`` (so no main module is
re-imported, and a process running SSH threads never forks), speaking length-prefixed pickles
over its stdin and stdout: the parent sends a request, the worker answers with a result or an
exception to raise.  Only the parent's own pickles cross this pipe.  The pools built on it
differ in how they share work: ``dgf.dicom.pipeline.Workers`` sends each file to the same worker
for both steps (the worker keeps its parse), ``metaserver.query`` streams chunks round-robin and
reads results in order.
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import IO

from dgf import errors

_LEN = struct.Struct(">Q")


def send(fh: IO[bytes], obj: object) -> None:
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(_LEN.pack(len(blob)) + blob)
    fh.flush()


def recv(fh: IO[bytes]) -> object:
    """The next message; EOFError when the other side has gone."""
    head = fh.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError
    (n,) = _LEN.unpack(head)
    blob = fh.read(n)
    if len(blob) < n:
        raise EOFError
    return pickle.loads(blob)


class Worker:
    """One worker process running ``module:function`` (a loop around :func:`serve`)."""

    def __init__(self, entry: str) -> None:
        module, _, function = entry.partition(":")
        self.proc = subprocess.Popen([sys.executable, "-c", f"from {module} import {function}; {function}()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in: IO[bytes] = self.proc.stdin
        self._out: IO[bytes] = self.proc.stdout

    def send(self, request: object) -> None:
        send(self._in, request)

    def recv(self) -> object:
        return recv(self._out)

    def close(self, timeout: float = 10) -> None:
        """Let the worker finish (its input closed), killing it after ``timeout`` seconds."""
        try:
            self._in.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def serve(handle: Callable[[object], object], failed: Callable[[Exception], errors.DgfError]) -> None:
    """A worker's loop: answer each request read from stdin with ``handle(request)`` on stdout.

    A :class:`DgfError` goes back as itself; any other exception goes back as ``failed(exc)``,
    with its traceback (not its message, which may quote values) on stderr."""
    rfile, wfile = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            request = recv(rfile)
        except EOFError:
            return
        try:
            result = handle(request)
        except errors.DgfError as exc:
            result = exc
        except Exception as exc:  # noqa: BLE001 - returned to the parent, which raises it
            sys.stderr.write("".join(traceback.format_tb(exc.__traceback__)) + type(exc).__name__ + "\n")
            result = failed(exc)
        send(wfile, result)
