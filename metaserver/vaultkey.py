"""Where the vault key comes from, and how it is rotated.

The vault key is two secrets: one keys the pseudonyms (it never changes: every pseudonym would),
one wraps the patients' data keys (the key-encryption key, KEK, which ``dgf admin vault rotate``
replaces).  The config's ``vault_key`` names its source:

- a file (``keys/vault.key``): the 64 bytes ``dgf-metaserver init`` wrote (both secrets in
  one), or the two-secret form a rotation writes, either of them optionally sealed with a
  passphrase (``dgf-metaserver vault protect``: scrypt, AES-256-GCM).  A sealed file needs the
  passphrase at start: ``DGF_VAULT_PASSPHRASE``, or typed at the terminal;
- ``env:NAME``: the environment variable NAME holds the file's bytes, base64-encoded, so the key
  never touches the metaserver's disk (a secrets manager, systemd's ``LoadCredential``).

The database records which KEK wraps its data keys (``vault.kek_id``): a key that does not
match is refused at start, before anything is sealed with it.  A rotation writes the new key
beside the old (``vault.key.next``), re-wraps every data key in one transaction, then renames;
a metaserver that stops in between finishes the rename when it starts.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from dgf import crypto, errors

PLAIN2 = b"DGFVAULT2\n"
SEALED = b"DGFVAULT2P\n"
PASSPHRASE_ENV = "DGF_VAULT_PASSPHRASE"
SCRYPT_N = 2 ** 15


@dataclass
class VaultSource:
    """The configured source of the vault key, and the passphrase that opened it (if any)."""

    spec: str
    base: Path
    passphrase: str | None = None

    @property
    def env(self) -> str | None:
        return self.spec[4:] if self.spec.startswith("env:") else None

    @property
    def path(self) -> Path:
        p = Path(self.spec).expanduser()
        return p if p.is_absolute() else self.base / p

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.path}"

    def read(self, path: Path | None = None) -> crypto.VaultKeys:
        """The keys, from the environment or from ``path`` (default: the configured file)."""
        if self.env is not None and path is None:
            text = os.environ.get(self.env)
            if not text:
                raise errors.ConfigError(f"the vault key is to come from environment variable {self.env}, "
                                         "which is not set.")
            try:
                blob = base64.b64decode(text, validate=True)
            except ValueError as exc:
                raise errors.ConfigError(f"environment variable {self.env} is not base64.") from exc
        else:
            where = path or self.path
            try:
                blob = where.read_bytes()
            except FileNotFoundError as exc:
                raise errors.ConfigError(f"vault key file {where} does not exist; run 'dgf-metaserver init'.") from exc
        return self._parse(blob)

    def _parse(self, blob: bytes) -> crypto.VaultKeys:
        if blob.startswith(SEALED):
            if self.passphrase is None:
                self.passphrase = _ask_passphrase(self.describe())
            blob = _unseal(blob[len(SEALED):], self.passphrase, self.describe())
        if blob.startswith(PLAIN2):
            try:
                doc = json.loads(blob[len(PLAIN2):])
                return crypto.VaultKeys(base64.b64decode(doc["pseudonym"]), base64.b64decode(doc["kek"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise errors.ConfigError(f"the vault key in {self.describe()} is damaged.") from exc
        return crypto.VaultKeys(blob)

    def encode(self, keys: crypto.VaultKeys, passphrase: str | None) -> bytes:
        """The key file bytes for ``keys``: two-secret form, sealed when ``passphrase`` is set."""
        plain = PLAIN2 + json.dumps({"pseudonym": base64.b64encode(keys.secret).decode(),
                                     "kek": base64.b64encode(keys.kek_secret).decode()}).encode()
        return SEALED + _seal(plain, passphrase) if passphrase else plain


def _ask_passphrase(where: str) -> str:
    phrase = os.environ.get(PASSPHRASE_ENV)
    if phrase:
        return phrase
    if sys.stdin is not None and sys.stdin.isatty():
        return getpass.getpass(f"passphrase for the vault key ({where}): ")
    raise errors.ConfigError(f"the vault key ({where}) is sealed with a passphrase: set {PASSPHRASE_ENV} "
                             "or start the metaserver on a terminal.")


def _kdf(passphrase: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=8, p=1).derive(passphrase.encode("utf-8"))


def _seal(plain: bytes, passphrase: str) -> bytes:
    salt, nonce = os.urandom(16), os.urandom(12)
    ct = AESGCM(_kdf(passphrase, salt)).encrypt(nonce, plain, SEALED)
    return json.dumps({"kdf": "scrypt", "n": SCRYPT_N, "salt": base64.b64encode(salt).decode(),
                       "nonce": base64.b64encode(nonce).decode(), "ct": base64.b64encode(ct).decode()}).encode()


def _unseal(blob: bytes, passphrase: str, where: str) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        doc = json.loads(blob)
        salt, nonce, ct = (base64.b64decode(doc[k]) for k in ("salt", "nonce", "ct"))
    except (ValueError, KeyError, TypeError) as exc:
        raise errors.ConfigError(f"the sealed vault key in {where} is damaged.") from exc
    try:
        return AESGCM(_kdf(passphrase, salt)).decrypt(nonce, ct, SEALED)
    except InvalidTag as exc:
        raise errors.AuthenticationFailed(f"the passphrase does not open the vault key in {where}.") from exc


def open_keys(source: VaultSource, recorded: str | None) -> crypto.VaultKeys:
    """The vault keys, checked against the KEK id the database records (``recorded``; None for
    a database that records none yet).  A rotation cut short (the new key beside the old,
    the database already re-wrapped) is finished here."""
    keys = source.read()
    if recorded is None or keys.kek_id == recorded:
        return keys
    nxt = source.path.with_name(source.path.name + ".next") if source.env is None else None
    if nxt is not None and nxt.exists():
        fresh = source.read(nxt)
        if fresh.kek_id == recorded:
            os.replace(nxt, source.path)          # the rotation committed; finish it
            return fresh
    raise errors.ConfigError(f"the vault key from {source.describe()} does not match this database (it "
                             f"wraps its patient keys with key {recorded[:8]}..., this is {keys.kek_id[:8]}...); "
                             "refusing to start rather than seal identities no one could open.")
