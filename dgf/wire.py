"""The wire: message framing and verb dispatch, shared by both servers and the client's transport
so that neither server writes its own (the SSH plumbing under it is :mod:`dgf.ssh`).

Framing (one request or reply)::

    uint32 big-endian  length of the JSON header
    bytes              JSON header (an object); "n" is the payload length, 0 when absent
    bytes              payload, exactly "n" bytes

A request header is ``{"v": verb, "a": {args}, "n": len}``; a reply header is
``{"ok": true, "r": {result}, "n": len}`` or ``{"ok": false, "e": ErrorClass, "m": message}``.
Replies come in request order, so a client may pipeline many requests before reading replies.
The same loop serves a paramiko channel or stdin/stdout (``serve --stdio`` behind a site's own
OpenSSH as a forced command, the way borg and git do it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from dgf import errors
from dgf.limits import DEFAULT as DEFAULT_LIMITS
from dgf.limits import Limits

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
#: The largest frame header a client accepts in a reply (servers use their Limits.frame_header).
MAX_HEADER = 16 * 1024 * 1024
#: A refused request's unread payload is drained up to this size; past it the channel closes.
DRAIN_MAX = 16 * 1024 * 1024
#: Seconds a client waits for a server's next bytes before it names the server as hung.
READ_TIMEOUT = 30.0
#: Bulk bytes move in chunks of this size: 128-256 KiB is where paramiko is fastest here.
CHUNK = 256 * 1024
#: AES-GCM first: it is what makes paramiko fast (DESIGN.md, transport facts).
#: SSH channel window and largest packet: paramiko spends Python time per packet, so bulk
#: transfer is faster with packets of 256 KiB than with its default 32 KiB; the window bounds
#: what one channel may have in flight (and buffered at the receiver).
WINDOW = 8 * 1024 * 1024
MAX_PACKET = 256 * 1024
#: Bulk reads ask for everything the channel holds (up to a window): paramiko's buffered pipe
#: hands over its whole buffer at once, but a smaller read copies the rest of the buffer down
#: (8 MiB moved for every 256 KiB read, 16 GiB of copying per GiB received).
RECV = WINDOW + MAX_PACKET
#: What :class:`ReadAhead` asks a socket or a pipe for (below malloc's mmap threshold).
SMALL_REFILL = 64 * 1024
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")


class Stream(Protocol):
    def recv(self, n: int) -> bytes: ...

    def sendall(self, data: bytes | memoryview) -> None: ...


class StdioStream:
    """A :class:`Stream` over a pair of binary files (stdin/stdout of a forced command)."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO) -> None:
        self._r, self._w = rfile, wfile

    def recv(self, n: int) -> bytes:
        return self._r.read1(n) if hasattr(self._r, "read1") else self._r.read(n)

    def sendall(self, data: bytes | memoryview) -> None:
        self._w.write(data)
        self._w.flush()


