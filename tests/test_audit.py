"""The audit log is a hash chain (issue 13): 'dgf admin audit verify' finds a record changed,
removed or moved, and records cut off the end; --json exports it for a SIEM."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from dgf import local
from dgf.client import Client
from tests import corpus


def _dgf(fed: local.Federation, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DGF_CONFIG=str(fed.config("admin")))
    return subprocess.run([str(Path(sys.executable).parent / "dgf"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_the_audit_chain_finds_changed_removed_moved_and_cut_records(tmp_path: Path) -> None:
    fed = local.up(tmp_path / "fed")
    try:
        with Client(fed.config("clinician")) as c:
            c.upload([corpus.file("CT_small.dcm")], to="/audited")
            c.download(["/audited"], tmp_path / "out", identified=True)          # an identity release
            c.save_query("audited", "/DicomHeader[Modality='CT']")
        ok = _dgf(fed, "admin", "audit", "verify")
        assert ok.returncode == 0 and "audit log intact" in ok.stdout, ok.stdout + ok.stderr
        lines = _dgf(fed, "admin", "audit", "--json", "--after", "0", "--limit", "1000").stdout.splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["id"] for r in records] == sorted(r["id"] for r in records) and len(records) >= 4
        assert all(len(r["hash"]) == 64 for r in records)
        assert {"identity.release", "query.save"} <= {r["action"] for r in records}

        db = sqlite3.connect(fed.root / "metadata.db", timeout=30)
        target = next(r for r in records if r["action"] == "identity.release")

        def verify() -> subprocess.CompletedProcess[str]:
            return _dgf(fed, "admin", "audit", "verify")

        # A record changed: the release now says another principal.
        db.execute("UPDATE audit SET principal = 'researcher' WHERE id = ?", (target["id"],))
        db.commit()
        broken = verify()
        assert broken.returncode == 6 and f"BROKEN at record {target['id']}" in broken.stderr, broken.stderr
        db.execute("UPDATE audit SET principal = ? WHERE id = ?", (target["principal"], target["id"]))
        db.commit()
        assert verify().returncode == 0
        # A record removed.
        row = db.execute("SELECT * FROM audit WHERE id = ?", (target["id"],)).fetchone()
        db.execute("DELETE FROM audit WHERE id = ?", (target["id"],))
        db.commit()
        assert verify().returncode == 6
        db.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
        db.commit()
        assert verify().returncode == 0
        # Two records swapped (moved).
        a, b = records[1], records[2]
        cols = "ts = ?, principal = ?, action = ?, target = ?, outcome = ?, detail = ?, hash = ?"
        for src, dst in ((b, a), (a, b)):
            db.execute(f"UPDATE audit SET {cols} WHERE id = ?", (src["ts"], src["principal"], src["action"],
                       src["target"], src["outcome"], src["detail"], src["hash"], dst["id"]))
        db.commit()
        assert verify().returncode == 6
        for r in (a, b):
            db.execute(f"UPDATE audit SET {cols} WHERE id = ?", (r["ts"], r["principal"], r["action"],
                       r["target"], r["outcome"], r["detail"], r["hash"], r["id"]))
        db.commit()
        assert verify().returncode == 0
        # The newest records cut off the end.
        last = db.execute("SELECT max(id) FROM audit").fetchone()[0]
        db.execute("DELETE FROM audit WHERE id = ?", (last,))
        db.commit()
        cut = verify()
        assert cut.returncode == 6 and "removed from the end" in cut.stderr
        db.close()
    finally:
        local.down(fed.root, quiet=True)
