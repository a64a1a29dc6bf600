"""Sealed objects (untrusted sites) against plain ones: what sealing costs to write and read.

    .venv/bin/python bench/sealed.py [--files 300] [--large-mib 64] [--large 4] [--runs 3]

On a local federation of two sites (this machine, loopback), site-b marked untrusted, each
run interleaves, into directories that keep one copy:

- ``dgf_up`` of ``--files`` small CT files (fresh ones each time) to site-a (plain) and to
  site-b (sealed by the client under the study's key, the header checked by the metaserver);
- ``dgf_up`` of ``--large`` multi-frame objects of ``--large-mib`` MiB, the same way;
- ``dgf_down`` of each of those directories to disk (sealed ones unsealed as they arrive).

Reports the median wall seconds and CPU seconds (the command plus every server process) of
each, per file for the small ones, and the sealed/plain ratios.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, synth  # noqa: E402
from dgf import local  # noqa: E402

BIN = Path(sys.executable).parent
MiB = 1024 * 1024
SITES = {"plain": "site-a", "sealed": "site-b"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--large-mib", type=int, default=64)
    ap.add_argument("--large", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-sealed-"))
    fed = local.up(work / "fed")
    times: dict[str, list[tuple[float, float]]] = {}
    try:
        pids = list(local.pids(fed.root).values())
        admin = dict(os.environ, DGF_CONFIG=str(fed.config("admin")))
        clin = dict(os.environ, DGF_CONFIG=str(fed.config("clinician")))
        subprocess.run([str(BIN / "dgf"), "admin", "site", "trust", SITES["sealed"], "--untrusted"], env=admin,
                       check=True, capture_output=True)
        for run in range(args.runs):
            for kind, site in SITES.items():
                for what in ("small", "large"):
                    where = f"/{kind}-{what}/{run}"
                    subprocess.run([str(BIN / "dgf"), "mkdir", "-p", where], env=admin, check=True)
                    subprocess.run([str(BIN / "dgf"), "admin", "replicas", "set", where, "1"], env=admin,
                                   check=True, capture_output=True)
                    if what == "small":
                        src = synth.small_corpus(work / f"src-{kind}-{run}", args.files, seed=1000 * run + len(kind))
                        folder = src[0].parent
                    else:
                        # Fresh instances each run: the same bytes would be found stored already.
                        folder = work / f"big-{kind}-{run}"
                        folder.mkdir()
                        for i in range(args.large):
                            synth.multiframe(folder / f"big{i}.dcm", args.large_mib * MiB, seed=100 * run + 10 * i
                                             + len(kind))
                    up = measure.run([str(BIN / "dgf_up"), str(folder), "-r", "--to", where, "--site", site],
                                     clin, pids)
                    times.setdefault(f"up {what} {kind}", []).append((up.wall, up.cpu))
                    shutil.rmtree(folder)
                    out = work / "out"
                    down = measure.run([str(BIN / "dgf_down"), where, "-o", str(out)], clin, pids)
                    times.setdefault(f"down {what} {kind}", []).append((down.wall, down.cpu))
                    shutil.rmtree(out)
    finally:
        local.down(fed.root, quiet=True)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    results: dict[str, object] = {"files": args.files, "large": [args.large, args.large_mib], "runs": args.runs}
    for op in ("up", "down"):
        for what in ("small", "large"):
            plain, sealed = med[f"{op} {what} plain"], med[f"{op} {what} sealed"]
            n = args.files if what == "small" else args.large
            results[f"{op} {what}: wall s plain, sealed, ratio"] = [round(plain[0], 2), round(sealed[0], 2),
                                                                    round(sealed[0] / plain[0], 2)]
            results[f"{op} {what}: CPU ms per file plain, sealed, ratio"] = [
                round(plain[1] / n * 1000, 2), round(sealed[1] / n * 1000, 2), round(sealed[1] / plain[1], 2)]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
