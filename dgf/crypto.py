"""Keys, signatures, capabilities, the vault's envelope encryption and keyed pseudonyms.

Everything here is built on ``cryptography`` primitives (Ed25519, AES-GCM, HKDF, HMAC-SHA256);
nothing is home-grown beyond how they are combined:

- principals and servers hold Ed25519 keys in OpenSSH format, used by paramiko for SSH and by
  this module to sign capabilities (metaserver) and upload receipts (I/O servers);
- a **capability** is a signed, expiring statement "principal P may do OP on objects K at site S"
  that an I/O server checks without a round trip to the metaserver;
- the **vault key file** (64 random bytes, readable only by the metaserver) yields, by HKDF, the
  key-encryption key that wraps one data key per patient, and the HMAC key for pseudonyms.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dgf import errors
from dgf.sshlib import paramiko

# --------------------------------------------------------------------------------------------
# Key files


def write_private(path: Path, data: bytes) -> None:
    """Write secret bytes readable by the owner only, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def generate_keypair(path: Path, comment: str = "dgf") -> str:
    """Create an Ed25519 key at ``path`` (and ``path.pub``); return the public key line."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    write_private(path, pem)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode() + f" {comment}"
    Path(str(path) + ".pub").write_text(line + "\n")
    return line


def load_paramiko_key(path: Path) -> paramiko.PKey:
    try:
        return paramiko.Ed25519Key.from_private_key_file(str(path))
    except FileNotFoundError as exc:
        raise errors.ConfigError(f"key file {path} does not exist; run 'dgf local up' or set 'key' in the config.") from exc
    except (paramiko.SSHException, ValueError) as exc:
        raise errors.ConfigError(f"key file {path} is not an unencrypted Ed25519 OpenSSH key.") from exc


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise errors.ConfigError(f"key file {path} does not exist.") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise errors.ConfigError(f"key file {path} is not an Ed25519 key.")
    return key


def public_line(key: paramiko.PKey | Ed25519PrivateKey) -> str:
    """The OpenSSH public key line ("ssh-ed25519 AAAA...") of a key."""
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode()
    return f"{key.get_name()} {key.get_base64()}"


def fingerprint(key: paramiko.PKey | str) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key (a paramiko key or an OpenSSH line)."""
    if isinstance(key, str):
        parts = key.split()
        if len(parts) < 2:
            raise errors.UsageError("a public key line must read 'ssh-ed25519 AAAA...'.")
        try:
            blob = base64.b64decode(parts[1], validate=True)
        except ValueError as exc:
            raise errors.UsageError("the public key is not valid base64.") from exc
    else:
        blob = key.asbytes()
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load_public(line: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_ssh_public_key(line.encode())
    except (ValueError, TypeError) as exc:
        raise errors.UsageError("the public key is not an OpenSSH public key line.") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise errors.UsageError("only ssh-ed25519 keys are accepted.")
    return key


# --------------------------------------------------------------------------------------------
# Signed tokens: capabilities (metaserver -> I/O server) and receipts (I/O server -> metaserver)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


#: Signed bytes start with this, so a token signature can never be mistaken for an SSH signature
#: made with the same host key.
_TOKEN_DOMAIN = b"dgf-token-v1\0"


def sign_token(key: Ed25519PrivateKey, claims: dict[str, Any]) -> str:
    body = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    return _b64(body) + "." + _b64(key.sign(_TOKEN_DOMAIN + body))


def verify_token(public: Ed25519PublicKey, token: str) -> dict[str, Any]:
    try:
        body_b64, sig_b64 = token.split(".")
        body = _unb64(body_b64)
        public.verify(_unb64(sig_b64), _TOKEN_DOMAIN + body)
        claims = json.loads(body)
    except (ValueError, InvalidSignature) as exc:
        raise errors.PermissionDenied("the capability or receipt has an invalid signature.") from exc
    if not isinstance(claims, dict):
        raise errors.PermissionDenied("the capability is malformed.")
    return claims


def issue_capability(key: Ed25519PrivateKey, principal_fp: str, op: str, site: str,
                     keys: Iterable[str] | None, ttl: float = 600.0, epoch: int | None = None,
                     at: list[Any] | None = None, gens: dict[str, int] | None = None) -> str:
    """A capability for ``op`` ("get", "put", "delete", "recon") at ``site``.

    ``keys`` None means any object (used for put, where the key is the content hash and the I/O
    server checks it, so a put capability cannot overwrite anything).  ``epoch``: the archive's
    grant epoch, for a principal whose access comes from cohort grants; sites refuse it once the
    epoch has moved on (a grant was revoked).  ``at``: [host, port, host key] of ``site``, for a
    capability issued to another site, which then connects only where the metaserver says.
    ``gens``: for a delete, the generation of each object released (ObjectStore.delete).
    """
    now = time.time()
    claims: dict[str, Any] = {"p": principal_fp, "op": op, "site": site, "iat": now, "exp": now + ttl}
    if epoch is not None:
        claims["ge"] = epoch
    if keys is not None:
        claims["keys"] = sorted(set(keys))
    if at is not None:
        claims["at"] = at
    if gens and keys is not None:
        # Beside the keys, in their order (null: none known): an ``rm -r`` of many files
        # carries one per object, and a map would repeat every key.
        claims["g"] = [gens.get(k) for k in claims["keys"]]
    return sign_token(key, claims)


#: Seconds of clock difference between the metaserver and a site that capabilities tolerate.
CLOCK_LEEWAY_S = 60.0


@dataclass(frozen=True)
class Capability:
    op: str
    keys: frozenset[str] | None
    expires: float
    epoch: int | None = None       # the grant epoch it was issued under (cohort grants only)
    gens: dict[str, int] | None = None  # a delete's: the generation of each object it removes


def check_capability(public: Ed25519PublicKey, token: str, principal_fp: str, site: str) -> Capability:
    """Verify a capability for the connected principal at this site; raise PermissionDenied."""
    claims = verify_token(public, token)
    if claims.get("p") != principal_fp:
        raise errors.PermissionDenied("the capability was issued to another principal.")
    if claims.get("site") != site:
        raise errors.PermissionDenied(f"the capability is for site {claims.get('site')!r}, not {site!r}.")
    now = time.time()
    issued, expires = float(claims.get("iat", 0)), float(claims.get("exp", 0))
    if issued > now + CLOCK_LEEWAY_S:
        raise errors.PermissionDenied(
            f"the capability was issued {issued - now:.0f} s in the future by site {site}'s clock: this "
            "site's clock is behind the metaserver's; synchronise their clocks (NTP).")
    if expires + CLOCK_LEEWAY_S < now:
        ahead = now - issued if issued else 0.0
        hint = (f"; it was issued {ahead:.0f} s ago by site {site}'s clock, so this site's clock may run "
                "ahead of the metaserver's: synchronise their clocks (NTP)") if ahead > expires - issued + \
            CLOCK_LEEWAY_S and issued else ""
        raise errors.PermissionDenied(f"the capability has expired; ask the metaserver for a new one{hint}.")
    keys = claims.get("keys")
    epoch = claims.get("ge")
    listed = claims.get("g")
    gens = None
    if listed is not None:
        if not (isinstance(keys, list) and isinstance(listed, list) and len(listed) == len(keys) and all(
                g is None or type(g) is int for g in listed)):
            raise errors.PermissionDenied("the capability is malformed.")
        gens = {k: g for k, g in zip(keys, listed) if g is not None}
    return Capability(str(claims.get("op")), frozenset(keys) if keys is not None else None,
                      expires + CLOCK_LEEWAY_S, int(epoch) if isinstance(epoch, int) else None, gens)


# --------------------------------------------------------------------------------------------
# Vault keys: envelope encryption and pseudonyms


def new_vault_keyfile(path: Path) -> None:
    write_private(path, os.urandom(64))


class VaultKeys:
    """Keys derived from the vault key file, which only the metaserver can read."""

    def __init__(self, secret: bytes, kek_secret: bytes | None = None) -> None:
        """``secret`` keys the pseudonyms (for ever: changing it changes every pseudonym);
        ``kek_secret`` (default: the same) wraps the patients' data keys, and is what a
        rotation replaces."""
        kek_secret = secret if kek_secret is None else kek_secret
        if len(secret) < 32 or len(kek_secret) < 32:
            raise errors.ConfigError("the vault key is too short (need 64 random bytes).")
        self.secret, self.kek_secret = secret, kek_secret
        kek = self._derive(kek_secret, b"dgf vault kek v1")
        self._kek = AESGCM(kek)
        #: Names the key-encryption key without revealing it: the database records which one
        #: wraps its data keys, so a mismatched key file is refused at start.
        self.kek_id = hashlib.sha256(b"dgf kek id\0" + kek).hexdigest()[:32]
        self.pseudonym_key = self._derive(secret, b"dgf pseudonym v1")

    @classmethod
    def load(cls, path: Path) -> VaultKeys:
        try:
            return cls(Path(path).read_bytes())
        except FileNotFoundError as exc:
            raise errors.ConfigError(f"vault key file {path} does not exist; run 'dgf-metaserver init'.") from exc

    @staticmethod
    def _derive(secret: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)

    def wrap(self, data_key: bytes, label: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._kek.encrypt(nonce, data_key, label)

    def unwrap(self, wrapped: bytes, label: bytes) -> bytes:
        try:
            return self._kek.decrypt(wrapped[:12], wrapped[12:], label)
        except InvalidTag as exc:
            raise errors.IntegrityError("a patient data key failed to decrypt; the vault key file does not match.") from exc

    # Pseudonyms -----------------------------------------------------------------------------

    def _mac(self, kind: bytes, value: str) -> bytes:
        return hmac.new(self.pseudonym_key, kind + b"\0" + value.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).digest()

    def pseudo_uid(self, uid: str) -> str:
        """``2.25.`` + 128 bits of HMAC: stable across uploads and sites, at most 44 characters."""
        return "2.25." + str(int.from_bytes(self._mac(b"uid", uid)[:16], "big"))

    def pseudo_patient(self, patient_key: str) -> str:
        return "P" + base64.b32encode(self._mac(b"patient", patient_key)[:10]).decode()

    def date_offset_days(self, patient_key: str) -> int:
        """Per-patient shift for Retain Longitudinal Temporal Information with Modified Dates:
        between 1 and 10 years into the past, stable for the patient, so intervals are kept."""
        return -(365 + int.from_bytes(self._mac(b"dateshift", patient_key)[:4], "big") % 3288)


def seal(data_key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, aad)


def unseal(data_key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(data_key).decrypt(blob[:12], blob[12:], aad)
    except InvalidTag as exc:
        raise errors.IntegrityError("an identity record failed to decrypt (tampered or wrong key).") from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