class ReadAhead:
    """A :class:`Stream` that takes everything its channel holds at each refill and serves
    smaller reads from that: headers, and the small objects of a batch one by one.

    paramiko's pipe copies its whole remaining buffer down on every partial read, so reading
    a batch of small objects one at a time out of a full window moved megabytes per object;
    here each byte is copied once.  A socket or a pipe (a connection master's, a forced
    command's stdin) is asked for 64 KiB at a time: a larger request costs an allocation of its
    size per call.  Reads of a refill or more with nothing held go straight through.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        # paramiko's Channel (the one stream with recv_ready) hands over its whole buffer.
        self.refill = RECV if hasattr(stream, "recv_ready") else SMALL_REFILL
        self._held = b""
        self._at = 0

    def recv(self, n: int) -> bytes:
        held, at = self._held, self._at
        if at >= len(held):
            if n >= self.refill:
                return self.stream.recv(n)
            held, at = self.stream.recv(self.refill), 0
        end = at + n
        if end >= len(held):
            self._held, self._at = b"", 0
            return held if at == 0 else held[at:]
        self._held, self._at = held, end
        return held[at:end]

    def sendall(self, data: bytes | memoryview) -> None:
        self.stream.sendall(data)

    def settimeout(self, seconds: float | None) -> None:
        _settimeout(self.stream, seconds)

    def close(self) -> None:
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()


def recv_exact(stream: Stream, n: int) -> bytes:
    """Read exactly ``n`` bytes or raise :class:`TransportError` (the peer went away)."""
    if n == 0:
        return b""
    first = stream.recv(n)
    if len(first) == n:
        return first
    parts = [first]
    got = len(first)
    while got < n:
        if not parts[-1]:
            raise errors.TransportError(f"connection closed after {got} of {n} bytes.")
        part = stream.recv(min(n - got, 4 * CHUNK))
        parts.append(part)
        got += len(part)
    if not parts[-1]:
        raise errors.TransportError(f"connection closed after {got} of {n} bytes.")
    return b"".join(parts)


def _send_header(stream: Stream, header: dict[str, Any], payload: bytes = b"") -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Small payloads ride in the same send: one SSH packet instead of three.
    if len(payload) <= CHUNK:
        stream.sendall(_LEN.pack(len(raw)) + raw + payload)
    else:
        stream.sendall(_LEN.pack(len(raw)) + raw)
        view = memoryview(payload)
        for i in range(0, len(payload), CHUNK):
            stream.sendall(view[i:i + CHUNK])


class MalformedFrame(errors.UsageError):
    """A frame the server cannot parse; it is answered with this error, then the channel closes."""


def read_header(stream: Stream, max_size: int = MAX_HEADER,
                started: Callable[[], None] | None = None) -> dict[str, Any] | None:
    """Read one header; None on a clean end of stream before any byte of it.

    ``started`` runs once the first byte has arrived (the server arms its frame deadline there:
    an idle channel may wait for ever, a started frame may not)."""
    head = stream.recv(4)
    if not head:
        return None
    if started is not None:
        started()
    if len(head) < 4:
        head += recv_exact(stream, 4 - len(head))
    (size,) = _LEN.unpack(head)
    if size > max_size:
        raise MalformedFrame(f"a frame header of {size} bytes exceeds the limit frame_header = {max_size}.")
    try:
        header = json.loads(recv_exact(stream, size))
    except RecursionError as exc:
        raise MalformedFrame("the frame header's JSON is nested too deeply.") from exc
    except ValueError as exc:
        raise MalformedFrame("the frame header is not valid JSON.") from exc
    if not isinstance(header, dict):
        raise MalformedFrame("the frame header is not a JSON object.")
    n = header.get("n", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise MalformedFrame("the frame's payload length 'n' is not a non-negative integer.")
    return header


class Payload:
    """The payload of a request, read lazily from the stream so bulk bytes are never buffered."""

    def __init__(self, stream: Stream, size: int) -> None:
        self._stream, self.size, self._left = stream, size, size

    @property
    def left(self) -> int:
        return self._left

    def chunks(self, size: int = RECV) -> Iterator[bytes]:
        while self._left:
            data = self._stream.recv(min(size, self._left))
            if not data:
                raise errors.TransportError(f"connection closed with {self._left} payload bytes unread.")
            self._left -= len(data)
            yield data

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def chunks_of(self, n: int) -> Iterator[bytes]:
        """The next ``n`` bytes of the payload, in chunks."""
        if n > self._left:
            raise errors.UsageError(f"the payload has {self._left} bytes left, not {n}.")
        left = n
        while left:
            data = self._stream.recv(min(RECV, left))
            if not data:
                raise errors.TransportError(f"connection closed with {left} payload bytes unread.")
            left -= len(data)
            self._left -= len(data)
            yield data

    def drain(self) -> None:
        for _ in self.chunks():
            pass


@dataclass
class Reply:
    """A verb's result: a JSON-able dict and an optional payload (bytes or sized chunk stream)."""

    result: dict[str, Any] = field(default_factory=dict)
    payload: bytes | None = None
    stream: Iterable[bytes | memoryview] | None = None
    stream_size: int = 0


# --------------------------------------------------------------------------------------------
# Verb dispatch


@dataclass(frozen=True)
class VerbSpec:
    name: str
    func: Callable[..., Reply]
    args: dict[str, type | tuple[type, ...]]
    optional: frozenset[str]
    payload: bool


def verb(verb_name: str, /, *, payload: bool = False, optional: Iterable[str] = (),
         **args: type | tuple[type, ...]) -> Callable[[Callable[..., Reply]], Callable[..., Reply]]:
    """Declare a method of a :class:`Service` as a wire verb with typed arguments.

    Arguments not declared are refused, declared ones are type-checked before the method runs, so
    a handler never sees a malformed request (servers deny by default, STYLE.md 7).
    """

    def mark(func: Callable[..., Reply]) -> Callable[..., Reply]:
        func._dgf_verb = VerbSpec(verb_name, func, args, frozenset(optional), payload)  # type: ignore[attr-defined]
        return func

    return mark


