"""Bulk transfers and removal, one tree's code against another's, alternated in one run
(issue 16): ``dgf_up -r``, ``dgf_down`` and ``dgf rm -r`` of the same small files.

    git worktree add /tmp/base HEAD~2
    .venv/bin/python bench/ab_bulk.py --base /tmp/base [--rounds 4] [--files 1000] [--dir /dev/shm]

Two local federations, one running ``--base``'s servers and one this tree's, each driven by its
own tree's client (the base code first on ``PYTHONPATH``; everything runs from a directory
holding no ``dgf/``, see ``bench/ab_upload.py``).  Each round, in alternating order, each side
uploads a fresh ``bench/synth.py`` small-file corpus (the one ``bench/per_file.py`` uses),
downloads it to disk and removes it with ``dgf rm -r``; the removal frees every object at both
sites.  Prints one JSON object: per side and step, the median wall seconds and CPU ms per file
(the client and every server process), and the sites' share of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, synth  # noqa: E402
from bench.ab_upload import _federation  # noqa: E402
from dgf import local  # noqa: E402

BIN = Path(sys.executable).parent
STEPS = ("up", "down", "rm -r")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="the other tree (a git worktree)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--dir", default=None, help="where the work directory goes (default: the system's temp)")
    args = ap.parse_args()
    base = args.base.resolve()
    if not (base / "dgf" / "transport.py").is_file():
        raise SystemExit(f"{base} is not a dgf tree (no dgf/transport.py).")
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-bulk-", dir=args.dir))
    home = os.getcwd()
    os.chdir(work)          # the clients run here: a directory holding no dgf/
    sides: dict[str, Path | None] = {"base": base, "this tree": None}
    feds = {side: _federation(work / ("base" if code else "this"), code) for side, code in sides.items()}
    n = args.files
    runs: dict[str, dict[str, list[tuple[float, float, float]]]] = {s: {t: [] for t in STEPS} for s in sides}
    try:
        k = 0
        for r in range(args.rounds):
            for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                fed, code = feds[side], sides[side]
                pids = local.pids(fed.root)
                sites = [pid for name, pid in pids.items() if name != "metaserver"]
                src = synth.small_corpus(work / f"src{k}", n, seed=900 + k)
                env = {"DGF_CONFIG": str(fed.config("clinician")), "PATH": "/usr/bin:/bin"}
                if code is not None:
                    env["PYTHONPATH"] = str(code)
                commands = {
                    "up": ["from dgf.cli import up_main; up_main()", str(src[0].parent), "--to", f"/b{k}", "-r"],
                    "down": ["from dgf.cli import down_main; down_main()", f"/b{k}", "-o", str(work / f"down{k}")],
                    "rm -r": ["from dgf.cli import main; main()", "rm", "-r", f"/b{k}"]}
                for step, command in commands.items():
                    before = sum(measure.cpu_of(p) for p in sites)
                    done = measure.run([sys.executable, "-c", *command], env, pids.values())
                    at_sites = sum(measure.cpu_of(p) for p in sites) - before
                    runs[side][step].append((done.wall, done.cpu / n * 1000, at_sites / n * 1000))
                left = [p for s in fed.sites for p in (fed.root / f"store-{s}" / "objects").rglob("*") if p.is_file()]
                if left:
                    raise SystemExit(f"{side}: rm -r left {len(left)} object(s) at the sites")
                shutil.rmtree(src[0].parent)
                shutil.rmtree(work / f"down{k}")
                k += 1
    finally:
        for fed in feds.values():
            local.down(fed.root, quiet=True)
        os.chdir(home)
        shutil.rmtree(work, ignore_errors=True)
    out: dict[str, object] = {"files": n, "rounds": args.rounds}
    for side, steps in runs.items():
        out[side] = {step: {"wall s": round(statistics.median(x[0] for x in xs), 2),
                            "CPU ms per file": round(statistics.median(x[1] for x in xs), 3),
                            "of it at the sites": round(statistics.median(x[2] for x in xs), 3)}
                     for step, xs in steps.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
