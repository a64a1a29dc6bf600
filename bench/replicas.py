"""Replicas: what a second copy costs, how a lost site is survived and repaired.

    .venv/bin/python bench/replicas.py [--files 300] [--large-mib 100] [--large 8] [--runs 3]

On a local federation of three sites (this machine, loopback):

- upload cost: ``dgf_up`` of ``--files`` small CT files into a directory that keeps one copy
  and, interleaved, into one that keeps two (fresh files each run); the median wall time and
  CPU seconds (client + every server) of each, and their ratio;
- a site killed for good: the first byte of files whose first copy (in read order) was on the
  dead site, read through a client session and through the mount that were open before the
  kill (each read notices the failure and goes to the other copy): median and worst seconds;
  then every file read back through ``dgf_down``;
- repair: ``dgf fsck --repair`` restores two copies of ``--large`` objects of ``--large-mib``
  MiB from the survivors, site to site; its copy rate.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, synth  # noqa: E402
from dgf import local  # noqa: E402
from dgf.client import Client  # noqa: E402

BIN = Path(sys.executable).parent
MiB = 1024 * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--large-mib", type=int, default=100)
    ap.add_argument("--large", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-replicas-"))
    fed = local.up(work / "fed", sites=("site-a", "site-b", "site-c"))
    results: dict[str, object] = {"files": args.files, "runs": args.runs}
    try:
        pids = list(local.pids(fed.root).values())
        admin = dict(os.environ, DGF_CONFIG=str(fed.config("admin")))
        clin = dict(os.environ, DGF_CONFIG=str(fed.config("clinician")))
        times: dict[str, list[tuple[float, float]]] = {"1": [], "2": [], "2a": []}
        for run in range(args.runs):
            for variant in ("1", "2", "2a"):          # 2a: two copies, replication mode async
                copies = variant[0]
                where = f"/cost{variant}/{run}"
                subprocess.run([str(BIN / "dgf"), "mkdir", "-p", where], env=admin, check=True)
                subprocess.run([str(BIN / "dgf"), "admin", "replicas", "set", where, copies], env=admin,
                               check=True, capture_output=True)
                subprocess.run([str(BIN / "dgf"), "admin", "replicas", "mode", "async" if variant == "2a" else "sync"],
                               env=admin, check=True, capture_output=True)
                src = synth.small_corpus(work / f"src{variant}_{run}", args.files, seed=1000 * run + len(variant) * 7
                                         + int(copies))
                up = measure.run([str(BIN / "dgf_up"), str(src[0].parent), "-r", "--to", where], clin, pids)
                times[variant].append((up.wall, up.cpu))
                shutil.rmtree(src[0].parent)
        subprocess.run([str(BIN / "dgf"), "admin", "replicas", "mode", "sync"], env=admin, check=True,
                       capture_output=True)
        one, two, two_a = (statistics.median(w for w, _ in times[v]) for v in ("1", "2", "2a"))
        results["upload s (1 copy, 2 copies, ratio)"] = [round(one, 2), round(two, 2), round(two / one, 2)]
        results["upload s, 2 copies async (s, ratio to 1 copy)"] = [round(two_a, 2), round(two_a / one, 2)]
        results["upload CPU ms per file (1 copy, 2 copies, 2 async without the background copies)"] = [
            round(statistics.median(c for _, c in times[v]) / args.files * 1000, 2) for v in ("1", "2", "2a")]

        # Large objects with two copies, then one site lost for good.
        big = work / "big"
        big.mkdir()
        for i in range(args.large):
            synth.multiframe(big / f"big{i}.dcm", args.large_mib * MiB, seed=50 + i)
        subprocess.run([str(BIN / "dgf_up"), str(big), "-r", "--to", "/large"], env=clin, check=True,
                       capture_output=True)
        shutil.rmtree(big)
        victim = local.pids(fed.root)["site-a"]
        mnt = work / "mnt"
        mnt.mkdir()
        subprocess.run([str(BIN / "dgf"), "mount", str(mnt)], env=clin, check=True, stdout=subprocess.DEVNULL)
        with Client(fed.config("clinician")) as c:
            resolved = c.resolve(["/cost2"])
            first_on_a = [f[0] for f in resolved["files"] if f[3][0] == "site-a"][:40]
            os.listdir(mnt / "cost2" / "0")                       # the mount has resolved its entries
            os.kill(victim, signal.SIGKILL)
            time.sleep(0.5)
            session, mounted = [], []
            for path in first_on_a[: len(first_on_a) // 2]:
                t0 = time.perf_counter()
                c.read_file(path)
                session.append(time.perf_counter() - t0)
            for path in first_on_a[len(first_on_a) // 2:]:
                t0 = time.perf_counter()
                with open(mnt / path.lstrip("/"), "rb") as fh:
                    fh.read(4096)
                mounted.append(time.perf_counter() - t0)
        subprocess.run([str(BIN / "dgf"), "umount", str(mnt)], check=False)
        results["first byte after losing site-a, s (median, worst; files)"] = {
            "client session": [round(statistics.median(session), 3), round(max(session), 3), len(session)],
            "mount": [round(statistics.median(mounted), 3), round(max(mounted), 3), len(mounted)]}
        t0 = time.perf_counter()
        out = subprocess.run([str(BIN / "dgf_down"), "/cost2", "/large", "-o", str(work / "out")], env=clin,
                             capture_output=True, text=True)
        results["read after losing site-a: files, failed, s"] = [
            sum(1 for _ in (work / "out").rglob("*.dcm")), out.returncode, round(time.perf_counter() - t0, 2)]
        shutil.rmtree(work / "out", ignore_errors=True)
        living = [p for p in pids if p != victim]
        repair = measure.run([str(BIN / "dgf"), "fsck", "/large", "--repair"], admin, living, ok=(0, 6))
        wall, cpu, report = repair.wall, repair.cpu, repair.stdout
        made = next((int(line.split()[0]) for line in report.splitlines() if "copies made site to site" in line), 0)
        copied = made * (args.large_mib * MiB + 4096)
        results["repair (fsck --repair /large)"] = {
            "objects": args.large, "MiB each": args.large_mib, "copies made": made,
            "wall s (whole command)": round(wall, 2),
            "MB/s site to site (whole command)": round(copied / wall / 1e6, 1), "CPU s": round(cpu, 2),
            "summary": report.strip().splitlines()[-1]}
    finally:
        local.down(fed.root, quiet=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
