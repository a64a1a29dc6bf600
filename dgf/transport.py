"""The client's side of the wire: the metaserver link and pooled, pipelined site channels.

Round trips dominate small-object transfer (~0.45 ms each on loopback), so puts and gets are
pipelined: small objects travel many to a frame, up to :data:`BATCH_WINDOW` frames are in flight
on a channel before the first reply is read.  Each site gets a few long-lived channels, opened
when first needed: bulk transfers take one of them (see :meth:`SiteLink._pipelined`), single
requests (a mount's block reads) whichever is free.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgf import errors, wire
from dgf.types import Site

if TYPE_CHECKING:
    from dgf import ssh
    from dgf.mux import Shared
    from dgf.sshlib import paramiko

log = logging.getLogger(__name__)

#: Seconds a site that could not be reached is reported as such without trying again (a hung
#: site costs one handshake deadline, not one per block a reader asks for).
UNREACHABLE_S = 5.0
META_SUBSYSTEM = "dgf-meta"
IO_SUBSYSTEM = "dgf-io"
#: Bytes of XML headers a site may send back for one put or put.batch frame.
HEADERS_MAX = 64 * 1024 * 1024
#: Small objects travel many to a frame (put.batch / get.batch); a few frames are in flight.
BATCH_OBJECTS = 64
BATCH_BYTES = 4 * 1024 * 1024
BATCH_WINDOW = 4
#: Channels to a site at most: concurrent single requests (a mount's readers) use several.
CHANNELS_PER_SITE = 2
#: Why :meth:`SiteLink.delete_many` left an object: stored again since its release.
KEPT = "stored again since"
#: Objects above this size stream to disk instead of being held in memory.
STREAM_THRESHOLD = 8 * 1024 * 1024


class MetaLink:
    """RPC to the metaserver over a small pool of channels on one SSH connection.

    A channel that failed midway (its framing may be out of step) never goes back to the pool:
    the next call opens a fresh one in its place.  Where several metaserver processes serve one
    database, a connection that died is replaced by one to the next of them that answers; the
    call that met the failure raises (it may have been applied), the next one goes through."""

    def __init__(self, addresses: Iterable[tuple[str, int]], key: Callable[[], paramiko.PKey], host_key: str,
                 channels: int = 2, read_timeout: float = wire.READ_TIMEOUT,
                 shared: Callable[[], Shared | None] | None = None) -> None:
        """``key`` loads the principal's key when a connection of our own is made; ``shared``
        finds a connection master's channels (:mod:`dgf.mux`) to use instead, or None."""
        self.addresses = list(addresses)
        self._key, self._host_key, self._read_timeout = key, host_key, read_timeout
        self._shared = shared
        self._lock = threading.Lock()
        self.conn: ssh.Connection | Shared = self._connect(self.addresses)
        # Channels are opened at first use: a short command needs one.  Last in, first out: a
        # call after another takes the channel that one used (a queue in order handed the
        # second call an unopened slot, whose opening costs two round trips: 0.2 s of every
        # `dgf stat` over a 100 ms link); only calls at once open more.
        self._pool: queue.LifoQueue[wire.RpcChannel | None] = queue.LifoQueue()
        self._closed = False
        for _ in range(channels):
            self._pool.put(None)

    def _connect(self, order: list[tuple[str, int]]) -> ssh.Connection | Shared:
        if self._shared is not None:
            found = self._shared()
            if found is not None:
                return found
        from dgf import ssh

        return ssh.connect_any(order, self._key(), self._host_key, META_SUBSYSTEM, "the metaserver",
                               self._read_timeout)

    def _reconnect(self, dead: ssh.Connection | Shared) -> None:
        """Replace a dead connection (once, whichever caller notices first), trying the other
        metaservers before the one that died."""
        with self._lock:
            if self.conn is not dead:
                return
            i = self.addresses.index(dead.address) if dead.address in self.addresses else 0
            self.conn = self._connect(self.addresses[i + 1:] + self.addresses[:i + 1])
            dead.close()
            log.warning("reconnected to the metaserver at %s", self.conn.where)

    @contextlib.contextmanager
    def _channel(self) -> Iterator[wire.RpcChannel]:
        """A channel from the pool (a fresh one in place of a broken one), back after use."""
        if self._closed:
            # close() emptied the pool: waiting on it would wait for ever.
            raise errors.TransportError("this client closed its connection to the metaserver; open a new client.")
        chan = self._pool.get()
        try:
            if not self.conn.alive:
                if chan is not None:
                    chan.broken = True
                self._reconnect(self.conn)
            if chan is None or chan.broken or chan.where != self.conn.where:
                try:
                    fresh = self.conn.channel()
                except errors.TransportError:
                    if self.conn.alive:
                        raise
                    self._reconnect(self.conn)      # it died just now: once more on a new one
                    fresh = self.conn.channel()
                if chan is not None:
                    chan.close()
                chan = fresh
            yield chan
        finally:
            self._pool.put(chan)

    def call(self, verb: str, payload: bytes = b"", wait_s: float | None = None,
             **args: Any) -> tuple[dict[str, Any], bytes]:
        with self._channel() as chan:
            return chan.call(verb, payload, wait_s, **args)

    def call_to_file(self, verb: str, out: Path, wait_s: float | None = None, **args: Any) -> dict[str, Any]:
        """A call whose reply payload streams into file ``out`` (created, never overwritten)."""
        with self._channel() as pooled, pooled.exclusive(wait_s) as chan:
            chan.send(verb, args)
            header = chan.receive_header()
            with open(out, "xb") as fh:
                for piece in chan.payload_chunks(int(header.get("n", 0))):
                    fh.write(piece)
            return dict(header.get("r") or {})

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                chan = self._pool.get_nowait()
            except queue.Empty:
                break
            if chan is not None:
                chan.close()            # a socket to a connection master is a file of its own
        self.conn.close()


