"""The wire and the SSH plumbing: framing, typed verb dispatch, deny-by-default servers."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import paramiko
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgf import crypto, errors, ssh, wire


class Echo(wire.Service):
    @wire.verb("echo", payload=True, text=str)
    def echo(self, ctx: Any, payload: wire.Payload, text: str) -> wire.Reply:
        return wire.Reply({"text": text, "who": ctx}, payload=payload.read())

    @wire.verb("add", optional=("b",), a=int, b=int)
    def add(self, ctx: Any, a: int, b: int = 1) -> wire.Reply:
        return wire.Reply({"sum": a + b})

    @wire.verb("boom")
    def boom(self, ctx: Any) -> wire.Reply:
        raise RuntimeError("secret value 12345 must not leak")


class Pipe:
    """Two in-memory streams joined back to back, for serve_stream without sockets."""

    def __init__(self, incoming: bytes) -> None:
        self.rfile = io.BytesIO(incoming)
        self.out = io.BytesIO()

    def recv(self, n: int) -> bytes:
        return self.rfile.read(n)

    def sendall(self, data: bytes) -> None:
        self.out.write(data)


def _request(verb: str, args: dict[str, Any], payload: bytes = b"") -> bytes:
    p = Pipe(b"")
    wire._send_header(p, {"v": verb, "a": args, "n": len(payload)}, payload)
    return p.out.getvalue()


def _replies(raw: bytes) -> list[tuple[dict[str, Any], bytes]]:
    p = Pipe(raw)
    out = []
    while True:
        h = wire.read_header(p)
        if h is None:
            return out
        out.append((h, wire.recv_exact(p, h.get("n", 0))))


class Piecemeal:
    """A socket-like stream that hands over what it holds in uneven pieces and records what was
    asked of it."""

    def __init__(self, data: bytes, pieces: list[int]) -> None:
        self.data, self.pieces = data, pieces
        self.asked: list[int] = []

    def recv(self, n: int) -> bytes:
        self.asked.append(n)
        size = min(n, self.pieces.pop(0) if self.pieces else n)
        out, self.data = self.data[:size], self.data[size:]
        return out

    def sendall(self, data: bytes) -> None:
        raise AssertionError("not written")


class Trickle(Piecemeal):
    """The same, looking like paramiko's channel (``recv_ready``)."""

    def recv_ready(self) -> bool:
        return bool(self.data)


def test_read_ahead_takes_what_the_channel_holds_and_serves_small_reads_from_it() -> None:
    objects = [bytes([i]) * (39_000 + i) for i in range(40)]
    frames = b"".join(_request("put", {"i": i}, o) for i, o in enumerate(objects))
    chan = Trickle(frames, [5, 70_000, 1_000_000, 3])
    stream = wire.ReadAhead(chan)
    for i, o in enumerate(objects):
        header = wire.read_header(stream)
        assert header is not None and header["a"] == {"i": i} and header["n"] == len(o)
        assert wire.recv_exact(stream, header["n"]) == o
    assert wire.read_header(stream) is None                 # the end, seen as the end
    # Each refill asked for everything (a partial read of paramiko's pipe copies what is left
    # down); the reads of headers and objects never reached the channel.
    assert set(chan.asked) == {wire.RECV} and len(chan.asked) <= 8
    # A bulk read with nothing held goes straight through.
    bulk = Trickle(b"z" * (wire.RECV + 10), [])
    assert wire.ReadAhead(bulk).recv(wire.RECV + 10) == b"z" * (wire.RECV + 10) and bulk.asked == [wire.RECV + 10]
    # A socket or pipe is asked for 64 KiB at a time (more would allocate that much per call).
    sock = Piecemeal(frames, [])
    stream = wire.ReadAhead(sock)
    for o in objects:
        header = wire.read_header(stream)
        assert header is not None and wire.recv_exact(stream, header["n"]) == o
    assert set(sock.asked) <= {wire.SMALL_REFILL, 4 * wire.CHUNK} and wire.SMALL_REFILL in sock.asked


