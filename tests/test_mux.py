"""Shared connections (dgf.mux): short commands reach the metaserver through a connection master
that holds one SSH connection, the way OpenSSH's ControlMaster does; the master goes away with
its metaserver, when idle, or when killed, and no one but its user can use it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dgf import crypto, errors, local, mux, ssh, wire
from dgf.client import Client
from dgf.config import ClientConfig, write_section
from dgf.transport import META_SUBSYSTEM
from tests.conftest import metaserver_calls

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _config(path: Path, key: Path, principal: str, address: tuple[str, int], host_key: str,
            persist: float) -> Path:
    write_section(path, "dgf", {"principal": principal, "key": str(key),
                                "metaserver": "{}:{}".format(*address), "metaserver_host_key": host_key,
                                "timeout": "10", "shared_connection": str(persist)})
    return path


def _fed_config(fed: local.Federation, who: str, tmp: Path, persist: float = 60) -> Path:
    src = ClientConfig.load(fed.config(who))
    return _config(tmp / f"{who}.conf", src.key, who, src.metaserver[0], src.metaserver_host_key, persist)


def _socket(conf: Path) -> Path:
    path = mux.socket_path(ClientConfig.load(conf))
    assert path is not None
    return path


def _wait(check: Any, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _master_pid(sock: Path) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"dgf.mux" in argv and os.fsencode(sock) in argv:
                return int(entry.name)
    return None


def _dgf(conf: Path, *words: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DGF_CONFIG=str(conf))
    return subprocess.run([str(BIN / "dgf"), *words], capture_output=True, text=True, env=env, timeout=60)


def test_a_short_command_starts_a_master_and_the_next_imports_no_ssh_library(
        federation: local.Federation, tmp_path: Path) -> None:
    conf = _fed_config(federation, "researcher", tmp_path)
    sock = _socket(conf)
    # A command that moves objects keeps its own connection and starts no master.
    env = dict(os.environ, DGF_CONFIG=str(conf))
    bulk = subprocess.run([str(BIN / "dgf_down"), "/no-such-dir", "-o", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert bulk.returncode == 3, bulk.stderr
    assert not sock.exists() and _master_pid(sock) is None
    first = _dgf(conf, "whoami")
    assert first.returncode == 0, first.stderr
    _wait(sock.exists, "the first command started no connection master")
    code = ("import sys\nsys.argv = ['dgf', 'whoami']\nfrom dgf.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('paramiko', 'cryptography', 'nacl')))")
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env=dict(os.environ, DGF_CONFIG=str(conf)))
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == ["researcher (researcher)", "[]"]
    assert oct(sock.stat().st_mode & 0o777) == oct(0o600)
    assert oct(sock.parent.stat().st_mode & 0o777) == oct(0o700)

    # A changed config (or key) is another master's: the old one is not asked.
    time.sleep(0.01)
    conf.write_text(conf.read_text().replace("timeout = 10", "timeout = 11"))
    assert _socket(conf) != sock
    # A bulk command keeps its own connection (its CPU stays in its own process).
    with Client(conf) as plain:
        assert isinstance(plain.meta.conn, ssh.Connection)
    pid = _master_pid(sock)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    _wait(lambda: not sock.exists() and _master_pid(sock) is None, "the master did not stop on SIGTERM")


def test_the_master_greets_with_the_principal_so_a_command_asks_one_thing_less(
        federation: local.Federation, tmp_path: Path) -> None:
    """The master asks once whom the key is, and says it in every greeting: a command through it
    checks its config against that (the warning for a config naming another principal still
    comes) without a whoami of its own, one round trip less on a long link."""
    conf = _fed_config(federation, "researcher", tmp_path)
    conf.write_text(conf.read_text().replace("principal = researcher", "principal = clinician"))
    sock = _socket(conf)
    first = _dgf(conf, "whoami")
    assert first.returncode == 0 and "names principal 'clinician', but its key" in first.stderr
    _wait(sock.exists, "the first command started no connection master")
    try:
        with Client(conf, shared=True) as c:
            assert isinstance(c.meta.conn, mux.Shared)
            assert c.meta.conn.who == {"name": "researcher", "role": "researcher"}
            with metaserver_calls(c) as asked:
                warning = c.check_principal()
                assert warning is not None and "enrolled as 'researcher' (role researcher)" in warning
                assert asked == []
                assert c.stat("/").is_dir and asked == ["ns.stat"]      # the greeted channel works
        second = _dgf(conf, "whoami")
        assert second.returncode == 0 and "names principal 'clinician', but its key" in second.stderr
    finally:
        pid = _master_pid(sock)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)


def test_a_command_on_its_own_connection_checks_its_principal_once_a_day(
        federation: local.Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dgf_up and dgf_down keep their own connection, with no master to greet them: a check of
    the config's principal that matched is remembered (a round trip less for the next ones);
    one that did not is asked again every time, so its warning always comes."""
    from dgf import client as client_module

    src = ClientConfig.load(federation.config("researcher"))

    def conf(name: str, principal: str) -> Path:
        path = tmp_path / name
        write_section(path, "dgf", {"principal": principal, "key": str(src.key),
                                    "metaserver": "{}:{}".format(*src.metaserver[0]),
                                    "metaserver_host_key": src.metaserver_host_key, "timeout": "10",
                                    "cache_dir": str(tmp_path / "cache")})
        return path

    def asked(path: Path) -> tuple[list[str], str | None]:
        with Client(path) as c:
            assert isinstance(c.meta.conn, ssh.Connection)
            with metaserver_calls(c) as calls:
                warning = c.check_principal()
            return calls, warning

    right, wrong = conf("right.conf", "researcher"), conf("wrong.conf", "clinician")
    assert asked(right) == (["whoami"], None)
    assert asked(right) == ([], None)                      # remembered
    assert oct((tmp_path / "cache" / "principal.json").stat().st_mode & 0o777) == oct(0o600)
    for _ in range(2):
        calls, warning = asked(wrong)
        assert calls == ["whoami"] and warning is not None and "enrolled as 'researcher'" in warning
    monkeypatch.setattr(client_module, "PRINCIPAL_CHECK_S", 0.0)
    assert asked(right) == (["whoami"], None)              # a day later: asked again
    (tmp_path / "cache" / "principal.json").write_text("{not json")
    monkeypatch.setattr(client_module, "PRINCIPAL_CHECK_S", 3600.0)
    assert asked(right) == (["whoami"], None)              # an unreadable cache: asked
    assert asked(right) == ([], None)


