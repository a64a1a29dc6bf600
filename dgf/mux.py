"""Shared metaserver connections: a connection master, as OpenSSH's ControlMaster/ControlPersist.

A short command (``dgf ls``, ``dgf stat``, ``dgf_find``) does a millisecond of work, but starting
paramiko and cryptography costs it about 50 ms and the SSH handshake 5 ms more.  The first such
command of a config therefore also starts, in the background, a *master*: a process that holds
one authenticated SSH connection to the metaserver.  Later commands with the same config ask the
master, over a Unix socket, for one fresh channel each, and import no SSH library at all.  Past
the one-line greeting below, a channel through the master carries the same frames as any other.

Greeting (master to client, once per accepted socket)::

    +WHERE\\tNAME\\tROLE\\n
                  a channel to the metaserver is open; WHERE names it in errors ("the metaserver
                  (host:port)"), NAME and ROLE are whom the metaserver took the key for when the
                  master connected (a client's check of its config needs no call of its own)
    -REASON\\n     none could be opened; the client connects by itself (and meets the reason by name)

Who may use a master: the socket lives in a directory of the user's own (mode 0700, checked
before every use), and the master answers only peers of its own uid (``SO_PEERCRED``).  It opens
channels only to the metaserver its config names, as the principal its key is enrolled as: what
any process of this uid could do with the key file itself.  The metaserver still checks the
principal on each request, so a principal removed by an admin is refused through the master
too.  The socket's name is derived from the config and key files (path, size, modification
time), so a changed config or a new key gets a new master.

Lifecycle: one master per socket name (an ``flock`` on a lock file beside it); it exits when its
connection to the metaserver dies, after ``shared_connection`` seconds (the client config key;
0 turns sharing off) with no channel open, or on SIGTERM; it removes its socket on the way out.
At most :data:`MAX_CHANNELS` channels are open through it at once; past that, clients connect
by themselves.  Bulk commands (``dgf_up``, ``dgf_down``, the mount, gateways) always connect by
themselves: they talk SSH to the sites anyway, and their CPU stays in their own process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import stat
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dgf import errors, wire

if TYPE_CHECKING:
    from dgf.config import ClientConfig

#: Channels open through one master at once.
MAX_CHANNELS = 64
#: Bytes of a greeting line, at most.
GREETING_MAX = 512
#: Seconds a client waits for the master's greeting (it opens one SSH channel meanwhile, about
#: a millisecond); a master that is stopped or swamped costs this, then the client connects itself.
GREETING_S = 5.0
#: The longest Unix socket path Linux takes (sun_path is 108 bytes with its NUL).
PATH_MAX = 107


class _End(Protocol):
    def close(self) -> None: ...


class Unavailable(Exception):
    """No master answered (none is running, it is going away, or it could not open a channel)."""


def run_dir() -> Path | None:
    """The user's own directory for master sockets, made if missing; None when there is no safe
    one (it exists but another user owns it, or others may enter it)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    try:
        base = Path(runtime) / "dgf" if runtime and os.path.isdir(runtime) else Path.home() / ".cache" / "dgf" / "run"
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        st, up = os.lstat(base), os.stat(base.parent)
    except (OSError, RuntimeError):                  # RuntimeError: no home directory
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    if up.st_mode & 0o022 and not up.st_mode & stat.S_ISVTX:
        return None                                  # others could swap the directory for theirs
    return base


