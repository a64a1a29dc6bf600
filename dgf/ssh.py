"""SSH plumbing over paramiko: the servers' listener (public-key auth, one subsystem, per-principal
channel limits) and the client's authenticated connection with a pinned host key.

Kept apart from :mod:`dgf.wire` (framing and dispatch) so that a command whose metaserver link
goes through a running connection master (:mod:`dgf.mux`) imports neither paramiko nor
cryptography: about 50 ms of a short command's start.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from dgf import errors, wire
from dgf.limits import ACCEPT_RETRY_S, Limits, RefusalLog, count_down
from dgf.limits import DEFAULT as DEFAULT_LIMITS
from dgf.sshlib import paramiko

log = logging.getLogger("dgf.wire")


# --------------------------------------------------------------------------------------------
# SSH server plumbing


class _Interface(paramiko.ServerInterface):
    """Deny by default: public-key auth against ``authorize``, one session channel, one subsystem."""

    def __init__(self, authorize: Callable[[paramiko.PKey], Any], subsystem: str,
                 admit: Callable[[Any], str | None] = lambda principal: None) -> None:
        self._authorize = authorize
        self._admit = admit
        self._subsystem = subsystem
        self.principal: Any = None
        #: Set when the connection is over its principal's limit: its channels are refused in-band.
        self.refusal: str | None = None

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        try:
            principal = self._authorize(key)
        except Exception:  # noqa: BLE001 - an auth hook failure must refuse, never crash
            log.exception("authorization hook failed")
            principal = None
        if principal is None:
            return int(paramiko.AUTH_FAILED)
        self.principal = principal
        # Decided here, before paramiko reads the client's channel request: a connection over
        # its principal's limit is authenticated only to be told why, in-band.
        self.refusal = self._admit(principal)
        return int(paramiko.AUTH_SUCCESSFUL)

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session" or self.principal is None:
            return int(paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED)
        return int(paramiko.OPEN_SUCCEEDED)

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        if name != self._subsystem:
            return False
        return bool(super().check_channel_subsystem_request(channel, name))

    # No shell, no exec, no pty, no forwarding: paramiko's defaults already refuse them.


def _principal_name(principal: Any) -> str:
    return str(getattr(principal, "name", principal))


class _Subsystem(paramiko.SubsystemHandler):
    def __init__(self, channel: paramiko.Channel, name: str, server: _Interface,
                 owner: SSHServer) -> None:
        super().__init__(channel, name, server)
        self._owner = owner

    def start_subsystem(self, name: str, transport: paramiko.Transport,
                        channel: paramiko.Channel) -> None:
        iface = self.get_server()
        owner = self._owner
        if iface.refusal is not None:
            _refuse_in_band(channel, iface.refusal)
            transport.close()
            return
        if not owner.admit_channel(iface.principal):
            _refuse_in_band(channel, f"principal {_principal_name(iface.principal)!r} already has "
                                     f"{owner.limits.channels_per_principal} open channels here "
                                     "(limit channels_per_principal); close other sessions and retry.")
            return
        try:
            wire.serve_stream(owner.service, owner.service.new_session(iface.principal), channel, owner.limits)
        finally:
            owner.channel_closed(iface.principal)
            _close_quietly(channel)


def _refuse_in_band(channel: paramiko.Channel, message: str) -> None:
    """Refuse a channel with a LimitExceeded the client's first call reports by name."""
    wire._reply_and_close(channel, {"ok": False, "e": "LimitExceeded", "m": message})
    # Wait (briefly) for the client to read the refusal and close: closing first would race its
    # subsystem request and show it a bare "channel closed".
    try:
        wire._settimeout(channel, 2.0)
        while channel.recv(wire.CHUNK):
            pass
    except (OSError, EOFError):
        pass
    _close_quietly(channel)


def _close_quietly(channel: paramiko.Channel) -> None:
    """Close a channel whose peer may already be gone (a reset connection is not an error)."""
    try:
        channel.close()
    except (OSError, EOFError, paramiko.SSHException):
        pass