def test_sharing_off_or_unsafe_directory_means_every_command_connects_itself(
        federation: local.Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    off = ClientConfig.load(_fed_config(federation, "researcher", tmp_path, persist=0))
    assert mux.Sharing(off).path is None
    with Client(off, shared=True) as c:
        assert isinstance(c.meta.conn, ssh.Connection) and c.whoami()["name"] == "researcher"

    runtime = tmp_path / "run"
    (runtime / "dgf").mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert mux.run_dir() == runtime / "dgf"
    os.chmod(runtime / "dgf", 0o755)                 # others may enter: not safe for a socket
    assert mux.run_dir() is None
    on = ClientConfig.load(_fed_config(federation, "clinician", tmp_path))
    assert mux.socket_path(on) is None
    with Client(on, shared=True) as c:
        assert isinstance(c.meta.conn, ssh.Connection) and c.whoami()["name"] == "clinician"
    with pytest.raises(errors.ConfigError, match="shared_connection"):
        ClientConfig.load(_config(tmp_path / "bad.conf", on.key, "x", on.metaserver[0], "k", -1))


class _Echo(wire.Service):
    @wire.verb("echo", text=str)
    def echo(self, ctx: Any, text: str) -> wire.Reply:
        return wire.Reply({"text": text, "who": ctx})


@pytest.fixture()
def echo_server(tmp_path: Path) -> Iterator[tuple[ssh.SSHServer, Path]]:
    """A real SSH server speaking the metaserver's subsystem, and a config for it whose shared
    connection idles out after one second."""
    host_line = crypto.generate_keypair(tmp_path / "host")
    user_line = crypto.generate_keypair(tmp_path / "user")
    allowed = crypto.fingerprint(user_line)
    server = ssh.SSHServer(crypto.load_paramiko_key(tmp_path / "host"), _Echo(), META_SUBSYSTEM,
                           lambda key: "user" if crypto.fingerprint(key) == allowed else None).start()
    conf = _config(tmp_path / "echo.conf", tmp_path / "user", "user", server.address, host_line, persist=1)
    yield server, conf
    server.close()
    sock = _socket(conf)
    _wait(lambda: _master_pid(sock) is None, "a master outlived its server")


def _started(conf: Path) -> tuple[Path, int]:
    """Run one shared client with no master (it starts one as it closes); the master's socket and pid."""
    with Client(conf, shared=True) as c:
        assert c.meta.call("echo", text="direct")[0] == {"text": "direct", "who": "user"}
    sock = _socket(conf)
    _wait(sock.exists, "no master started")
    pid = _master_pid(sock)
    assert pid is not None
    return sock, pid


def test_the_master_idles_out_and_a_killed_one_is_replaced(echo_server: tuple[ssh.SSHServer, Path]) -> None:
    server, conf = echo_server
    sock, pid = _started(conf)
    with Client(conf, shared=True) as c:
        assert isinstance(c.meta.conn, mux.Shared)
        assert c.meta.call("echo", text="shared")[0]["text"] == "shared"
        assert c.meta.conn.address == server.address
        # Held open, the channel keeps the master from idling out.
        time.sleep(1.6)
        assert sock.exists()
        assert c.meta.call("echo", text="still")[0]["text"] == "still"
    _wait(lambda: not sock.exists() and _master_pid(sock) is None, "the idle master did not leave")
    assert not sock.with_suffix(".lock").exists() and not sock.with_suffix(".log").exists()

    # Killed outright, a master leaves its socket behind: the next client connects by itself,
    # and a new master takes the socket over.
    sock, pid = _started(conf)
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: _master_pid(sock) is None, "the master did not die")
    assert sock.exists()
    with Client(conf, shared=True) as c:
        assert isinstance(c.meta.conn, ssh.Connection)
        assert c.meta.call("echo", text="after")[0]["text"] == "after"

    def replaced() -> bool:                    # the stale socket refuses; a live one accepts
        with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
            probe.connect(str(sock))
            return True
        return False

    _wait(replaced, "no new master took the stale socket over")
    with Client(conf, shared=True) as c:
        assert isinstance(c.meta.conn, mux.Shared) and c.meta.call("echo", text="new")[0]["text"] == "new"


