"""The one table of request limits both servers enforce before they allocate or serve.

Every limit has a default here and may be changed in a server config's optional ``[limits]``
section (``frame_header = 1048576``).  A request past a limit is refused with
:class:`~dgf.errors.LimitExceeded`, whose message names the limit by its key in this table, so an
operator knows what to raise and a user knows what to split.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from dgf import errors

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    # -- the wire (both servers) --------------------------------------------------------------
    #: Bytes of one frame's JSON header (the arguments of a request).
    frame_header: int = 1 * MiB
    #: Seconds a started frame may stall (header or payload) before the channel is closed.
    frame_timeout: float = 30.0
    #: Elements of any one list argument (paths, keys, UIDs).
    list_items: int = 10_000
    #: Open channels (concurrent sessions) per principal, over all its connections.
    channels_per_principal: int = 32
    #: SSH connections the server holds at once, over all principals.
    connections: int = 256
    #: Authenticated SSH connections of one principal at once: one key cannot hold every slot.
    connections_per_principal: int = 64
    #: Connections from one address that may be in their SSH handshake (not yet authenticated)
    #: at once; a handshake takes milliseconds, an idle socket holds its slot until frame_timeout.
    handshakes_per_address: int = 16
    # -- the metadata server ------------------------------------------------------------------
    #: Files one ``down.resolve`` reply describes; more come in further pages.
    resolve_files: int = 10_000
    #: Bytes of attribute values one ``xattr.get_many`` reply carries (one value at least);
    #: the rest come in further requests.
    xattrs_reply_bytes: int = 16 * MiB
    #: Bytes of one upload commit (headers and identity records of a batch).
    commit_bytes: int = 64 * MiB
    #: Bytes of one identity record of a commit (zlib-compressed) the metaserver inflates to
    #: check it whole; of a larger one (a large element removed) only the head is read.
    identity_bytes: int = 64 * MiB
    #: Bytes of one user.* attribute value, and of all of one principal's values together.
    xattr_value: int = 1 * MiB
    xattr_bytes_per_principal: int = 64 * MiB
    xattrs_per_principal: int = 100_000
    #: Saved queries per principal.
    saved_queries_per_principal: int = 200
    #: Patient pseudonyms (and date shifts) one principal may be issued per minute, per
    #: metaserver process: uploads need them, a guessing oracle needs many.
    pseudonyms_per_minute: int = 6000
    #: XPath: characters, nesting depth of brackets and parentheses, and operators.
    xpath_chars: int = 16_384
    xpath_depth: int = 64
    xpath_operators: int = 512
    #: Open query cursors per principal (the oldest is closed first) and their idle lifetime.
    cursors_per_principal: int = 8
    cursor_idle_s: float = 120.0
    #: Seconds a request waits for a database connection before it is answered "busy".
    db_wait_s: float = 5.0
    # -- the I/O server -----------------------------------------------------------------------
    #: Bytes and objects of one ``put.batch`` frame (larger objects stream with ``put``).
    batch_bytes: int = 16 * MiB
    batch_objects: int = 256
    #: Voxels of one partial reconstruction volume, and bytes of the projections it reads.
    recon_voxels: int = 1 << 26
    recon_projection_bytes: int = 512 * MiB
    #: Background scrubbing: every stored object is re-hashed once per pass, at most this many
    #: MB/s, with this many seconds between passes (and before the first); a corrupt copy is
    #: quarantined and reported to the metaserver, as on a read.
    scrub_mb_s: float = 20.0
    scrub_pause_s: float = 86_400.0
    #: Background replication (mode async): seconds between a site's requests for copies to make.
    repair_interval_s: float = 5.0

    @classmethod
    def from_section(cls, values: dict[str, str], where: str) -> Limits:
        """Limits from a config section; unknown keys and non-numbers are refused by name."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for key, text in values.items():
            f = fields.get(key)
            if f is None:
                raise errors.ConfigError(f"{where} has an unknown limit {key!r}; known: {', '.join(fields)}.")
            try:
                value = float(text) if f.type in ("float", float) else int(text)
            except ValueError as exc:
                raise errors.ConfigError(f"{where}: limit {key!r} must be a number, got {text!r}.") from exc
            if value <= 0:
                raise errors.ConfigError(f"{where}: limit {key!r} must be positive, got {text!r}.")
            out[key] = value
        return cls(**out)

    def refuse(self, name: str, what: str) -> errors.LimitExceeded:
        """The error for a request past limit ``name``; ``what`` says what was too large."""
        return errors.LimitExceeded(f"{what} exceeds the server's limit {name} = {getattr(self, name)}.")


DEFAULT = Limits()


def count_down(counts: dict[str, int], key: str) -> None:
    """One fewer open for ``key``; at none the key goes, so the table holds only what is open."""
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


#: Seconds between tries of a listener's accept() when it fails (no descriptor left, for one).
ACCEPT_RETRY_S = 0.1


class RefusalLog:
    """Lines about refused connections and requests, at most one every ``every`` seconds per
    message and subject (its arguments: an address, a principal), each saying how many went
    unlogged since the last: a flood of refusals must not become a flood of lines, and one
    flooding address must not hide another's refusals.  The memory of subjects is bounded."""

    def __init__(self, logger: logging.Logger, every: float = 10.0, remember: int = 1024) -> None:
        self._log, self._every, self._remember = logger, every, remember
        self._last: dict[tuple[str, tuple[Any, ...]], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, what: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._last) > self._remember:        # many subjects: forget the quiet ones
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self._every}
            last, quiet = self._last.get((what, args), (-self._every, 0))
            if now - last < self._every:
                self._last[(what, args)] = (last, quiet + 1)
                return
            self._last[(what, args)] = (now, 0)
        self._log.warning(what + (f" ({quiet} more since the last such line)" if quiet else ""), *args)