class Service:
    """Base of a server's verb table: subclasses declare methods with :func:`verb`.

    Each call gets ``ctx`` (who is calling) and the validated arguments; verbs declared with
    ``payload=True`` also get the :class:`Payload`.
    """

    def __init__(self) -> None:
        self._verbs: dict[str, VerbSpec] = {}
        for attr in dir(type(self)):
            spec = getattr(getattr(type(self), attr), "_dgf_verb", None)
            if spec is not None:
                self._verbs[spec.name] = spec

    def new_session(self, principal: Any) -> Any:
        """Per-channel context handed to every verb; by default the authenticated principal."""
        return principal

    limits: Limits = DEFAULT_LIMITS

    def dispatch(self, ctx: Any, header: dict[str, Any], payload: Payload) -> Reply:
        name = header.get("v")
        spec = self._verbs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise errors.UsageError(f"unknown verb {name!r}; this server knows {sorted(self._verbs)}.")
        args = header.get("a") or {}
        if not isinstance(args, dict):
            raise errors.UsageError(f"arguments of {name!r} must be an object.")
        unknown = set(args) - set(spec.args)
        if unknown:
            raise errors.UsageError(f"verb {name!r} takes no argument {sorted(unknown)[0]!r}.")
        for arg, typ in spec.args.items():
            if arg not in args:
                if arg in spec.optional:
                    continue
                raise errors.UsageError(f"verb {name!r} needs argument {arg!r}.")
            value = args[arg]
            if typ is int and isinstance(value, bool) or not isinstance(value, typ):
                raise errors.UsageError(f"argument {arg!r} of {name!r} has the wrong type.")
            try:
                self._check_value(str(name), arg, value)
            except RecursionError:
                raise errors.UsageError(f"argument {arg!r} of {name!r} is nested too deeply.") from None
        if spec.payload:
            return spec.func(self, ctx, payload, **args)
        if payload.size:
            raise errors.UsageError(f"verb {name!r} takes no payload.")
        return spec.func(self, ctx, **args)


    def _check_value(self, verb_name: str, arg: str, value: Any) -> None:
        """Strings must be valid Unicode (JSON admits lone surrogates, which no database or file
        name takes), integers fit in 64 bits (JSON admits any, databases do not) and lists are
        bounded, before any handler sees them."""
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:
                raise errors.UsageError(f"argument {arg!r} of {verb_name!r} is out of range "
                                        "(integers are 64-bit signed).")
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise errors.UsageError(f"argument {arg!r} of {verb_name!r} is not valid Unicode text "
                                        "(it holds a lone surrogate).") from None
        elif isinstance(value, list):
            if len(value) > self.limits.list_items:
                raise self.limits.refuse("list_items", f"argument {arg!r} of {verb_name!r} ({len(value)} items)")
            for item in value:
                if isinstance(item, (str, list, dict, int)):
                    self._check_value(verb_name, arg, item)
        elif isinstance(value, dict):
            for k, item in value.items():
                self._check_value(verb_name, arg, k)
                if isinstance(item, (str, list, dict, int)):
                    self._check_value(verb_name, arg, item)


def _settimeout(stream: Stream, seconds: float | None) -> None:
    set_timeout = getattr(stream, "settimeout", None)
    if set_timeout is not None:
        set_timeout(seconds)


def _log_failure(verb_name: Any, exc: BaseException) -> None:
    """Where the server failed, without the exception's text: messages of database drivers and
    codecs quote request values (paths, names), which never go to a log."""
    frames = "".join(traceback.format_tb(exc.__traceback__)[-6:])
    log.error("verb %s failed with %s at\n%s", verb_name if isinstance(verb_name, str) else "?",
              type(exc).__name__, frames.rstrip())


