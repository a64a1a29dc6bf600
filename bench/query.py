"""Cohort queries at scale (issue 4): load synthetic headers into SQLite and PostgreSQL, then time
representative queries through the planner (p50/p95 over several runs), the scan fallback, and
Gfarm-style per-file evaluation (PostgreSQL's own xpath() on every header, no index) for the ratio.

    .venv/bin/python bench/query.py --patients 10000        # 1,000,000 instances
    .venv/bin/python bench/query.py --patients 100 --runs 3 # a quick look

Prints a JSON summary (also written to bench/out/query.json); nothing identifying is involved
(the headers are synthetic).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from bench.measure import save  # noqa: E402
from metaserver import query, synthetic  # noqa: E402
from metaserver.sql import SqlEngine  # noqa: E402

QUERIES = {
    "equality (one patient)": "/DicomHeader[PatientID='P0001234']",
    "equality x3": "/DicomHeader[Modality='PT' and PatientSex='F' and BodyPartExamined='HEART']",
    "numeric ranges": "/DicomHeader[Modality='CT' and SliceThickness <= 0.5 and KVP >= 140]",
    "date range": "/DicomHeader[StudyDate >= 20230101 and StudyDate <= 20230131 and Modality='MR']",
    "or": "/DicomHeader[(Modality='NM' or Modality='PT') and BodyPartExamined='HEAD']",
    "not": "/DicomHeader[Modality='CT' and BodyPartExamined='KNEE' and SliceThickness < 1 and not(ContrastBolusAgent)]",
    "sequence attribute": "/DicomHeader[ContrastBolusAgentSequence/Item/CodeValue='C-17800' and Modality='US']",
    "sequence item path": "//ProcedureCodeSequence/Item[CodeValue='RPID60' and CodeMeaning='PET CT WHOLE BODY']",
    "contains": "/DicomHeader[Modality='MR' and contains(SeriesDescription, 'SAG 0.625')]",
    "starts-with": "/DicomHeader[starts-with(StudyDate, '201503')]",
    "study-level cohort (issue's example)": (
        "/DicomHeader[Modality='CT' and PatientSex='F' and substring-before(PatientAge, 'Y') > 60"
        " and SliceThickness <= 1 and StudyDate >= 20190101 and StudyDate <= 20231231"
        " and ContrastBolusAgent]"),
}
LEVEL = {"study-level cohort (issue's example)": "study"}
SCAN = "/DicomHeader[count(ImageType) = 3 and string-length(SeriesDescription) > 18]"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_queries(engine: SqlEngine, dialect: str, runs: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, expr in QUERIES.items():
        times, n = [], 0
        for _ in range(runs):
            t = time.perf_counter()
            q = query.prepare(expr, engine.query_catalogue(), dialect, engine.query_estimate)
            n = sum(1 for _ in query.run(engine, q, "/", [], level=LEVEL.get(name, "instance")))
            times.append(time.perf_counter() - t)
        out[name] = {"rows": n, "p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * pct(times, 0.95),
                     "strategy": q.explain()["strategy"]}
        print(f"  {name}: {n} rows, p50 {out[name]['p50_ms']:.0f} ms", file=sys.stderr)
    return out


def db_size(engine: SqlEngine, url: str) -> int:
    if engine.is_sqlite:
        path = url.split("///", 1)[1]
        return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
    with engine.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one())


def bench_backend(url: str, dialect: str, patients: int, runs: int, scan: bool) -> dict[str, object]:
    engine = SqlEngine(url)
    t = time.perf_counter()
    n = synthetic.load(engine, synthetic.headers(patients),
                       progress=lambda k: print(f"\r  loaded {k}", end="", file=sys.stderr))
    load_s = time.perf_counter() - t
    print(file=sys.stderr)
    result: dict[str, object] = {"instances": n, "load_s": load_s, "load_per_s": n / load_s,
                                 "db_bytes": db_size(engine, url), "queries": run_queries(engine, dialect, runs)}
    if scan:
        t = time.perf_counter()
        q = query.prepare(SCAN, engine.query_catalogue(), dialect, engine.query_estimate)
        rows = sum(1 for _ in query.run(engine, q, "/", []))
        result["scan"] = {"expression": SCAN, "rows": rows, "seconds": time.perf_counter() - t,
                          "strategy": q.explain()["strategy"]}
    engine.close()
    return result


def gfarm_style(url: str, runs: int) -> dict[str, object]:
    """PostgreSQL's xpath() on every header, as gffindxmlattr does, vs our planner, same database."""
    engine = SqlEngine(url)
    out: dict[str, object] = {}
    with engine.engine.connect() as conn:
        for name in ("equality x3", "numeric ranges", "sequence attribute"):
            expr = QUERIES[name]
            per_file, ours = [], []
            for _ in range(runs):
                t = time.perf_counter()
                pf = conn.execute(sa.text(
                    "SELECT count(*) FROM xattrs WHERE name = 'user.dgf.dicom' AND "
                    "xpath_exists(:x, convert_from(value, 'UTF8')::xml)"), {"x": expr}).scalar_one()
                per_file.append(time.perf_counter() - t)
                t = time.perf_counter()
                q = query.prepare(expr, engine.query_catalogue(), "postgresql", engine.query_estimate)
                mine = sum(1 for _ in query.run(engine, q, "/", []))
                ours.append(time.perf_counter() - t)
                assert mine == pf, (name, mine, pf)
            out[name] = {"rows": pf, "per_file_ms": 1000 * statistics.median(per_file),
                         "planner_ms": 1000 * statistics.median(ours),
                         "ratio": statistics.median(per_file) / statistics.median(ours)}
    engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=10000, help="100 instances each (default 10000 = 1M)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--no-scan", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the SQLite database (6 GB at a million "
                    "headers) and print where it is; by default it is removed")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgf-qbench-", dir=os.environ.get("DGF_BENCH_DIR")))
    report: dict[str, object] = {"patients": args.patients, "runs": args.runs}
    print("SQLite", file=sys.stderr)
    try:
        report["sqlite"] = bench_backend(f"sqlite:///{work / 'meta.db'}", "sqlite", args.patients, args.runs,
                                         not args.no_scan)
    finally:
        if args.keep:
            print(f"kept {work / 'meta.db'}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if not args.no_postgres:
        from tests.pg import PostgresServer

        pg = PostgresServer()
        try:
            print("PostgreSQL", file=sys.stderr)
            report["postgresql"] = bench_backend(pg.create_database("million"), "postgresql", args.patients,
                                                 args.runs, not args.no_scan)
            print("Gfarm-style per-file xpath() on 10,000 instances", file=sys.stderr)
            small = pg.create_database("tenk")
            e = SqlEngine(small)
            synthetic.load(e, synthetic.headers(100))
            e.close()
            report["gfarm_style_10k"] = gfarm_style(small, min(args.runs, 5))
        finally:
            pg.stop()
    save("query", report)


if __name__ == "__main__":
    main()