@dataclass
class PutItem:
    key: str
    data: bytes
    tag: Any = None  # caller's handle, returned with the receipt
    #: A streamed object: its size, and its bytes in pieces (``data`` is then empty).
    size: int = -1
    stream: Callable[[int], Iterator[bytes | memoryview]] | None = None
    #: Whether the site should send back the XML header it derives from the object (the copy
    #: whose header is published), and that header once it has.
    want_header: bool = False
    header: bytes = b""

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.data)

    def pieces(self) -> Iterator[bytes | memoryview]:
        return self.stream(wire.CHUNK) if self.stream is not None else _pieces(self.data)


@dataclass
class GetResult:
    key: str
    data: bytes | None = None
    path: Path | None = None  # for objects streamed to a temp file
    error: errors.DgfError | None = None


class Stopped(Exception):
    """The consumer of a transfer went away (a WADO-RS client, a cancelled C-GET): the rest is
    not fetched.  Not a :class:`DgfError`: no site failed."""


class SiteLink:
    """Channels to one I/O site; capabilities are presented once per channel.

    Each channel has a slot lock that never changes; a channel is opened in its slot at its
    first use, and one left broken by a failure is replaced there before the next use."""

    def __init__(self, site: Site, key: paramiko.PKey, channels: int = CHANNELS_PER_SITE,
                 read_timeout: float = wire.READ_TIMEOUT) -> None:
        from dgf import ssh

        self.site = site
        self.conn = ssh.Connection(site.host, site.port, key, site.host_key, IO_SUBSYSTEM,
                                    name=f"site {site.name}", read_timeout=read_timeout)
        self.channels: list[wire.RpcChannel | None] = [None] * channels
        self.channels[0] = self.conn.channel()   # a site that refuses channels fails here
        self._slots = [threading.Lock() for _ in range(channels)]
        self._granted: dict[int, set[str]] = {i: set() for i in range(channels)}
        self._lock = threading.Lock()

    def _ready(self, i: int, cap: str | None, owed: list[str] | None = None) -> wire.RpcChannel:
        """Channel ``i`` (the caller holds slot ``i``), opened or replaced if broken, ``cap``
        presented.  With ``owed``, the capabilities' replies are not waited for: the tokens
        sent go into ``owed``, and the caller reads their replies (:meth:`_settle`) before its
        first frame's, which it sends meanwhile: one round trip less on a long link."""
        chan = self.channels[i]
        if chan is None or chan.broken:
            if chan is not None:
                chan.close()
            chan = self.channels[i] = self.conn.channel()
            self._granted[i] = set()
        # Several capabilities (one per page of a large resolve) travel space-separated.
        for token in (cap.split() if cap is not None else ()):
            if token not in self._granted[i]:
                chan.send("auth", {"token": token})
                if owed is not None:
                    owed.append(token)
                    continue
                chan.receive()
                self._granted[i].add(token)
        return chan

    def _settle(self, i: int, chan: wire.RpcChannel, owed: list[str]) -> None:
        """Read the replies to the capabilities :meth:`_ready` sent ahead (a refused one raises,
        the frames sent after it still in flight)."""
        while owed:
            chan.receive()
            self._granted[i].add(owed.pop(0))

    def _slot(self) -> int:
        """The index of the first free channel slot, or of slot 0 once it is free; held on return."""
        for i, slot in enumerate(self._slots):
            if slot.acquire(blocking=False):
                return i
        self._slots[0].acquire()
        return 0

    def _pipelined(self, cap: str, frames: list[Any],
                   send: Callable[[wire.RpcChannel, Any], None],
                   receive: Callable[[wire.RpcChannel, Any], None]) -> None:
        """Send ``frames`` on one free channel with up to BATCH_WINDOW of them awaiting replies;
        replies come back in order, ``receive`` reads each one.

        One channel, not one thread per channel: on loopback, the second channel's thread cost
        more CPU than it gained (GIL hand-offs; a 4000-file download 0.49 -> 0.44 ms of CPU a
        file with one, a 1000-file upload 3.42 -> 3.31, and both faster; bench/RESULTS.md).
        A channel's 8 MiB SSH window still fills a 1 Gbit/s link at 60 ms round trips."""
        sent = received = 0
        owed: list[str] = []
        i = self._slot()
        try:
            chan = self._ready(i, cap, owed)
            try:
                while received < len(frames):
                    while sent < len(frames) and sent - received < BATCH_WINDOW:
                        send(chan, frames[sent])
                        sent += 1
                    self._settle(i, chan, owed)
                    receive(chan, frames[received])
                    received += 1
                self._settle(i, chan, owed)      # no frames: the capabilities' replies still come
            except BaseException:
                if sent > received or owed:
                    chan.broken = True           # replies still in flight: out of step
                raise
        finally:
            self._slots[i].release()

    def put_many(self, items: list[PutItem], cap: str,
                 done: Callable[[PutItem, str | None, str | None], None],
                 tokens: dict[str, str] | None = None) -> None:
        """Upload ``items``, pipelined; ``done(item, receipt, error)`` for each.

        Small objects travel many to a ``put.batch`` frame; an object larger than a batch
        streams alone with ``put``, so no frame is ever larger than BATCH_BYTES plus one object.
        A batch's objects share one signed receipt: each object's receipt is then ``REF#i``, and
        ``tokens[REF]`` the batch's token, which a commit naming them carries once."""
        tokens = {} if tokens is None else tokens

        def single(b: list[PutItem]) -> bool:
            return len(b) == 1 and b[0].size > BATCH_BYTES

        def send(chan: wire.RpcChannel, b: list[PutItem]) -> None:
            if single(b):
                chan.send("put", {"key": b[0].key, "size": b[0].size, "header": b[0].want_header},
                          stream=b[0].pieces(), stream_size=b[0].size)
                return
            chan.send("put.batch", {"keys": [it.key for it in b], "sizes": [it.size for it in b],
                                    "headers": [i for i, it in enumerate(b) if it.want_header]},
                      stream=(piece for it in b for piece in it.pieces()),
                      stream_size=sum(it.size for it in b))

        def receive(chan: wire.RpcChannel, b: list[PutItem]) -> None:
            try:
                head = chan.receive_header()
            except errors.TransportError:
                raise
            except errors.DgfError as exc:       # the whole frame refused (a limit, a capability)
                for it in b:
                    done(it, None, exc.message)
                return
            result, n = head.get("r") or {}, int(head.get("n", 0))
            if n > HEADERS_MAX:
                chan.broken = True
                raise errors.TransportError(f"site {self.site.name} sent {n} bytes of headers for a put; "
                                            f"at most {HEADERS_MAX} are taken.")
            xmls = chan.read_payload(n)
            if single(b):
                b[0].header = xmls
                done(b[0], result["receipt"], None)
                return
            wanted = [it for it in b if it.want_header]
            sizes = result.get("header_sizes") or []
            if len(sizes) != len(wanted) or sum(sizes) != n:
                raise errors.TransportError(f"site {self.site.name} sent headers that do not match its objects.")
            pos = 0
            for it, size in zip(wanted, sizes):
                it.header, pos = xmls[pos:pos + size], pos + size
            token = str(result.get("batch", ""))
            ref = hashlib.sha256(token.encode()).hexdigest()[:16]
            tokens[ref] = token
            for it, receipt, error in zip(b, result["receipts"], result["errors"]):
                done(it, None if receipt is None else ref + receipt, error)

        small = [it for it in items if it.size <= BATCH_BYTES]
        large = [[it] for it in items if it.size > BATCH_BYTES]
        self._pipelined(cap, _batches(small, lambda it: it.size) + large, send, receive)

    def get_many(self, wanted: list[tuple[str, int]], cap: str, done: Callable[[GetResult], None],
                 spool: Path | None = None, stop: threading.Event | None = None) -> None:
        """Fetch ``(key, size)`` objects: small ones in batches, large ones streamed to ``spool``.
        Once ``stop`` is set no further request is sent (:class:`Stopped`; a channel with
        replies still in flight is replaced before its next use)."""

        def single(b: list[tuple[str, int]]) -> bool:
            return len(b) == 1 and b[0][1] > STREAM_THRESHOLD

        def send(chan: wire.RpcChannel, b: list[tuple[str, int]]) -> None:
            if stop is not None and stop.is_set():
                raise Stopped
            if single(b):
                chan.send("get", {"key": b[0][0]})
            else:
                chan.send("get.batch", {"keys": [k for k, _ in b]})

        def receive(chan: wire.RpcChannel, b: list[tuple[str, int]]) -> None:
            try:
                header = chan.receive_header()
            except errors.TransportError:
                raise
            except errors.DgfError as exc:
                for key, _ in b:
                    done(GetResult(key, error=exc))
                return
            if single(b):
                done(self._receive_object(chan, b[0][0], header.get("n", 0), spool))
                return
            for (key, _), size in zip(b, header["r"]["sizes"]):
                if size < 0:
                    done(GetResult(key, error=errors.NotFound(
                        f"object {key[:16]}... is missing at site {self.site.name}.")))
                else:
                    done(self._receive_object(chan, key, size, spool))

        small = [kv for kv in wanted if kv[1] <= STREAM_THRESHOLD]
        large = [[kv] for kv in wanted if kv[1] > STREAM_THRESHOLD]
        self._pipelined(cap, _batches(small, lambda kv: kv[1]) + large, send, receive)

    def delete_many(self, keys: list[str], cap: str) -> dict[str, str]:
        """Delete released objects (``cap``: the capabilities naming them, space-separated), many
        to a ``delete.batch`` frame, pipelined: an ``rm -r`` frees thousands.  Returns the keys
        not deleted, each with why: ``KEPT`` (stored again since the generation the capability
        names), else the site's refusal.  An object already gone is neither.  A failed
        connection raises.  A site older than ``delete.batch`` gets one ``delete`` per object."""
        left: dict[str, str] = {}
        older: list[str] = []

        def send(chan: wire.RpcChannel, frame: list[str]) -> None:
            chan.send("delete.batch", {"keys": frame})

        def receive(chan: wire.RpcChannel, frame: list[str]) -> None:
            try:
                kept = chan.receive_header()["r"]["kept"]
            except errors.TransportError:
                raise
            except errors.DgfError as exc:
                if isinstance(exc, errors.UsageError) and exc.message.startswith("unknown verb"):
                    older.extend(frame)
                else:
                    left.update(dict.fromkeys(frame, exc.message))
                return
            left.update((key, KEPT) for key, k in zip(frame, kept) if k)

        def send_one(chan: wire.RpcChannel, key: str) -> None:
            chan.send("delete", {"key": key})

        def receive_one(chan: wire.RpcChannel, key: str) -> None:
            try:
                if chan.receive_header()["r"].get("kept"):
                    left[key] = KEPT
            except errors.TransportError:
                raise
            except errors.DgfError as exc:
                left[key] = exc.message

        self._pipelined(cap, [keys[i:i + BATCH_OBJECTS] for i in range(0, len(keys), BATCH_OBJECTS)],
                        send, receive)
        if older:
            self._pipelined(cap, older, send_one, receive_one)
        return left

    @staticmethod
    def _receive_object(chan: wire.RpcChannel, key: str, n: int, spool: Path | None) -> GetResult:
        h = hashlib.sha256()
        if n > STREAM_THRESHOLD and spool is not None:
            spool.mkdir(parents=True, exist_ok=True)
            path = spool / f"{key}.part"
            with open(path, "wb") as fh:
                for chunk in chan.payload_chunks(n):
                    h.update(chunk)
                    fh.write(chunk)
            result = GetResult(key, path=path)
        else:
            data = chan.read_payload(n)
            h.update(data)
            result = GetResult(key, data=data)
        if h.hexdigest() != key:
            if result.path is not None:
                result.path.unlink(missing_ok=True)
            return GetResult(key, error=errors.IntegrityError(
                f"object {key[:16]}... arrived corrupted (checksum mismatch)."))
        return result

    def read_range(self, key: str, offset: int, length: int, cap: str) -> bytes:
        """One ranged read (a FUSE block fetch) on the first free channel."""
        return self.call("get", cap, key=key, offset=offset, length=length)[1]

    def call(self, verb: str, cap: str | None = None, wait_s: float | None = None,
             **args: Any) -> tuple[dict[str, Any], bytes]:
        """One request on the first free channel, or on channel 0 once it is free."""
        i = self._slot()
        try:
            return self._ready(i, cap).call(verb, b"", wait_s, **args)
        finally:
            self._slots[i].release()

    def close(self) -> None:
        self.conn.close()


def _pieces(data: bytes) -> Iterator[memoryview]:
    """``data`` in CHUNK-sized views: paramiko re-slices whatever sendall is given on every
    partial send, so a whole object handed to it costs time quadratic in its size."""
    view = memoryview(data)
    for i in range(0, len(view), wire.CHUNK):
        yield view[i:i + wire.CHUNK]


def _batches(items: list[Any], size: Callable[[Any], int]) -> list[list[Any]]:
    """Group items into frames of at most BATCH_OBJECTS objects and about BATCH_BYTES bytes."""
    out: list[list[Any]] = []
    current: list[Any] = []
    total = 0
    for it in items:
        n = size(it)
        if current and (len(current) >= BATCH_OBJECTS or total + n > BATCH_BYTES):
            out.append(current)
            current, total = [], 0
        current.append(it)
        total += n
    if current:
        out.append(current)
    return out


def run_parallel(tasks: Iterable[Callable[[], None]]) -> None:
    """Run callables in threads (one per site) and wait; re-raise the first exception one raised.

    Tasks handle the failures they expect (a site going away) themselves; anything else is a
    bug and must not vanish with its thread."""
    failures: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            failures.append(exc)

    threads = [threading.Thread(target=wrap, args=(t,), daemon=True) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