#: Seconds a connection over its principal's limit is kept for its client to read why.
REFUSED_CONNECTION_S = 5.0


class _QuietBanners(logging.Filter):
    """paramiko logs a peer that connects and never sends its SSH banner (a port scan, a load
    balancer's TCP check, the idle sockets handshakes_per_address bounds) as an ERROR and a
    traceback, a record per line.  That record and the traceback after it, in the same
    thread, are dropped; everything else paramiko logs passes."""

    def __init__(self) -> None:
        super().__init__()
        self._after = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if str(record.msg).startswith("Exception (server): Error reading SSH protocol banner"):
            self._after.banner = True                  # the traceback lines follow in this thread
            return False
        return not getattr(self._after, "banner", False)


_QUIET_BANNERS = _QuietBanners()


class SSHServer:
    """A paramiko SSH server on one TCP socket that serves one :class:`wire.Service` as a subsystem."""

    def __init__(self, host_key: paramiko.PKey, service: wire.Service, subsystem: str,
                 authorize: Callable[[paramiko.PKey], Any], host: str = "127.0.0.1",
                 port: int = 0, limits: Limits = DEFAULT_LIMITS) -> None:
        self.host_key = host_key
        self.service = service
        self.limits = limits
        paramiko_log = logging.getLogger("paramiko.transport")
        if _QUIET_BANNERS not in paramiko_log.filters:
            paramiko_log.addFilter(_QUIET_BANNERS)
        service.limits = limits
        self._channels: dict[str, int] = {}
        self.subsystem = subsystem
        self.authorize = authorize
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise errors.ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                                     "is another server using that address?") from exc
        self._sock.listen(64)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._stop = threading.Event()
        self._transports: list[paramiko.Transport] = []
        #: Authenticated connections and their principals (limit connections_per_principal).
        self._owners: dict[paramiko.Transport, str] = {}
        #: Connections not yet authenticated, per peer address (limit handshakes_per_address).
        self._handshakes: dict[str, int] = {}
        self._refused = RefusalLog(log)
        self._lock = threading.Lock()

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError as exc:
                if self._stop.is_set():
                    break                                # close() shut the socket
                # Out of descriptors or buffers (a flood, a busy site's open files), or a peer
                # gone before its accept: this ended the loop, and the server with it.  The
                # connection waits in the backlog; accepting resumes once something is freed.
                self._refused("cannot accept connections for now (%s); retrying", exc.strerror or exc)
                self._stop.wait(ACCEPT_RETRY_S)
                continue
            address = str(peer[0])
            with self._lock:
                self._transports = [t for t in self._transports if t.is_active()]
                full = len(self._transports) >= self.limits.connections
                # Anyone who can reach the port can open connections without a key: from one
                # address, only a few may be unauthenticated at once, or idle sockets from one
                # host would hold every slot and lock every principal out.
                crowded = self._handshakes.get(address, 0) >= self.limits.handshakes_per_address
                if not (full or crowded):
                    self._handshakes[address] = self._handshakes.get(address, 0) + 1
            if full or crowded:
                if full:
                    self._refused("refused connections: %d are open (limit connections)", self.limits.connections)
                else:
                    self._refused("refused connections from %s: %d from there are not authenticated yet "
                                  "(limit handshakes_per_address)", address, self.limits.handshakes_per_address)
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._handle, args=(conn, address), daemon=True).start()

    def admit_channel(self, principal: Any) -> bool:
        """Count a new channel of ``principal``; False past limits.channels_per_principal."""
        name = _principal_name(principal)
        with self._lock:
            n = self._channels.get(name, 0)
            if n >= self.limits.channels_per_principal:
                log.warning("refused a channel of %s: limit channels_per_principal reached", name)
                return False
            self._channels[name] = n + 1
        return True

    def channel_closed(self, principal: Any) -> None:
        with self._lock:
            count_down(self._channels, _principal_name(principal))

    def run(self, ready_file: str | None = None) -> None:
        """Serve in the foreground until SIGTERM or Ctrl-C; first write HOST:PORT to
        ``ready_file`` (atomically) so whoever started this process knows it listens."""
        if ready_file:
            wire.write_ready(ready_file, self.address)
        signal.signal(signal.SIGTERM, lambda *_: self.close())
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
        self.close()

    def start(self) -> SSHServer:
        threading.Thread(target=self.serve_forever, daemon=True, name="dgf-accept").start()
        return self

    def _handle(self, conn: socket.socket, address: str) -> None:
        try:
            transport = paramiko.Transport(conn, default_window_size=wire.WINDOW,
                                           default_max_packet_size=wire.MAX_PACKET)
        except BaseException:
            conn.close()
            self._handshake_over(address)
            raise
        transport.get_security_options().ciphers = wire.CIPHERS
        transport.add_server_key(self.host_key)
        # A client that connects and never authenticates is dropped (paramiko's default is 30 s
        # for the banner and auth; the handshake gets the same bound as any started frame).
        transport.banner_timeout = transport.auth_timeout = self.limits.frame_timeout
        transport.set_subsystem_handler(self.subsystem, _Subsystem, self)
        iface = _Interface(self.authorize, self.subsystem, lambda principal: self._admit_connection(transport, principal))
        with self._lock:
            self._transports.append(transport)
        try:
            transport.start_server(server=iface)
            # The connection counts against its address until it authenticates (paramiko's
            # own thread does that) or ends; past the deadline it is closed here.
            deadline = time.monotonic() + self.limits.frame_timeout
            while transport.is_active() and not transport.is_authenticated():
                if time.monotonic() > deadline:
                    transport.close()
                    break
                time.sleep(0.02)
        except (paramiko.SSHException, OSError, EOFError):
            transport.close()
        finally:
            self._handshake_over(address)
        if iface.refusal is not None:
            # Its channel is answered with the refusal; a connection that opens none goes soon.
            deadline = time.monotonic() + min(self.limits.frame_timeout, REFUSED_CONNECTION_S)
            while transport.is_active() and time.monotonic() < deadline:
                time.sleep(0.05)
            transport.close()

    def _admit_connection(self, transport: paramiko.Transport, principal: Any) -> str | None:
        """Count an authenticated connection of ``principal``, or say why it is refused: past
        limits.connections_per_principal, since one key must not hold every connection slot."""
        name = _principal_name(principal)
        limit = self.limits.connections_per_principal
        with self._lock:
            self._owners = {t: n for t, n in self._owners.items() if t.is_active()}
            if sum(1 for n in self._owners.values() if n == name) < limit:
                self._owners[transport] = name
                return None
        self._refused("refused connections of %s: it holds %d (limit connections_per_principal)", name, limit)
        return (f"principal {name!r} already holds {limit} connections here (limit "
                "connections_per_principal); close other clients and retry.")

    def _handshake_over(self, address: str) -> None:
        with self._lock:
            count_down(self._handshakes, address)

    def close(self) -> None:
        self._stop.set()
        try:
            # shutdown wakes an accept() blocked in another thread (close alone does not, on Linux).
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            for t in self._transports:
                t.close()