def serve_stream(service: Service, ctx: Any, stream: Stream, limits: Limits = DEFAULT_LIMITS) -> None:
    """Answer requests on one stream until the peer closes it.

    An idle channel waits for its next frame as long as the peer keeps it; once a frame has
    started, every read and write must progress within ``limits.frame_timeout`` seconds.  A
    malformed or stalled frame is answered with an error, then the channel is closed (its
    framing can no longer be trusted)."""
    stream = ReadAhead(stream)
    while True:
        _settimeout(stream, None)
        try:
            header = read_header(stream, limits.frame_header,
                                 started=lambda: _settimeout(stream, limits.frame_timeout))
        except MalformedFrame as exc:
            _reply_and_close(stream, {"ok": False, "e": "UsageError", "m": exc.message})
            return
        except TimeoutError:
            _reply_and_close(stream, {"ok": False, "e": "TransportError",
                                      "m": f"the request stalled for more than {limits.frame_timeout:.0f} s "
                                           "(limit frame_timeout); the channel is closed."})
            return
        except (errors.TransportError, ValueError, OSError, EOFError):
            return
        if header is None:
            return
        payload = Payload(stream, header.get("n", 0))
        try:
            reply = service.dispatch(ctx, header, payload)
        except errors.DgfError as exc:
            reply_err: dict[str, Any] = {"ok": False, "e": type(exc).__name__, "m": exc.message}
        except TimeoutError:
            _reply_and_close(stream, {"ok": False, "e": "TransportError",
                                      "m": f"the request's payload stalled for more than {limits.frame_timeout:.0f} s "
                                           "(limit frame_timeout); the channel is closed."})
            return
        except Exception as exc:  # noqa: BLE001 - one boundary turns every failure into a reply
            _log_failure(header.get("v"), exc)
            reply_err = {"ok": False, "e": "ServerError",
                         "m": f"the server failed on verb {header.get('v')!r} ({type(exc).__name__})."}
        else:
            try:
                payload.drain()
                _send_reply(stream, reply)
            except (errors.TransportError, OSError, EOFError):
                return
            continue
        if payload.left > DRAIN_MAX:
            # Refused before its payload was read: answer now rather than read gigabytes for
            # nothing; the client reads this answer when its send fails.
            _reply_and_close(stream, reply_err)
            return
        try:
            payload.drain()
            _send_header(stream, reply_err)
        except (errors.TransportError, OSError, EOFError):
            return


def _reply_and_close(stream: Stream, header: dict[str, Any]) -> None:
    """Best effort: a peer that sent a broken frame may not read the answer."""
    try:
        _settimeout(stream, 2.0)
        _send_header(stream, header)
    except (errors.TransportError, OSError, EOFError):
        pass


def coalesced(chunks: Iterable[bytes | memoryview], size: int = CHUNK) -> Iterator[bytes | memoryview]:
    """``chunks`` with the small ones joined into pieces of about ``size`` bytes (less than twice
    it), large ones passed on as they are.  A batch of small objects yields one chunk per
    object, and each ``sendall`` is at least one SSH packet: a pass through paramiko at both
    ends and a wake-up of the reading thread."""
    held: list[bytes | memoryview] = []
    n = 0
    for chunk in chunks:
        if len(chunk) >= size:
            if held:
                yield b"".join(held)
                held, n = [], 0
            yield chunk
            continue
        held.append(chunk)
        n += len(chunk)
        if n >= size:
            yield b"".join(held)
            held, n = [], 0
    if held:
        yield b"".join(held)


def _send_reply(stream: Stream, reply: Reply) -> None:
    if reply.stream is None:
        body = reply.payload or b""
        _send_header(stream, {"ok": True, "r": reply.result, "n": len(body)}, body)
        return
    _send_header(stream, {"ok": True, "r": reply.result, "n": reply.stream_size})
    sent = 0
    for chunk in coalesced(reply.stream):
        stream.sendall(chunk)
        sent += len(chunk)
    if sent != reply.stream_size:
        # The frame promised stream_size bytes; a short stream would desynchronise the channel.
        raise errors.TransportError(f"reply stream sent {sent} of {reply.stream_size} bytes.")


def write_ready(ready_file: str, address: tuple[str, int]) -> None:
    """Write HOST:PORT to ``ready_file`` atomically: whoever started a server waits on it."""
    tmp = Path(ready_file + ".tmp")
    tmp.write_text(f"{address[0]}:{address[1]}\n")
    tmp.replace(ready_file)


def _channel_errors(*more: type[BaseException]) -> tuple[type[BaseException], ...]:
    """What a failing channel raises: OS errors, and paramiko's own once paramiko is loaded (a
    channel through a connection master is a plain socket, and such a process never loads it)."""
    ssh = sys.modules.get("paramiko")
    return (OSError, EOFError, *more) if ssh is None else (OSError, EOFError, ssh.SSHException, *more)


