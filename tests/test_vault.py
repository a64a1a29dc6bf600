"""The vault key (issue 13): kept apart from the database (a file, a sealed file, an environment
variable), checked against the database at start, and rotated with every identity kept."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgf import errors, local
from dgf.client import Client
from tests import corpus

BIN = Path(sys.executable).parent


def _original_back(fed: local.Federation, tmp_path: Path, name: str) -> bytes:
    out = tmp_path / name
    with Client(fed.config("clinician")) as c:
        got = c.download(["/vault"], out, identified=True)
    assert got.downloaded == 1 and not got.failed, got.failed
    return next(out.rglob("*.dcm")).read_bytes()


def test_rotate_seal_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = corpus.file("CT_small.dcm")
    fed = local.up(tmp_path / "fed")
    key = fed.root / "keys" / "vault.key"
    try:
        with Client(fed.config("clinician")) as c:
            c.upload([source], to="/vault")
            pseudonym = c.find("/DicomHeader", "/vault", show=["PatientID"])[0]["values"]["PatientID"]
        old = key.read_bytes()
        # Rotation: every patient key re-wrapped; identities and pseudonyms unchanged.
        env = dict(os.environ, DGF_CONFIG=str(fed.config("admin")))
        rotated = subprocess.run([str(BIN / "dgf"), "admin", "vault", "rotate"], capture_output=True, text=True, env=env)
        assert rotated.returncode == 0 and "1 patient key(s) re-wrapped" in rotated.stdout, rotated.stderr
        assert key.read_bytes() != old and not key.with_name("vault.key.next").exists()
        assert _original_back(fed, tmp_path, "after-rotate") == source.read_bytes()
        with Client(fed.config("clinician")) as c:
            c.upload([corpus.file("MR_small.dcm")], to="/vault2")
            assert c.find("/DicomHeader", "/vault", show=["PatientID"])[0]["values"]["PatientID"] == pseudonym
        local.down(fed.root)
        # The old key no longer matches this database: the metaserver refuses to start with it.
        shutil.copy(key, tmp_path / "new.key")
        key.write_bytes(old)
        refused = subprocess.run([sys.executable, "-m", "metaserver.server", "serve", "--config",
                                  str(fed.root / "metaserver.conf")], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "does not match this database" in refused.stderr, refused.stderr
        shutil.copy(tmp_path / "new.key", key)
        # Sealed with a passphrase: refused without it, served with it.
        monkeypatch.setenv("DGF_VAULT_NEW_PASSPHRASE", "correct horse battery staple")
        sealed = subprocess.run([sys.executable, "-m", "metaserver.server", "vault", "protect", "--config",
                                 str(fed.root / "metaserver.conf")], capture_output=True, text=True)
        assert sealed.returncode == 0, sealed.stderr
        assert key.read_bytes().startswith(b"DGFVAULT2P\n") and b"kek" not in key.read_bytes()
        with pytest.raises(errors.DgfError):
            local.up(fed.root)                                  # no passphrase: it does not start
        log = (fed.root / "logs" / "metaserver.log").read_text()
        assert "sealed with a passphrase: set DGF_VAULT_PASSPHRASE" in log
        monkeypatch.setenv("DGF_VAULT_PASSPHRASE", "correct horse battery staple")
        fed = local.up(fed.root)
        assert _original_back(fed, tmp_path, "sealed") == source.read_bytes()
        local.down(fed.root)
        # From the environment: the key file can go.
        monkeypatch.delenv("DGF_VAULT_PASSPHRASE")
        plain_env = base64.b64encode((tmp_path / "new.key").read_bytes()).decode()
        monkeypatch.setenv("DGF_TEST_VAULT", plain_env)
        conf = fed.root / "metaserver.conf"
        conf.write_text(conf.read_text().replace("vault_key = keys/vault.key", "vault_key = env:DGF_TEST_VAULT"))
        key.unlink()
        fed = local.up(fed.root)
        assert _original_back(fed, tmp_path, "env") == source.read_bytes()
    finally:
        local.down(fed.root, quiet=True)
