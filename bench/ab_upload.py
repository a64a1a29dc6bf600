"""Ingest of one tree's code against another's, alternated in one run (issue 16): what a change
to the upload path is worth on a machine whose speed moves by a third within the hour.

    git worktree add /tmp/base HEAD~1
    .venv/bin/python bench/ab_upload.py --base /tmp/base [--rounds 6] [--files 1000] [--dir /dev/shm]
    .venv/bin/python bench/ab_upload.py --base /tmp/base --client     # the client's code only

Two local federations, one running ``--base``'s servers and one this tree's; then, round by
round in alternating order, ``dgf_up -r`` of a fresh ``bench/synth.py`` small-file corpus (the
one ``bench/per_file.py`` uses) into each.  By default both uploads use this tree's client, so
the comparison is of the servers; ``--client`` instead runs both against this tree's servers,
with the client from each tree.  The base code is put first on ``PYTHONPATH``; servers run from
a directory holding no ``dgf/`` or ``metaserver/``, and so do the clients (``python -m`` and
``python -c`` put the working directory first on the path).  Prints one JSON object: per side, the median files/s, CPU ms per file
(client and every server process) and the metaserver's share, every run's files/s, and the
index rows per file each metaserver's database holds at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, synth  # noqa: E402
from dgf import local  # noqa: E402

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent.parent


def _federation(root: Path, code: Path | None) -> local.Federation:
    """A federation whose servers import ``code`` (None: this tree)."""
    saved = os.environ.get("PYTHONPATH")
    try:
        if code is not None:
            os.environ["PYTHONPATH"] = str(code)
        return local.up(root)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _rows_per_file(root: Path, tables: tuple[str, ...] = ("hvalues", "hshared")) -> float | None:
    """Index rows per indexed file in ``tables`` of the federation at ``root`` (None: none yet)."""
    db = root / "metadata.db"
    if not db.exists():
        return None
    with sqlite3.connect(db) as conn:
        files = int(conn.execute("SELECT count(*) FROM hlevels").fetchone()[0])
        rows = sum(int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables)
    return round(rows / files, 1) if files else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="the other tree (a git worktree)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--dir", default=None, help="where the work directory goes (default: the system's temp)")
    ap.add_argument("--client", action="store_true",
                    help="compare the client's code (both against this tree's servers), not the servers'")
    args = ap.parse_args()
    base = args.base.resolve()
    if not (base / "dgf" / "upload.py").is_file():
        raise SystemExit(f"{base} is not a dgf tree (no dgf/upload.py).")
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-ab-", dir=args.dir))
    home = os.getcwd()
    os.chdir(work)          # the clients run here: a directory holding no dgf/ (see above)
    sides = {"base": base, "this tree": None}
    feds = {"this tree": _federation(work / "this", None)}
    feds["base"] = feds["this tree"] if args.client else _federation(work / "base", base)
    n = args.files
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in sides}
    try:
        k = 0
        for r in range(args.rounds):
            for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                fed = feds[side]
                pids = local.pids(fed.root)
                src = synth.small_corpus(work / f"src{k}", n, seed=900 + k)
                env = {"DGF_CONFIG": str(fed.config("clinician")), "PATH": "/usr/bin:/bin"}
                code = sides[side] if args.client else None
                if code is not None:
                    env["PYTHONPATH"] = str(code)
                before = measure.cpu_of(pids["metaserver"])
                up = measure.run([sys.executable, "-c", "from dgf.cli import up_main; up_main()",
                                  str(src[0].parent), "--to", f"/ab{k}", "-r"], env, pids.values())
                meta = measure.cpu_of(pids["metaserver"]) - before
                runs[side].append((n / up.wall, up.cpu / n * 1000, meta / n * 1000))
                shutil.rmtree(src[0].parent)
                k += 1
        rows = {side: _rows_per_file(feds[side].root) for side in sides}
    finally:
        for fed in {id(f): f for f in feds.values()}.values():
            local.down(fed.root, quiet=True)
        os.chdir(home)
        shutil.rmtree(work, ignore_errors=True)
    out: dict[str, object] = {"files": n, "rounds": args.rounds, "compared": "client" if args.client else "servers"}
    for side, xs in runs.items():
        out[side] = {"files/s": round(statistics.median(x[0] for x in xs)),
                     "CPU ms per file": round(statistics.median(x[1] for x in xs), 2),
                     "metaserver CPU ms per file": round(statistics.median(x[2] for x in xs), 2),
                     "every run's files/s": [round(x[0]) for x in xs],
                     "index rows per file": rows[side]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