class RpcChannel:
    """Request/reply over one channel; ``send``/``receive`` separately allow pipelining.

    A channel whose framing may be out of step (a transfer that failed or was abandoned midway)
    is marked ``broken``; pools replace it instead of reusing it."""

    def __init__(self, chan: Stream, where: str,
                 read_timeout: float | None = None) -> None:
        self._chan = ReadAhead(chan)
        self.where = where
        self.read_timeout = read_timeout
        self.lock = threading.Lock()
        self.broken = False

    def _broke(self, doing: str, exc: BaseException) -> errors.TransportError:
        self.broken = True
        if isinstance(exc, socket.timeout):
            return errors.TransportError(f"{self.where} did not answer within {self.read_timeout:.0f} s "
                                         f"while {doing}; it may be hung or overloaded.")
        return errors.TransportError(f"the connection to {self.where} broke while {doing} ({exc or type(exc).__name__}).")

    def send(self, verb_name: str, args: dict[str, Any] | None = None, payload: bytes = b"",
             stream: Iterable[bytes | memoryview] | None = None, stream_size: int = 0) -> None:
        try:
            if stream is None:
                _send_header(self._chan, {"v": verb_name, "a": args or {}, "n": len(payload)}, payload)
                return
            _send_header(self._chan, {"v": verb_name, "a": args or {}, "n": stream_size})
            for chunk in coalesced(stream):
                self._chan.sendall(chunk)
        except errors.DgfError:
            self.broken = True      # the source failed mid-frame (a file that changed)
            raise
        except _channel_errors() as exc:
            error = self._broke("sending", exc)
            # A server that refuses a request before reading its payload answers, then closes:
            # its answer says more than the broken pipe.
            try:
                header = read_header(self._chan)
            except _channel_errors(errors.DgfError):
                header = None
            if header is not None and not header.get("ok"):
                raise errors.from_wire(str(header.get("e")), str(header.get("m"))) from exc
            raise error from exc

    def receive_header(self) -> dict[str, Any]:
        """Read a reply header, raising the server's error; the caller must read ``n`` bytes."""
        try:
            header = read_header(self._chan)
        except MalformedFrame as exc:
            self.broken = True
            raise errors.TransportError(f"{self.where} sent a malformed reply ({exc.message})") from exc
        except _channel_errors(ValueError) as exc:
            raise self._broke("receiving", exc) from exc
        if header is None:
            self.broken = True
            raise errors.TransportError(f"{self.where} closed the connection.")
        if not header.get("ok"):
            raise errors.from_wire(str(header.get("e")), str(header.get("m")))
        return header

    def receive(self) -> tuple[dict[str, Any], bytes]:
        header = self.receive_header()
        return header.get("r") or {}, self.read_payload(header.get("n", 0))

    def read_payload(self, n: int) -> bytes:
        try:
            return recv_exact(self._chan, n)
        except errors.TransportError as exc:
            self.broken = True
            raise errors.TransportError(f"{self.where}: {exc.message}") from exc
        except _channel_errors() as exc:
            raise self._broke("receiving", exc) from exc

    def payload_chunks(self, n: int) -> Iterator[bytes]:
        """The next ``n`` payload bytes in chunks; a caller that stops early leaves the channel
        broken (its unread bytes would be taken for the next reply)."""
        left = n
        self.broken = bool(n)
        while left:
            try:
                data = self._chan.recv(min(RECV, left))
            except _channel_errors() as exc:
                raise self._broke("transferring", exc) from exc
            if not data:
                raise errors.TransportError(f"{self.where} closed the connection mid-transfer.")
            left -= len(data)
            yield data
        self.broken = False

    @contextlib.contextmanager
    def exclusive(self, wait_s: float | None = None) -> Iterator[RpcChannel]:
        """This channel for one request and its reply; ``wait_s`` replaces the read deadline
        meanwhile (a verb known to compute for long, such as a reconstruction or a backup)."""
        with self.lock:
            if wait_s is not None:
                _settimeout(self._chan, wait_s)
            try:
                yield self
            finally:
                if wait_s is not None:
                    _settimeout(self._chan, self.read_timeout)

    def call(self, verb_name: str, payload: bytes = b"", wait_s: float | None = None,
             **args: Any) -> tuple[dict[str, Any], bytes]:
        """One request and its reply (``wait_s``: see :meth:`exclusive`)."""
        with self.exclusive(wait_s):
            self.send(verb_name, args, payload)
            return self.receive()

    def close(self) -> None:
        close = getattr(self._chan, "close", None)
        if close is not None:
            close()
