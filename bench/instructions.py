"""Instructions the metadata engine executes per file of a commit (valgrind), for A/B comparisons
on a machine whose wall and CPU times move by half from one run to the next.

    .venv/bin/python bench/instructions.py                      # this tree, both workloads
    .venv/bin/python bench/instructions.py --tree /tmp/oldtree  # another checkout (git worktree)

Two workloads, each through ``create_files`` on SQLite in one process:

- **upload**: commits of 200 de-identified small CT/MR headers (``bench/synth.py``'s corpus: 50
  patients, 3 series each; de-identified as ``dgf_up`` does, headers written as a site derives
  them), each file with an identity, block list and two replicas, as an upload commits them;
- **loader**: ``metaserver/synthetic.py``'s headers, in the loader's commits of 10,000.

Each runs under ``valgrind --tool=cachegrind`` twice, committing few and many files; the
difference divided by the difference in files is the cost per file, with imports and set-up
cancelled out.  PYTHONHASHSEED and OPENBLAS_NUM_THREADS are fixed, so a figure repeats to ~0.1 %
(an idle OpenBLAS thread spins and would count).  Needs Debian's ``valgrind``; ~2 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: (smaller, larger) amount of work, in files; commits of ``batch``.
SIZES = {"upload": (400, 1600, 200), "loader": (2000, 6000, 10000)}


def _upload(work: Path, files: int, batch: int) -> None:
    from bench import synth
    from dgf.dicom import deid, pipeline, xmlheader
    from dgf.dicom.profile import Options
    from metaserver.engine import NewFile
    from metaserver.sql import SqlEngine

    prof = pipeline._profile(Options())
    uids: dict[str, str] = {}
    headers = []
    for i, path in enumerate(synth.small_corpus(work / "src", batch)):
        plan = deid.analyze(path.read_bytes(), prof)
        for u in plan.uids:
            uids.setdefault(u, f"2.25.{len(uids) + 1000}")
        headers.append(xmlheader.header_xml(deid.apply(plan, deid.Pseudonyms(uids, f"ANON{i % 50}", 0), prof).data))
    engine = SqlEngine(f"sqlite:///{work / 'meta.db'}")
    engine.add_patient_key("P1", b"wrapped")
    for r in range(files // batch + 1):                 # the first commit warms the caches
        batch_files = []
        for i, xml in enumerate(headers):
            name = f"/r{r}/s{i % 3}/f{i:04d}.dcm"
            batch_files.append(NewFile(name, hashlib.sha256(name.encode()).hexdigest(), 39000, "site-a",
                                       {"user.dgf.dicom": xml}, "P1", b"sealed" * 40, blocks=b"d" * 64,
                                       copies=("site-b",), original_size=39500))
        engine.create_files(batch_files)
    engine.close()


def _loader(work: Path, files: int, batch: int) -> None:
    from metaserver import synthetic
    from metaserver.sql import SqlEngine

    engine = SqlEngine(f"sqlite:///{work / 'meta.db'}")
    records = list(synthetic.headers(SIZES["loader"][1] // 100 + 10))   # the same for both sizes
    synthetic.load(engine, iter(records[:1000]), batch=1000)            # warms the caches
    synthetic.load(engine, iter(records[1000:1000 + files]), batch=batch)
    engine.close()


def _instructions(tree: Path, what: str, files: int) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                          sys.executable, __file__, "--inner", what, str(files), "--tree", str(tree)],
                         env=env, capture_output=True, text=True, check=True).stderr
    found = re.search(r"I\s+refs:\s+([\d,]+)", out)
    if not found:
        raise SystemExit(f"valgrind printed no instruction count:\n{out[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=str(ROOT), help="the checkout whose metaserver is measured (default: this one)")
    ap.add_argument("--what", choices=sorted(SIZES), action="append", help="a workload (default: both)")
    ap.add_argument("--inner", nargs=2, metavar=("WHAT", "FILES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(ROOT))        # bench/ from here, the engine from the tree measured
    sys.path.insert(0, str(tree))
    if args.inner:
        what, files = args.inner[0], int(args.inner[1])
        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as work:
            (_upload if what == "upload" else _loader)(Path(work), files, SIZES[what][2])
        return
    for what in args.what or sorted(SIZES):
        small, large, _ = SIZES[what]
        per_file = (_instructions(tree, what, large) - _instructions(tree, what, small)) / (large - small)
        print(f"{what}: {per_file / 1e6:.2f}M instructions per file ({tree})")


if __name__ == "__main__":
    main()