def socket_path(cfg: ClientConfig) -> Path | None:
    """Where the master for ``cfg`` listens: named by the config and key files as they are now."""
    base = run_dir()
    if base is None:
        return None
    h = hashlib.sha256(b"dgf mux 2\0")   # 2: the greeting names the principal
    for f in (cfg.path, cfg.key):
        try:
            st = os.stat(f)
        except OSError:
            return None
        h.update(f"{f}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    path = base / f"{h.hexdigest()[:20]}.sock"
    return path if len(os.fsencode(path)) <= PATH_MAX else None


class Shared:
    """The client's side: channels to the metaserver through the master at ``path``.

    Duck-types :class:`dgf.ssh.Connection` for :class:`dgf.transport.MetaLink`.  The first
    channel is opened by :meth:`attach`, which raises :class:`Unavailable` when no master
    answers, so that the caller connects by itself instead."""

    def __init__(self, path: Path, read_timeout: float | None) -> None:
        self.path = path
        self.read_timeout = read_timeout
        self.where = "the metaserver"
        self.address: tuple[str, int] = ("", 0)
        self._spare: wire.RpcChannel | None = None
        self._gone = False
        #: Whom the metaserver took the key for, as the master's greeting said.
        self.who: dict[str, str] | None = None

    def attach(self) -> Shared:
        """Open the first channel (kept for the first :meth:`channel` call); raises
        :class:`Unavailable` when no master answers."""
        sock, greeting = self._open()
        where, _, who = greeting.partition("\t")
        name, _, role = who.partition("\t")
        self._spare = wire.RpcChannel(sock, where, self.read_timeout)
        self.where = where
        self.who = {"name": name, "role": role} if name and role else None
        host, _, port = where.rpartition("(")[2].rstrip(")").rpartition(":")
        self.address = (host, int(port)) if port.isascii() and port.isdigit() else ("", 0)
        return self

    def _open(self) -> tuple[socket.socket, str]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(GREETING_S)
            sock.connect(os.fspath(self.path))
            line = b""
            while not line.endswith(b"\n"):
                more = sock.recv(GREETING_MAX - len(line))
                if not more or len(line) + len(more) >= GREETING_MAX:
                    raise Unavailable("the connection master closed the socket before its greeting.")
                line += more
        except OSError as exc:
            sock.close()
            raise Unavailable(f"no connection master answers at {self.path} ({exc}).") from exc
        except Unavailable:
            sock.close()
            raise
        text = line[1:-1].decode("utf-8", "replace")
        if not line.startswith(b"+"):
            sock.close()
            raise Unavailable(f"the connection master could not open a channel ({text}).")
        sock.settimeout(self.read_timeout)
        return sock, text

    def channel(self) -> wire.RpcChannel:
        if self._spare is not None:
            chan, self._spare = self._spare, None
            return chan
        try:
            sock, greeting = self._open()
        except Unavailable as exc:
            self._gone = True
            raise errors.TransportError(f"{self.where}: {exc}") from exc
        return wire.RpcChannel(sock, greeting.partition("\t")[0], self.read_timeout)

    @property
    def alive(self) -> bool:
        """The master still listens (it removes its socket when its connection dies; one that
        was killed leaves it, and is found gone when it refuses a channel)."""
        return not self._gone and self.path.exists()

    def close(self) -> None:
        if self._spare is not None:
            self._spare.close()
            self._spare = None


class Sharing:
    """One client's use of the master for its config: :meth:`attach` finds it; when none
    answered, :meth:`close` (the client closing, its command done) starts one for the next
    command."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.path = socket_path(cfg) if cfg.shared_connection > 0 else None
        self.missed = False

    def attach(self) -> Shared | None:
        if self.path is None:
            return None
        shared = Shared(self.path, self.cfg.timeout)
        try:
            shared.attach()
        except Unavailable:
            self.missed = True
            return None
        return shared

    def close(self, connected: bool) -> None:
        """Start a master if none answered and the client's own connection works (none is
        started for a metaserver that does not answer)."""
        if self.missed and connected and self.path is not None:
            self.missed = False
            start_master(self.cfg, self.path)


def start_master(cfg: ClientConfig, path: Path) -> None:
    """Start a master for ``cfg`` in the background, detached; what it says goes to
    ``PATH.log`` (removed when it exits cleanly).  A second master for the same socket exits at
    once (see :func:`serve`)."""
    import subprocess
    import time

    for old in path.parent.glob("*.log"):            # what failed masters said, kept for a day
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 86400:
                old.unlink()
    try:
        fd = os.open(path.with_suffix(".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError:
        return
    try:
        # In "/", not the command's directory, which it would otherwise keep busy (an unmount),
        # and running this very dgf, wherever it was imported from.
        here = os.fspath(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH")))))
        subprocess.Popen([sys.executable, "-m", "dgf.mux", os.fspath(cfg.path), os.fspath(path)],
                         stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True,
                         start_new_session=True, cwd="/", env=env)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# The master


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def serve(config_path: str, sock_path: str) -> int:
    """Run a master: connect, listen, pump channels until idle, dead or told to stop."""
    import fcntl

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s dgf-mux %(levelname)s %(message)s")
    log = logging.getLogger("dgf.mux")
    path = Path(sock_path)
    lock = path.with_suffix(".lock")
    lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)
        return 0                        # another master holds this socket name
    clean = False
    try:
        _serve(config_path, path, log)
        clean = True
    finally:
        # Holding the lock, this master owns the socket name: nothing of it outlives it but the
        # log of a failure, which is what a user looking into it wants.
        for left in (path, lock, *(() if not clean else (path.with_suffix(".log"),))):
            with contextlib.suppress(OSError):
                left.unlink()
        os.close(lock_fd)
    return 0


def _serve(config_path: str, path: Path, log: logging.Logger) -> None:
    import signal
    import threading
    import time

    import paramiko

    from dgf import crypto, ssh
    from dgf.config import ClientConfig
    from dgf.transport import META_SUBSYSTEM

    cfg = ClientConfig.load(config_path)
    if socket_path(cfg) != path:
        return                          # the config or key changed since the client looked
    key = crypto.load_paramiko_key(cfg.key)
    conn = ssh.connect_any(cfg.metaserver, key, cfg.metaserver_host_key, META_SUBSYSTEM, "the metaserver",
                           cfg.timeout)
    with contextlib.suppress(OSError):
        path.unlink()                   # a socket left by a master that was killed
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(os.fspath(path))
    finally:
        os.umask(old)
    listener.listen(16)
    listener.settimeout(0.5)
    state = {"open": 0, "idle_since": time.monotonic()}
    lock = threading.Lock()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Who the key is, asked once on the channel the first client will get (see ``spare``).
    first = conn.open_channel()
    first.settimeout(cfg.timeout)
    me: dict[str, str] = {}
    try:
        me = wire.RpcChannel(first, conn.where, cfg.timeout).call("whoami")[0]
    except errors.TransportError:
        raise
    except errors.DgfError:
        pass                            # refused by name, the channel in step: clients ask themselves
    first.settimeout(None)              # the pumps wait on a client's channel as long as it is open
    greeting = f"+{conn.where}\t{me.get('name', '')}\t{me.get('role', '')}\n".encode()

    def closed() -> None:
        with lock:
            state["open"] -= 1
            if not state["open"]:
                state["idle_since"] = time.monotonic()

    def pump(read: Callable[[int], bytes], size: int, write: Callable[[bytes], object],
             ends: tuple[_End, _End]) -> None:
        try:
            while True:
                data = read(size)
                if not data:
                    break
                write(data)
        except Exception:  # noqa: BLE001 - either end going away (any error of either) ends both
            pass
        for end in ends:
            with contextlib.suppress(Exception):
                end.close()

    # One channel opened ahead, for the next client: opening one costs two round trips to the
    # metaserver (the session, then the subsystem), which a client would otherwise wait for.
    spare: list[paramiko.Channel] = [first]
    opening = [False]

    def ahead() -> None:
        chan = None
        with contextlib.suppress(errors.DgfError):   # the next client opens its own, meeting why
            chan = conn.open_channel()
        with lock:
            if chan is not None:
                spare.append(chan)
            opening[0] = False

    def open_ahead() -> None:
        with lock:
            wanted = not spare and not opening[0]
            opening[0] = opening[0] or wanted
        if wanted:
            threading.Thread(target=ahead, daemon=True).start()

    def channel() -> paramiko.Channel:
        with lock:
            chan = spare.pop() if spare else None
        open_ahead()
        if chan is not None and not (chan.closed or chan.eof_received):
            return chan
        return conn.open_channel()

    def client(sock: socket.socket) -> None:
        try:
            if _peer_uid(sock) != os.getuid():
                log.warning("refused a peer of another uid")
                return
            try:
                chan = channel()
            except errors.DgfError as exc:
                sock.sendall(b"-" + exc.message.encode("utf-8", "replace")[:GREETING_MAX - 2] + b"\n")
                return
            sock.sendall(greeting)
            # paramiko hands over what it holds (up to a window); a socket read allocates its size.
            down = threading.Thread(target=pump, args=(chan.recv, wire.RECV, sock.sendall, (sock, chan)),
                                    daemon=True)
            down.start()
            pump(sock.recv, wire.CHUNK, chan.sendall, (chan, sock))
            down.join()
        except OSError:
            pass
        finally:
            sock.close()
            closed()

    open_ahead()
    while not stop.is_set() and conn.alive:
        with lock:
            idle = not state["open"] and time.monotonic() - state["idle_since"] > cfg.shared_connection
        if idle:
            break
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            break
        with lock:
            full = state["open"] >= MAX_CHANNELS
            if not full:
                state["open"] += 1
        if full:
            with contextlib.suppress(OSError):
                sock.sendall(b"-the connection master has as many channels open as it allows\n")
            sock.close()
            continue
        threading.Thread(target=client, args=(sock,), daemon=True).start()
    listener.close()
    conn.close()


if __name__ == "__main__":
    try:
        sys.exit(serve(sys.argv[1], sys.argv[2]))
    except errors.DgfError as exc:
        print(f"dgf connection master: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
