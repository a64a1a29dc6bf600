"""CPU a site's object store spends per object of a ``put.batch``, for A/B comparisons.

    .venv/bin/python bench/store_put.py [--tree T] [--objects 2000] [--size 39000] [--runs 5] [--dir DIR]

Stores ``--objects`` random objects of ``--size`` bytes in batches of 200 (``put_many``, the
group commit a ``put.batch`` uses, with its two filesystem syncs), then the same objects again:
an upload of instances a site already holds, which it verifies and stamps but does not write.
``--tree`` imports the store from another checkout (a ``git worktree``).  Prints the median CPU
(user + system, this process) per object of each, in microseconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=ROOT)
    ap.add_argument("--objects", type=int, default=2000)
    ap.add_argument("--size", type=int, default=39000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    from ioserver.store import LocalObjectStore

    blobs = [os.urandom(args.size) for _ in range(args.objects)]
    items = [(hashlib.sha256(b).hexdigest(), b) for b in blobs]
    new: list[float] = []
    held: list[float] = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            store = LocalObjectStore(Path(d) / "store")
            for out in (new, held):
                start = time.process_time()
                for i in range(0, len(items), 200):
                    store.put_many(items[i:i + 200])
                out.append((time.process_time() - start) / len(items) * 1e6)
    print(json.dumps({"tree": str(args.tree), "objects": args.objects, "size": args.size,
                      "new_us_per_object": round(statistics.median(new), 1),
                      "held_us_per_object": round(statistics.median(held), 1)}))


if __name__ == "__main__":
    main()
