"""A series stored one file a commit, as a copy into the mount or one instance per STOW-RS
request store it: index rows and metaserver CPU per file, this tree's servers against another
tree's, alternated in one run (issue 16: per-file cost).

    git worktree add /tmp/base HEAD~1
    .venv/bin/python bench/one_by_one.py --base /tmp/base [--files 200] [--series 4] [--rounds 3]

Two local federations, one running ``--base``'s servers and one this tree's; round by round, in
alternating order, ``Client.upload`` of one file at a time into each, ``--series`` series of
CT_small's header (each file its own SOP Instance UID, instance number, position and slice
location; the content time moves on by a second every seventh file).  The client is this
tree's, in this process.  Prints one JSON object: per side, the median metaserver CPU ms and
wall ms per file and the index rows per file (own, shared and membership rows) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure  # noqa: E402
from bench.ab_upload import _federation, _rows_per_file  # noqa: E402
from dgf import local  # noqa: E402
from dgf.client import Client  # noqa: E402


def _corpus(out: Path, files: int, series: int, round_: int) -> list[Path]:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(str(get_testdata_file("CT_small.dcm", download=False)))
    out.mkdir(parents=True)
    uids = [generate_uid() for _ in range(series)]
    paths = []
    for i in range(files):
        ds = base.copy()
        ds.PatientID = f"ONE{round_}-{i % series}"
        ds.StudyInstanceUID = uids[i % series][:62] + ".1"
        ds.SeriesInstanceUID = uids[i % series]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        n = i // series
        ds.InstanceNumber = n + 1
        ds.SliceLocation = -100.0 + n
        ds.ImagePositionPatient = [-150.0, -150.0, -100.0 + n]
        ds.ContentTime = f"1015{n // 7:02d}"
        path = out / f"{i:05d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="the other tree (a git worktree)")
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the work directory goes (default: the system's temp)")
    args = ap.parse_args()
    base = args.base.resolve()
    if not (base / "metaserver" / "sqlindex.py").is_file():
        raise SystemExit(f"{base} is not a dgf tree (no metaserver/sqlindex.py).")
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-one-", dir=args.dir))
    os.chdir(work)      # servers start here: ``python -m`` puts the working directory first on the path
    feds = {"base": _federation(work / "base", base), "this tree": _federation(work / "this", None)}
    cpu: dict[str, list[float]] = {k: [] for k in feds}
    wall: dict[str, list[float]] = {k: [] for k in feds}
    try:
        for r in range(args.rounds):
            for side in (("base", "this tree") if r % 2 == 0 else ("this tree", "base")):
                fed = feds[side]
                paths = _corpus(work / f"src-{side.replace(' ', '-')}-{r}", args.files, args.series, r)
                meta = local.pids(fed.root)["metaserver"]
                with Client(str(fed.config("clinician"))) as client:
                    before, t0 = measure.cpu_of(meta), time.perf_counter()
                    for p in paths:
                        report = client.upload([p])
                        if report.failed:
                            raise SystemExit(f"{side}: {report.failed[0].item}: {report.failed[0].reason}")
                    wall[side].append((time.perf_counter() - t0) * 1000 / len(paths))
                    cpu[side].append((measure.cpu_of(meta) - before) * 1000 / len(paths))
        print(json.dumps({
            "files a round": args.files, "series": args.series, "rounds": args.rounds,
            **{side: {"metaserver CPU ms per file": round(statistics.median(cpu[side]), 2),
                      "wall ms per file": round(statistics.median(wall[side]), 2),
                      "every round's metaserver CPU ms per file": [round(c, 2) for c in cpu[side]],
                      "index rows per file": _rows_per_file(feds[side].root, ("hvalues", "hshared", "hmembers"))}
               for side in feds},
        }, indent=1))
    finally:
        for fed in feds.values():
            local.down(fed.root)
        os.chdir("/")
        shutil.rmtree(work, ignore_errors=True)     # ~200 MB of sources and databases, often on tmpfs


if __name__ == "__main__":
    main()
