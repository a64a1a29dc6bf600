"""``dgf fsck`` of a large archive: how long a whole-archive check of N objects takes.

    .venv/bin/python bench/fsck_scale.py [--objects 100000] [--runs 1]

The objects are made directly (small random bytes written into both sites' stores under their
SHA-256 and published through the metaserver engine's ``create_files``, the transaction an
upload commits through), so that making them does not dominate: this measures the check, not
the upload.  Then ``dgf fsck`` runs as the admin would run it: the metaserver lists the objects,
each site re-hashes its copies and lists its store, orphans are looked up.  Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgf import local  # noqa: E402
from ioserver.store import object_path  # noqa: E402
from metaserver.engine import NewFile  # noqa: E402
from metaserver.sql import SqlEngine  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-fsck-"))
    fed = local.up(work / "fed")
    try:
        local.down(fed.root)                      # fill the stores and the database offline
        t0 = time.perf_counter()
        engine = SqlEngine(f"sqlite:///{fed.root / 'metadata.db'}")
        batch: list[NewFile] = []
        header = b"<DicomHeader/>"
        for i in range(args.objects):
            data = os.urandom(512) + i.to_bytes(8, "little")
            key = hashlib.sha256(data).hexdigest()
            for site in ("site-a", "site-b"):
                path = object_path(fed.root / f"store-{site}", key)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            batch.append(NewFile(f"/scale/{i // 1000:03d}/{i:06d}.dcm", key, len(data), "site-a",
                                 {"user.dgf.dicom": header}, copies=("site-b",)))
            if len(batch) == 2000:
                engine.create_files(batch)
                batch = []
        if batch:
            engine.create_files(batch)
        engine.close()
        made = time.perf_counter() - t0
        fed = local.up(fed.root)
        env = dict(os.environ, DGF_CONFIG=str(fed.config("admin")))
        walls = []
        out = ""
        for _ in range(args.runs):
            t0 = time.perf_counter()
            proc = subprocess.run([str(BIN / "dgf"), "fsck"], env=env, capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            out = proc.stdout
            if proc.returncode != 0:
                raise SystemExit(f"fsck found problems: {proc.stdout}{proc.stderr}")
        print(json.dumps({"objects": args.objects, "copies": 2 * args.objects,
                          "setup s (not measured)": round(made, 1),
                          "fsck wall s (median)": round(statistics.median(walls), 1),
                          "runs": args.runs, "summary": out.strip().splitlines()[-1]}, indent=1))
    finally:
        local.down(fed.root, quiet=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