def test_dispatch_validates_and_keeps_framing_in_sync() -> None:
    stream = b"".join([
        _request("echo", {"text": "hi"}, b"x" * 300_000),
        _request("echo", {"text": 5}, b"dropped payload"),      # wrong type, payload drained
        _request("nope", {}),                                    # unknown verb
        _request("add", {"a": 2, "c": 1}),                       # undeclared argument
        _request("add", {"a": True}),                            # bool is not an int
        _request("boom", {}),                                    # handler crash -> ServerError
        _request("add", {"a": 2}),                               # still in sync
    ])
    pipe = Pipe(stream)
    wire.serve_stream(Echo(), "alice", pipe)
    replies = _replies(pipe.out.getvalue())
    assert len(replies) == 7
    assert replies[0][0]["ok"] and replies[0][0]["r"] == {"text": "hi", "who": "alice"}
    assert replies[0][1] == b"x" * 300_000
    assert [r[0]["e"] for r in replies[1:6]] == ["UsageError", "UsageError", "UsageError", "UsageError",
                                                  "ServerError"]
    assert "12345" not in replies[5][0]["m"]
    assert replies[6][0]["r"] == {"sum": 3}


def test_truncated_stream_ends_the_session_quietly() -> None:
    raw = _request("echo", {"text": "hi"}, b"abcdef")[:-3]
    pipe = Pipe(raw)
    wire.serve_stream(Echo(), "alice", pipe)  # must return, not hang or raise
    assert pipe.out.getvalue() == b"" or wire.read_header(Pipe(pipe.out.getvalue())) is not None


@pytest.fixture()
def ssh_server(tmp_path: Path) -> Any:
    host_line = crypto.generate_keypair(tmp_path / "host")
    user_line = crypto.generate_keypair(tmp_path / "user")
    allowed = crypto.fingerprint(user_line)
    server = ssh.SSHServer(crypto.load_paramiko_key(tmp_path / "host"), Echo(), "dgf-test",
                            lambda key: "user" if crypto.fingerprint(key) == allowed else None).start()
    yield server, host_line, tmp_path
    server.close()


def test_ssh_round_trip_uses_aes_gcm(ssh_server: Any) -> None:
    server, host_line, tmp = ssh_server
    conn = ssh.Connection(*server.address, crypto.load_paramiko_key(tmp / "user"), host_line, "dgf-test")
    chan = conn.channel()
    result, body = chan.call("echo", b"payload" * 50_000, text="ok")
    assert result == {"text": "ok", "who": "user"} and body == b"payload" * 50_000
    assert conn.transport.remote_cipher.endswith("gcm@openssh.com")
    # Pipelining: many requests before any reply, replies in order.
    for i in range(100):
        chan.send("add", {"a": i})
    assert [chan.receive()[0]["sum"] for _ in range(100)] == [i + 1 for i in range(100)]
    conn.close()


def test_a_taken_address_is_named_not_a_traceback(ssh_server: Any) -> None:
    # The metaserver and the sites showed a bind traceback when their port was taken.
    server, _, tmp = ssh_server
    host, port = server.address
    with pytest.raises(errors.ConfigError, match=f"cannot listen on {host}:{port} .Address already in use"):
        ssh.SSHServer(crypto.load_paramiko_key(tmp / "host"), Echo(), "dgf-test", lambda key: None, host, port)


def test_server_denies_unknown_keys_shell_exec_and_other_subsystems(ssh_server: Any) -> None:
    server, host_line, tmp = ssh_server
    crypto.generate_keypair(tmp / "stranger")
    with pytest.raises(errors.AuthenticationFailed):
        ssh.Connection(*server.address, crypto.load_paramiko_key(tmp / "stranger"), host_line, "dgf-test")
    conn = ssh.Connection(*server.address, crypto.load_paramiko_key(tmp / "user"), host_line, "dgf-test")
    for attempt in ("shell", "exec", "subsystem"):
        chan = conn.transport.open_session()
        with pytest.raises(paramiko.SSHException):
            if attempt == "shell":
                chan.invoke_shell()
            elif attempt == "exec":
                chan.exec_command("id")
            else:
                chan.invoke_subsystem("sftp")
    conn.close()


