"""Large objects: upload and download rates of one multi-frame object, with peak memory.

    .venv/bin/python bench/large.py [--sizes 1,200,2048] [--runs 3]

Sizes in MiB.  Each run makes a fresh object (distinct content, so nothing is skipped as
already stored), uploads it with ``dgf_up`` and downloads it with ``dgf_down`` as separate
processes against a local federation on loopback; it reports the median rate per size, the
client's peak RSS (``wait4``) and each server's (VmHWM), and the CPU seconds of client and
servers.  Prints one JSON object.
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

from bench import measure, synth  # noqa: E402
from dgf import local  # noqa: E402

BIN = Path(sys.executable).parent
MiB = 1024 * 1024


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,200,2048")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("DGF_BENCH_TMP")) as tmp:
        fed = local.up(Path(tmp) / "fed")
        try:
            pids = local.pids(fed.root)
            conf = str(fed.config("clinician"))
            for mib in (int(s) for s in args.sizes.split(",")):
                ups, downs, rss_up, rss_down, cpu_up, cpu_down = [], [], [], [], [], []
                for run in range(args.runs):
                    src = synth.multiframe(Path(tmp) / f"obj{mib}_{run}.dcm", mib * MiB, seed=1000 * mib + run)
                    size = src.stat().st_size
                    up = measure.run([str(BIN / "dgf_up"), str(src), "--to", f"/large/{mib}/{run}",
                                      "--site", "site-a", "--config", conf], servers=pids.values())
                    wall, rss = up.wall, up.rss
                    ups.append(size / wall / 1e6)
                    rss_up.append(rss)
                    cpu_up.append(up.cpu)
                    src.unlink()
                    out = Path(tmp) / "out"
                    down = measure.run([str(BIN / "dgf_down"), f"/large/{mib}/{run}", "-o", str(out),
                                        "--config", conf], servers=pids.values())
                    wall, rss = down.wall, down.rss
                    downs.append(size / wall / 1e6)
                    rss_down.append(rss)
                    cpu_down.append(down.cpu)
                    shutil.rmtree(out)
                results[f"{mib} MiB"] = {
                    "upload MB/s": round(statistics.median(ups), 1),
                    "download MB/s": round(statistics.median(downs), 1),
                    "upload CPU s (client+servers)": round(statistics.median(cpu_up), 2),
                    "download CPU s (client+servers)": round(statistics.median(cpu_down), 2),
                    "client peak RSS MB (up, down)": [round(max(rss_up) / 1e6), round(max(rss_down) / 1e6)],
                }
            # The cost per byte, without a process start: one client uploads a 1 MiB and a
            # 200 MiB object in turn (the ratio shows any superlinear cost).
            from dgf.client import Client
            per_size: dict[int, list[float]] = {1: [], 200: []}
            with Client(conf) as c:
                for run in range(args.runs):
                    for mib in per_size:
                        src = synth.multiframe(Path(tmp) / f"inproc{mib}_{run}.dcm", mib * MiB,
                                               seed=7_000_000 + 1000 * mib + run)
                        t0 = time.perf_counter()
                        c.upload([src], to=f"/inproc/{mib}/{run}", site="site-a")
                        per_size[mib].append(src.stat().st_size / (time.perf_counter() - t0) / 1e6)
                        src.unlink()
            small, large = (statistics.median(per_size[m]) for m in (1, 200))
            results["in-process upload MB/s (1 MiB, 200 MiB, ratio)"] = [
                round(small, 1), round(large, 1), round(small / large, 2)]
            results["server peak RSS MB"] = {k: round(_status(p, "VmHWM") / 1e6) for k, p in pids.items()}
        finally:
            local.down(fed.root)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
