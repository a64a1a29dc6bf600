"""What the loader would gain at a million headers from changes of the schema, before making them.

    .venv/bin/python bench/scale.py --patients 10000 --keep --commits 0   # a grown database, once
    .venv/bin/python bench/loader_bounds.py --db <that meta.db> --rounds 2

Loads ``--patients`` x 100 more synthetic headers (metaserver/synthetic.py) into a grown archive
per variant, the variants alternated for ``--rounds`` rounds, and prints headers/s and CPU per
header of each (also written to bench/out/loader_bounds.json).  Each variant stands in for a
change of the schema by feeding the loader what that change would make the database see:

- ``as is``: the loader as ``bench/scale.py`` runs it (object keys are SHA-256 digests);
- ``keys in order``: object keys that grow with each file, so the three B-trees keyed by the
  object key (objects, replicas, inodes' index) are appended to, as integer object ids would be;
- ``one UID fewer``: headers without MediaStorageSOPInstanceUID, which repeats the SOP Instance
  UID: one random row fewer in the index's value tree;
- ``both``, and ``both, big commits``: 50,000 headers a commit with a 2 GiB page cache;
- ``keys in order, no UID row``: headers without either SOP Instance UID, so the value tree
  takes no random row at all: the most that integer ids and value rows staged and merged in
  sorted batches could give together (the merges themselves not counted);
- ``as is, 1 GiB cache`` and ``as is, memory-mapped``: the schema as it is, with a page cache
  eight times the metaserver's (128 MiB), or the database read through a 16 GiB ``mmap_size``
  (pages read in place instead of copied into the cache): what a grown archive's reads cost.

Every variant adds files to the database (under /bounds<seed>/): run it on a copy you can lose.
Synthetic headers only: nothing identifying is involved.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from bench.measure import save  # noqa: E402
from metaserver import synthetic  # noqa: E402
from metaserver.engine import NewFile  # noqa: E402
from metaserver.index import HEADER_XATTR  # noqa: E402
from metaserver.sql import SqlEngine  # noqa: E402

MEDIA_UID = re.compile(rb'<MediaStorageSOPInstanceUID tag="00020003" vr="UI">[^<]*</MediaStorageSOPInstanceUID>')
SOP_UID = re.compile(rb'<SOPInstanceUID tag="00080018" vr="UI">[^<]*</SOPInstanceUID>')
VARIANTS: dict[str, dict[str, Any]] = {
    "as is": {},
    "keys in order": {"ordered": True},
    "one UID fewer": {"no_media_uid": True},
    "both": {"ordered": True, "no_media_uid": True},
    "both, big commits": {"ordered": True, "no_media_uid": True, "batch": 50_000, "cache_mib": 2048},
    "keys in order, no UID row": {"ordered": True, "no_media_uid": True, "no_sop_uid": True},
    "as is, 1 GiB cache": {"cache_mib": 1024},
    "as is, memory-mapped": {"mmap_mib": 16384},
}


def run(db: Path, patients: int, seed: int, ordered: bool = False, no_media_uid: bool = False,
        no_sop_uid: bool = False, batch: int = 10_000, cache_mib: int = 0, mmap_mib: int = 0) -> dict[str, float]:
    engine = SqlEngine(f"sqlite:///{db}")
    if cache_mib or mmap_mib:
        def pragmas(dbapi_conn: Any, _record: Any) -> None:
            if cache_mib:
                dbapi_conn.execute(f"PRAGMA cache_size=-{cache_mib * 1024}")
            if mmap_mib:
                dbapi_conn.execute(f"PRAGMA mmap_size={mmap_mib << 20}")
        sa.event.listen(engine.engine, "connect", pragmas)
        engine.engine.dispose()
    base = time.time_ns() << 64
    n = 0
    chunk: list[NewFile] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for path, xml in synthetic.headers(patients, seed=seed):
        path = f"/bounds{seed}{path}"
        if no_media_uid:
            xml = MEDIA_UID.sub(b"", xml)
        if no_sop_uid:
            xml = SOP_UID.sub(b"", xml)
        key = f"{base + n:064x}" if ordered else hashlib.sha256(path.encode()).hexdigest()
        n += 1
        chunk.append(NewFile(path, key, len(xml), "synthetic", {HEADER_XATTR: xml}))
        if len(chunk) >= batch:
            engine.create_files(chunk, replace=True)
            chunk = []
    if chunk:
        engine.create_files(chunk, replace=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    engine.close()
    return {"per_s": n / wall, "cpu_us_per_header": cpu / n * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, required=True, help="a grown SQLite archive (bench/scale.py --keep)")
    ap.add_argument("--patients", type=int, default=500, help="100 headers each, per variant and round (default 500)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", action="append", choices=list(VARIANTS), help="run these variants only (repeatable)")
    args = ap.parse_args()
    seeds = random.Random(time.time_ns())
    chosen = {name: VARIANTS[name] for name in args.only} if args.only else VARIANTS
    results: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    for r in range(args.rounds):
        for name, options in chosen.items():
            results[name].append(run(args.db, args.patients, seeds.randrange(1 << 30), **options))
            print(f"round {r + 1}, {name}: {results[name][-1]['per_s']:.0f} headers/s, "
                  f"{results[name][-1]['cpu_us_per_header']:.0f} us CPU a header", file=sys.stderr)
    report = {"headers_per_variant": args.patients * 100, "rounds": args.rounds, "variants": {
        name: {"per_s": [round(x["per_s"]) for x in runs],
               "median_per_s": round(statistics.median(x["per_s"] for x in runs)),
               "median_cpu_us_per_header": round(statistics.median(x["cpu_us_per_header"] for x in runs))}
        for name, runs in results.items()}}
    save("loader_bounds", report)


if __name__ == "__main__":
    main()
