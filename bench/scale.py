"""What a grown archive costs per file: the header index and the namespace at N headers (SQLite).

    .venv/bin/python bench/scale.py --patients 10000        # a million headers (~8 min), then measure
    .venv/bin/python bench/scale.py --patients 10000 --keep # the same, keeping the database
    .venv/bin/python bench/scale.py --db /path/meta.db      # measure a kept database again (adds to it)
    .venv/bin/python bench/scale.py --patients 200          # a quick look at 20,000

Three measurements, printed as one JSON object (also written to bench/out/scale.json):

- the loader (``synthetic.load``, the transaction an upload commits through) as the archive
  grows: headers/s and CPU per header over each 100,000;
- one more commit of 10,000 headers: the pages it writes, per B-tree (read from the WAL before
  any checkpoint), and what the process read and wrote per header (``/proc/self/io``), i.e.
  where a grown archive's extra cost goes;
- commits of 200 files into new series directories, an upload's commit: median ms, and CPU and
  wall per file including the checkpoints they cause;
- changes of the namespace one at a time, as a mount makes them (mkdir, rmdir, renames), each
  with the stat after it, and the stat in this process after another process's change: median ms.

Synthetic headers only (metaserver/synthetic.py): nothing identifying is involved.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from bench.measure import save  # noqa: E402
from metaserver import synthetic  # noqa: E402
from metaserver.sql import SqlEngine  # noqa: E402

WAL_HEADER, FRAME_HEADER = 32, 24


def io_counters() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f if line.strip())}


def cpu_s() -> float:
    return time.process_time()


def load(engine: SqlEngine, patients: int) -> dict[str, Any]:
    """Load ``patients`` x 100 headers, recording the rate over each 100,000."""
    steps: list[dict[str, float]] = []
    mark = {"n": 0, "t": time.perf_counter(), "cpu": cpu_s()}

    def progress(n: int) -> None:
        if n - mark["n"] >= 100_000 or n == patients * 100:
            t, cpu = time.perf_counter(), cpu_s()
            steps.append({"headers": n, "per_s": round((n - mark["n"]) / (t - mark["t"])),
                          "cpu_us_per_header": round((cpu - mark["cpu"]) / (n - mark["n"]) * 1e6)})
            print(f"  {n}: {steps[-1]['per_s']}/s, {steps[-1]['cpu_us_per_header']} us CPU a header", file=sys.stderr)
            mark.update(n=n, t=t, cpu=cpu)

    t0, c0 = time.perf_counter(), cpu_s()
    n = synthetic.load(engine, synthetic.headers(patients), progress=progress)
    wall = time.perf_counter() - t0
    return {"headers": n, "seconds": round(wall, 1), "per_s": round(n / wall),
            "cpu_us_per_header": round((cpu_s() - c0) / n * 1e6), "steps": steps}


def wal_pages(wal: Path) -> list[int]:
    """The page number of every frame in a WAL file (https://sqlite.org/fileformat.html#the_write_ahead_log)."""
    data = wal.read_bytes()
    if len(data) < WAL_HEADER:
        return []
    size = struct.unpack(">I", data[8:12])[0]
    return [struct.unpack(">I", data[at:at + 4])[0]
            for at in range(WAL_HEADER, len(data) - FRAME_HEADER - size + 1, FRAME_HEADER + size)]


def pages_per_tree(engine: SqlEngine, db: Path, seed: int) -> dict[str, Any]:
    """Commit 10,000 more headers with checkpoints off and count the pages written, per B-tree."""
    def no_checkpoints(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")

    sa.event.listen(engine.engine, "connect", no_checkpoints)
    engine.engine.dispose()                            # the pool's connections get the pragma
    with engine.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    before, t0, c0 = io_counters(), time.perf_counter(), cpu_s()
    n = synthetic.load(engine, synthetic.headers(100, seed=seed))
    wall, cpu, after = time.perf_counter() - t0, cpu_s() - c0, io_counters()
    frames = wal_pages(Path(str(db) + "-wal"))
    wanted = set(frames)
    owner: dict[int, str] = {}
    with engine.engine.connect() as conn:
        for name, page in conn.exec_driver_sql("SELECT name, pageno FROM dbstat"):
            if page in wanted:
                owner[page] = name
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    sa.event.remove(engine.engine, "connect", no_checkpoints)
    engine.engine.dispose()
    trees = collections.Counter(owner.get(p, "(new or free)") for p in wanted)
    return {"headers": n, "per_s": round(n / wall), "cpu_us_per_header": round(cpu / n * 1e6),
            "pages_per_header": round(len(wanted) / n, 2),
            "by_tree": {name: round(count / n, 2) for name, count in trees.most_common() if count / n >= 0.01},
            "per_header": {k: round((after[k] - before[k]) / n, 1) for k in ("rchar", "wchar", "syscr", "syscw")}}


def upload_commits(engine: SqlEngine, commits: int, seed: int) -> dict[str, Any]:
    """``commits`` commits of 200 files into new series directories, as an upload makes them
    (the headers are made first: what is timed is the commits)."""
    records = [(f"/grown{seed}{path}", xml)
               for path, xml in itertools.islice(synthetic.headers(commits * 2 + 1, seed=seed), commits * 200)]
    t0, c0 = time.perf_counter(), cpu_s()
    ends = [t0]
    synthetic.load(engine, iter(records), batch=200, progress=lambda _: ends.append(time.perf_counter()))
    with engine.engine.connect() as conn:           # the checkpoint these commits still owe
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
    files = len(records)
    return {"commits": commits, "median_ms": round(statistics.median(b - a for a, b in zip(ends, ends[1:])) * 1000, 1),
            "cpu_ms_per_file": round((cpu_s() - c0) / files * 1000, 3),
            "wall_ms_per_file": round((time.perf_counter() - t0) / files * 1000, 3)}


def tree_changes(engine: SqlEngine, runs: int) -> dict[str, Any]:
    """What a change of the namespace costs on a grown archive, as a mount makes them one at a
    time: mkdir, rmdir, a series directory's rename (and back), a file's rename (and back), each
    with one stat after it, which finds its parent in the directory map.  Then mkdir and rmdir
    made by a second metaserver process over the same database, with the stat in this one,
    whose map must catch up.  Median ms (wall and CPU) over ``runs`` series."""
    dirs = engine._read(engine._dir_paths)
    series = sorted(p for p in dirs.values() if p.startswith("/synthetic/") and p.count("/") == 4)[:runs]
    probe = series[-1]
    spent: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    other = SqlEngine(str(engine.engine.url))         # a second metaserver process

    def timed(kind: str, by: SqlEngine, change: Any, *args: str) -> None:
        t0, c0 = time.perf_counter(), cpu_s()
        change(*args)
        if by is not engine:
            t0, c0 = time.perf_counter(), cpu_s()     # what the change costs this process
        engine.stat(probe)
        spent[kind].append((time.perf_counter() - t0, cpu_s() - c0))

    for path in series[:-1]:
        timed("mkdir", engine, engine.mkdir, path + "-new")
        timed("rmdir", engine, engine.rmdir, path + "-new")
        timed("rename a directory", engine, engine.rename, path, path + "-moved")
        timed("rename a directory", engine, engine.rename, path + "-moved", path)
        file = engine.readdir(path)[0].path
        timed("rename a file", engine, engine.rename, file, file + ".x")
        timed("rename a file", engine, engine.rename, file + ".x", file)
    for path in series[:-1]:
        timed("mkdir by another process: the stat here", other, other.mkdir, path + "-new")
        timed("rmdir by another process: the stat here", other, other.rmdir, path + "-new")
    other.close()
    return {"directories": len(dirs), **{kind: {
        "median_ms": round(statistics.median(w for w, _ in pairs) * 1000, 2),
        "cpu_ms": round(statistics.median(c for _, c in pairs) * 1000, 2)} for kind, pairs in spent.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=10000, help="100 headers each (default 10000 = 1M)")
    ap.add_argument("--db", type=Path, help="an archive loaded before (this adds to it); skips the load")
    ap.add_argument("--commits", type=int, default=60, help="200-file commits to time (default 60; 0: none)")
    ap.add_argument("--changes", type=int, default=20, help="mkdir/rmdir/rename pairs to time (default 20)")
    ap.add_argument("--keep", action="store_true", help="keep the database it loads (for --db next time) and "
                    "print where it is; by default it is removed")
    args = ap.parse_args()
    report: dict[str, Any] = {}
    work: Path | None = None
    if args.db:
        db = args.db
    else:
        work = Path(tempfile.mkdtemp(prefix="dgf-scale-", dir=os.environ.get("DGF_BENCH_DIR")))
        db = work / "meta.db"
    try:
        engine = SqlEngine(f"sqlite:///{db}")
        if not args.db:
            print(f"loading {args.patients * 100} headers into {db}", file=sys.stderr)
            report["load"] = load(engine, args.patients)
        seed = int(time.time())
        print("one commit of 10,000 headers, pages per B-tree", file=sys.stderr)
        report["commit_10000"] = pages_per_tree(engine, db, seed)
        if args.commits:
            print(f"{args.commits} commits of 200 files into new series", file=sys.stderr)
            report["commit_200"] = upload_commits(engine, args.commits, seed + 1)
        print(f"namespace changes, {args.changes} of each", file=sys.stderr)
        report["tree_changes"] = tree_changes(engine, args.changes + 1)
        report["db_bytes"] = db.stat().st_size
        engine.close()
    finally:
        if work is not None and args.keep:
            print(f"kept {db}", file=sys.stderr)
        elif work is not None:
            shutil.rmtree(work, ignore_errors=True)
    save("scale", report)


if __name__ == "__main__":
    main()