# --------------------------------------------------------------------------------------------
# Client side


class Connection:
    """An authenticated SSH connection to one dgf server, with pinned host key.

    Channels are long-lived (paramiko issue 822: closing channels during a rekey can deadlock the
    transport), so callers open a few and keep them.  ``name`` says which server this is in
    every error ("site site-a (127.0.0.1:4022)"); ``read_timeout`` bounds every wait for the
    server's next bytes, so a hung server costs a named error, never a hang.
    """

    #: Whom the server took the key for, where known without asking (a connection master's
    #: greeting says it; see dgf.mux.Shared): never for a connection of one's own.
    who: dict[str, str] | None = None

    def __init__(self, host: str, port: int, key: paramiko.PKey, host_key_line: str,
                 subsystem: str, timeout: float = 15.0, name: str = "the dgf server",
                 read_timeout: float | None = wire.READ_TIMEOUT) -> None:
        self.where = f"{name} ({host}:{port})"
        self.address = (host, port)
        self.subsystem = subsystem
        self.read_timeout = read_timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise errors.TransportError(
                f"cannot reach {self.where} ({exc.strerror or exc}); is it running?"
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        # A server that accepts the connection and then says nothing (stopped, hung) fails the
        # handshake within the read deadline too.
        if read_timeout is not None:
            timeout = min(timeout, read_timeout)
        self.transport = paramiko.Transport(sock, default_window_size=wire.WINDOW, default_max_packet_size=wire.MAX_PACKET)
        self.transport.get_security_options().ciphers = wire.CIPHERS
        self.transport.banner_timeout = timeout
        self.transport.auth_timeout = timeout
        started = time.monotonic()
        try:
            self.transport.start_client(timeout=timeout)
            remote = self.transport.get_remote_server_key()
            expected = host_key_line.split()
            if [remote.get_name(), remote.get_base64()] != expected[:2]:
                raise errors.AuthenticationFailed(
                    f"the host key of {self.where} does not match the pinned key; refusing to connect."
                )
            self.transport.auth_publickey("dgf", key)
        except paramiko.AuthenticationException as exc:
            self.transport.close()
            raise errors.AuthenticationFailed(
                f"{self.where} refused our key; is this principal enrolled?"
            ) from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.transport.close()
            if time.monotonic() - started >= timeout * 0.9:
                raise errors.TransportError(f"{self.where} did not complete the SSH handshake within "
                                            f"{timeout:.0f} s; it may be hung or overloaded.") from exc
            raise errors.TransportError(f"SSH handshake with {self.where} failed ({exc}).") from exc
        except errors.DgfError:
            self.transport.close()
            raise

    def open_channel(self) -> paramiko.Channel:
        """A new channel to the server's subsystem (blocking, no read deadline)."""
        try:
            chan = self.transport.open_session(timeout=15)
            chan.invoke_subsystem(self.subsystem)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise errors.TransportError(
                f"cannot open the {self.subsystem} subsystem on {self.where} ({exc})."
            ) from exc
        return chan

    def channel(self) -> wire.RpcChannel:
        chan = self.open_channel()
        chan.settimeout(self.read_timeout)
        return wire.RpcChannel(chan, self.where, self.read_timeout)

    @property
    def alive(self) -> bool:
        return bool(self.transport.is_active())

    def close(self) -> None:
        self.transport.close()


def connect_any(addresses: Iterable[tuple[str, int]], key: paramiko.PKey, host_key_line: str,
                subsystem: str, name: str, read_timeout: float | None = wire.READ_TIMEOUT) -> Connection:
    """A connection to the first of ``addresses`` that answers (several metaserver processes
    over one database); an unreachable one costs its connect timeout, a refused key fails at
    once.  The error names every address tried."""
    tried: list[str] = []
    last: errors.TransportError | None = None
    for host, port in addresses:
        try:
            return Connection(host, port, key, host_key_line, subsystem, name=name, read_timeout=read_timeout)
        except errors.TransportError as exc:
            tried.append(f"{host}:{port}")
            last = exc
    if last is None:
        raise errors.ConfigError(f"no address is configured for {name}.")
    if len(tried) == 1:
        raise last
    raise errors.TransportError(f"none of the {len(tried)} addresses of {name} ({', '.join(tried)}) "
                                f"answers; the last said: {last.message}") from last


def probe_host_key(host: str, port: int, timeout: float = 10.0) -> str:
    """The host key (``type base64``) a server presents, read from the SSH handshake without
    authenticating: what an admin confirms before pinning it (first contact)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise errors.TransportError(f"cannot reach {host}:{port} ({exc.strerror or exc}); is it running?") from exc
    transport = paramiko.Transport(sock)
    transport.banner_timeout = timeout
    try:
        transport.start_client(timeout=timeout)
        remote = transport.get_remote_server_key()
        return f"{remote.get_name()} {remote.get_base64()}"
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise errors.TransportError(f"{host}:{port} did not complete an SSH handshake ({exc}); "
                                    "is it a dgf server?") from exc
    finally:
        transport.close()
