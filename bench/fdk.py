"""FDK benchmark: dgf's numpy FDK (one node, and split over two "sites") against RTK's CPU FDK.

Case (issue 5): a 256^3 volume from 360 projections of 256x256, circular full scan, SID 500 mm,
SDD 800 mm, 0.75 mm voxels, projections of the analytic 3D Shepp-Logan phantom (exact ellipsoid
line integrals, radius 80 mm).  Each method runs in its own process, so its peak memory is that
process's maximum RSS (wait4); "split" runs two processes at once, each back-projecting half the
projections as a site would, and sums their partial volumes; "federation" is the real path
(projections imported as DICOM into a local federation, ``Client.recon`` over both sites, peak
memory of the busiest I/O server).  RTK (PyPI itk-rtk, a benchmark-only
dependency) reconstructs the same projections with its Ram-Lak filter; it is warmed up first
(loading ITK's wrappers takes seconds).  Error: RMSE against the voxelised phantom over the 9
central planes across the rotation axis.

    python bench/fdk.py [--size 256] [--projections 360] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
RADIUS = 80.0  # phantom radius, mm

import numpy as np  # noqa: E402

from ioserver.recon import circular, partial_fdk, phantom  # noqa: E402
from ioserver.recon.geometry import Geometry  # noqa: E402


def geometry(size: int, n: int) -> Geometry:
    voxel = 192.0 / size
    return circular(n, 500.0, 800.0, (size, size), (1.2 * 256 / size, 1.2 * 256 / size),
                    (size, size, size), (voxel, voxel, voxel))


def run_method(method: str, size: int, n: int, part: int = 0) -> None:
    """Child process: reconstruct and save the volume; print the seconds it took."""
    g = geometry(size, n)
    if method == "project":
        np.save(OUT / f"fdk-proj-{size}-{n}.npy", phantom.project(g, RADIUS))
        print(json.dumps({"seconds": 0.0}))
        return
    # Memory-mapped: a site process touches (and so holds) only the projections it reads.
    proj = np.load(OUT / f"fdk-proj-{size}-{n}.npy", mmap_mode="r")
    if method == "rtk":
        import itk
        from itk import RTK as rtk

        image_type = itk.Image[itk.F, 3]

        def rtk_fdk(p: np.ndarray) -> np.ndarray:
            geo = rtk.ThreeDCircularProjectionGeometry.New()
            for a in g.angles:
                geo.AddProjection(g.sid, g.sdd, math.degrees(a), 0.0, 0.0)
            image = itk.image_from_array(np.ascontiguousarray(p))
            nu, nv = g.detector_shape
            du, dv = g.pixel_size
            image.SetSpacing([du, dv, 1.0])
            image.SetOrigin([-(nu - 1) / 2 * du, -(nv - 1) / 2 * dv, 0.0])
            const = rtk.ConstantImageSource[image_type].New()
            const.SetSize(list(g.volume_shape))
            const.SetSpacing(list(g.voxel_size))
            const.SetOrigin(list(g.origin))
            f = rtk.FDKConeBeamReconstructionFilter[image_type].New()
            f.SetInput(0, const.GetOutput())
            f.SetInput(1, image)
            f.SetGeometry(geo)
            f.Update()
            return np.asarray(itk.array_from_image(f.GetOutput()))

        rtk_fdk(proj[:8] * 0)  # warm-up: ITK loads its wrappers lazily
        t0 = time.perf_counter()
        vol = rtk_fdk(proj)
    else:
        # A split site holds a contiguous arc (acquisition order), sliced from the map without a copy.
        idx = list(range(n)) if method == "ours" else list(range(part * n // 2, (part + 1) * n // 2))
        if method == "split":
            import ioserver.recon.backproject as bp

            bp.THREADS = 1  # two such processes share the two cores, as two sites would
        t0 = time.perf_counter()
        vol = partial_fdk(proj[idx[0]:idx[-1] + 1], g, idx)
    seconds = time.perf_counter() - t0
    np.save(OUT / f"fdk-vol-{method}{part}.npy", vol)
    print(json.dumps({"seconds": seconds}))


def federation_run(size: int, n: int, tmp: Path) -> tuple[float, float, np.ndarray]:
    """The real near-data path: the projections imported as a DICOM series into a local
    federation (both sites), then ``Client.recon``: DICOM decode and back-projection on each
    site, partial volumes over SSH, the sum stored as a CT series.  Returns (seconds, peak RSS
    of the busiest site in MiB, volume)."""
    from dgf import local
    from dgf.client import Client

    g = geometry(size, n)
    proj = np.load(OUT / f"fdk-proj-{size}-{n}.npy", mmap_mode="r")
    fed = local.up(tmp / "fed")
    try:
        with Client(fed.config("clinician")) as c:
            c.recon_import(np.asarray(proj), g, "/bench/scan")
            t0 = time.perf_counter()
            result = c.recon("/bench/scan", "/bench/fdk", window="ram-lak")
            seconds = time.perf_counter() - t0
        peaks = []
        for site in fed.sites:
            status = Path(f"/proc/{fed.pids[site]}/status").read_text()
            peaks.append(int(status.split("VmHWM:")[1].split()[0]) / 1024)
    finally:
        local.down(fed.root)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return seconds, max(peaks), result.volume


def spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


def reap(proc: subprocess.Popen[str]) -> tuple[float, float]:
    """(seconds reported by the child, its peak RSS in MiB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {proc.args!r} failed")
    return json.loads(out.strip().splitlines()[-1])["seconds"], usage.ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--projections", type=int, default=360)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    size, n = args.size, args.projections
    if args.run:
        run_method(args.run, size, n, args.part)
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    # This process stays small until the children are done: a forked child's peak RSS counts
    # the parent's pages until it execs, so big arrays here would inflate every measurement.
    if not (OUT / f"fdk-proj-{size}-{n}.npy").exists():
        print("projecting the analytic phantom ...", file=sys.stderr)
        reap(spawn(["--run", "project", "--size", str(size), "--projections", str(n)]))
    planes = slice(size // 2 - 4, size // 2 + 5)
    results: dict[str, dict[str, Any]] = {}
    # The federation method runs in this process, so it goes last: its memory would otherwise be
    # counted in the children forked after it.
    for method in ("ours", "split", "rtk", "federation"):
        times, mems = [], []
        for r in range(args.runs):
            if method == "federation":
                import tempfile

                seconds, mem, vol = federation_run(size, n, Path(tempfile.mkdtemp(prefix="dgf-fdk-")))
                np.save(OUT / "fdk-vol-federation0.npy", vol)
                del vol
            elif method == "split":
                children = [spawn(["--run", "split", "--part", str(p), "--size", str(size),
                                   "--projections", str(n)]) for p in (0, 1)]
                reaped = [reap(c) for c in children]
                # Both halves run at once, as two sites would: the slower one is the wall time.
                seconds = max(s for s, _ in reaped)
                mem = max(m for _, m in reaped)
            else:
                seconds, mem = reap(spawn(["--run", method, "--size", str(size), "--projections", str(n)]))
            times.append(seconds)
            mems.append(mem)
            print(f"  {method} run {r + 1}: {seconds:.1f} s, peak {mem:.0f} MiB", file=sys.stderr)
        med = statistics.median(times)
        results[method] = {"seconds": times, "median_s": med, "peak_MiB": max(mems),
                           "voxel_updates_per_s": size ** 3 * n / med}
    np.save(OUT / "fdk-vol-split.npy", np.load(OUT / "fdk-vol-split0.npy") + np.load(OUT / "fdk-vol-split1.npy"))
    ref = phantom.voxelize(geometry(size, n), RADIUS)
    for method in results:
        vol = np.load(OUT / f"fdk-vol-{method}{'' if method == 'split' else 0}.npy")
        results[method]["rmse"] = float(np.sqrt(np.mean((vol[:, planes, :] - ref[:, planes, :]) ** 2)))
    ours = np.load(OUT / "fdk-vol-ours0.npy")
    split = np.load(OUT / "fdk-vol-split.npy")
    results["split"]["max_abs_diff_vs_single"] = float(np.abs(split - ours).max())
    fed = np.load(OUT / "fdk-vol-federation0.npy")
    results["federation"]["max_abs_diff_vs_single"] = float(np.abs(fed - ours).max())
    volume_mib = size ** 3 * 4 / 2 ** 20
    (OUT / "fdk.json").write_text(json.dumps({"case": f"{size}^3 from {n} x {size}^2", "results": results,
                                              "volume_MiB": volume_mib}, indent=1))
    print(f"\ncase {size}^3 volume ({volume_mib:.0f} MiB float32) from {n} projections of {size}x{size}; "
          f"medians of {args.runs}\n")
    print("| method | wall s | voxel updates/s | peak MiB | RMSE vs phantom |")
    print("|---|---|---|---|---|")
    for m, row in results.items():
        print(f"| {m} | {row['median_s']:.1f} | {row['voxel_updates_per_s'] / 1e6:.0f} M | {row['peak_MiB']:.0f} | "
              f"{row['rmse']:.4f} |")
    print(f"\ntime ratio ours/RTK {results['ours']['median_s'] / results['rtk']['median_s']:.2f}, "
          f"error ratio {results['ours']['rmse'] / results['rtk']['rmse']:.3f}; max |diff| vs single node: "
          f"split {results['split']['max_abs_diff_vs_single']:.2e}, federation "
          f"{results['federation']['max_abs_diff_vs_single']:.2e} (its projections are 16-bit DICOM)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