def test_capabilities_are_bound_to_principal_site_and_time(tmp_path: Path) -> None:
    crypto.generate_keypair(tmp_path / "meta")
    key = crypto.load_signing_key(tmp_path / "meta")
    public = key.public_key()
    token = crypto.issue_capability(key, "SHA256:alice", "get", "site-a", ["k1"], ttl=60)
    cap = crypto.check_capability(public, token, "SHA256:alice", "site-a")
    assert cap.op == "get" and cap.keys == frozenset({"k1"})
    with pytest.raises(errors.PermissionDenied, match="another principal"):
        crypto.check_capability(public, token, "SHA256:mallory", "site-a")
    with pytest.raises(errors.PermissionDenied, match="site"):
        crypto.check_capability(public, token, "SHA256:alice", "site-b")
    expired = crypto.issue_capability(key, "SHA256:alice", "get", "site-a", ["k1"], ttl=-crypto.CLOCK_LEEWAY_S - 1)
    with pytest.raises(errors.PermissionDenied, match="expired"):
        crypto.check_capability(public, expired, "SHA256:alice", "site-a")
    # Within the clock leeway a just-expired capability still counts (clocks differ a little).
    crypto.check_capability(public, crypto.issue_capability(key, "SHA256:alice", "get", "site-a", ["k1"], ttl=-1),
                            "SHA256:alice", "site-a")
    body, sig = token.split(".")
    forged = crypto._b64(crypto._unb64(body).replace(b'"get"', b'"put"')) + "." + sig
    with pytest.raises(errors.PermissionDenied, match="signature"):
        crypto.check_capability(public, forged, "SHA256:alice", "site-a")
    # A delete names the generation of each object it removes (none: any, as before them).
    delete = crypto.issue_capability(key, "SHA256:alice", "delete", "site-a", ["k2", "k1"], gens={"k1": 17})
    assert crypto.check_capability(public, delete, "SHA256:alice", "site-a").gens == {"k1": 17}
    assert cap.gens is None
    for odd in ({"k1": 17}, ["17", None], [17]):
        token = crypto.sign_token(key, {**crypto.verify_token(public, delete), "g": odd})
        with pytest.raises(errors.PermissionDenied, match="malformed"):
            crypto.check_capability(public, token, "SHA256:alice", "site-a")


def test_vault_keys_pseudonyms_are_stable_and_keyed() -> None:
    a = crypto.VaultKeys(b"a" * 64)
    b = crypto.VaultKeys(b"b" * 64)
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert a.pseudo_uid(uid) == a.pseudo_uid(uid) != b.pseudo_uid(uid)
    assert a.pseudo_uid(uid).startswith("2.25.") and len(a.pseudo_uid(uid)) <= 64
    assert -3653 <= a.date_offset_days("id:1") <= -365
    wrapped = a.wrap(b"k" * 32, b"P1")
    assert a.unwrap(wrapped, b"P1") == b"k" * 32
    with pytest.raises(errors.IntegrityError):
        a.unwrap(wrapped, b"P2")
    with pytest.raises(errors.IntegrityError):
        b.unwrap(wrapped, b"P1")


def test_concurrent_channels_on_one_connection(ssh_server: Any) -> None:
    server, host_line, tmp = ssh_server
    conn = ssh.Connection(*server.address, crypto.load_paramiko_key(tmp / "user"), host_line, "dgf-test")
    results: list[int] = []

    def work(base: int) -> None:
        chan = conn.channel()
        for i in range(50):
            results.append(chan.call("add", a=base + i, b=0)[0]["sum"])

    threads = [threading.Thread(target=work, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(k * 1000 + i for k in range(4) for i in range(50))
    conn.close()


def test_every_metaserver_verb_has_a_policy_entry() -> None:
    """The policy table covers the verb table exactly, so no verb is open by omission."""
    from metaserver.server import POLICY, MetaService

    verbs = {getattr(MetaService, a)._dgf_verb.name for a in dir(MetaService)
             if hasattr(getattr(MetaService, a), "_dgf_verb")}
    assert verbs == set(POLICY)


@settings(max_examples=200)
@given(st.lists(st.integers(0, 3 * 1024), max_size=40), st.integers(1, 2048))
def test_coalesced_chunks_keep_every_byte_in_order_and_join_only_small_ones(sizes: list[int], size: int) -> None:
    chunks = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    out = list(wire.coalesced(iter(chunks), size))
    assert b"".join(out) == b"".join(chunks)
    large = [c for c in chunks if len(c) >= size]
    for i, c in enumerate(out):
        # A chunk as large as a piece goes on untouched (not copied); joined ones stay below two.
        assert any(c is big for big in large) or len(c) < 2 * size
        # A short send only at the end, or just before a large chunk.
        assert len(c) >= size or i == len(out) - 1 or any(out[i + 1] is big for big in large)
    small = sum(len(c) for c in chunks if len(c) < size)
    assert len(out) <= 2 * len(large) + small // size + 1            # the sends it saves