def test_the_master_goes_with_its_server_and_calls_then_fail_by_name(
        echo_server: tuple[ssh.SSHServer, Path]) -> None:
    server, conf = echo_server
    sock, pid = _started(conf)
    c = Client(conf, shared=True)
    try:
        assert c.meta.call("echo", text="one")[0]["text"] == "one"
        server.close()                  # the "metaserver" goes away
        with pytest.raises(errors.TransportError):
            c.meta.call("echo", text="two")
        _wait(lambda: not sock.exists() and _master_pid(sock) is None, "the master outlived its server")
        with pytest.raises(errors.TransportError, match="cannot reach the metaserver"):
            c.meta.call("echo", text="three")
    finally:
        c.close()
    with pytest.raises(errors.TransportError, match="cannot reach the metaserver"):
        Client(conf, shared=True)
    assert _master_pid(sock) is None    # none is started for a metaserver that does not answer


def test_a_removed_principal_is_refused_through_its_master(admin: Client, federation: local.Federation,
                                                           tmp_path: Path) -> None:
    key = tmp_path / "muxie"
    admin.principal_add("muxie", "researcher", crypto.generate_keypair(key, "muxie"))
    src = ClientConfig.load(federation.config("researcher"))
    conf = _config(tmp_path / "muxie.conf", key, "muxie", src.metaserver[0], src.metaserver_host_key, 60)
    assert _dgf(conf, "whoami").returncode == 0
    sock = _socket(conf)
    _wait(sock.exists, "no master started")
    with Client(conf, shared=True) as c:
        assert isinstance(c.meta.conn, mux.Shared) and c.whoami()["name"] == "muxie"
        admin.principal_remove("muxie")
        with pytest.raises(errors.DgfError):
            c.whoami()
    after = _dgf(conf, "whoami")
    assert after.returncode != 0 and "muxie" not in after.stdout
    assert after.stderr.count("\n") == 1, after.stderr


def _as_nobody(sock: Path) -> str:
    """Connect to ``sock`` as user nobody (a forked child that drops to uid 65534) and say what
    happened: 'refused ERRNO' or the greeting's bytes."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                      # the child: no Python objects shared
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            try:
                s.connect(str(sock))
                said = f"greeting {s.recv(100)!r}"
            except OSError as exc:
                said = f"refused {exc.errno}"
            os.write(w, said.encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as fh:
        return fh.read().decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_use_the_master(echo_server: tuple[ssh.SSHServer, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _, conf = echo_server
    runtime = Path(tempfile.mkdtemp(prefix="dgf-mux-"))      # under /tmp, which nobody may enter
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    sock = _socket(conf)
    try:
        assert sock.parent == runtime / "dgf"
        _started(conf)
        # The socket's directory is the user's own (0700): another user cannot reach it.
        os.chmod(runtime, 0o711)
        assert _as_nobody(sock) == "refused 13"
        # Even with the directory and socket opened up, the master answers its own uid only.
        modes = [(p, p.stat().st_mode & 0o777) for p in (sock.parent, sock)]
        os.chmod(sock.parent, 0o711)
        os.chmod(sock, 0o666)
        try:
            said = _as_nobody(sock)
        finally:
            for p, mode in modes:
                os.chmod(p, mode)
        assert said == "greeting b''"
        _own_user_still_served(conf)
    finally:
        pid = _master_pid(sock)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)


def _own_user_still_served(conf: Path) -> None:
    with Client(conf, shared=True) as c:
        assert isinstance(c.meta.conn, mux.Shared)
        assert c.meta.call("echo", text="mine")[0]["text"] == "mine"


def test_the_peer_uid_is_read_from_the_kernel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        assert mux._peer_uid(a) == os.getuid()
    finally:
        a.close()
        b.close()
