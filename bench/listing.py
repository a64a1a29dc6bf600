"""``ls -l`` of one directory of many files on ``dgf mount`` (issue 16: <= 50 ms for 1000
entries), optionally against another tree's mount in the same run.

    .venv/bin/python bench/listing.py [--files 1000] [--runs 5] [--base <worktree>]

A local federation per tree (its servers and its mount run that tree's code); ``--files`` small
files (``bench/synth.py``) uploaded into one directory; ``dgf mount`` as a researcher.  Per run,
a fresh mount (of this tree, and of ``--base``, alternated), then ``ls -l`` of the directory
three times:

- first: right after the mount, nothing cached by the kernel or the mount;
- warm: again at once (the kernel's cached attributes answer);
- expired: after the attribute TTL (the kernel asks again, the mount lists again).

Each is the wall time of the ``ls`` process, with its output checked (every file listed).  The
CPU of the mount and of the metaserver for the three listings together is read from ``/proc``
(10 ms ticks).  Prints one JSON object of
medians.  Needs FUSE (Debian ``fuse3``) and root or a user allowed to mount.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, synth  # noqa: E402
from bench.ab_upload import _federation  # noqa: E402
from dgf import local  # noqa: E402
from dgf.mountsource import ATTR_TTL  # noqa: E402

BIN = Path(sys.executable).parent
STEPS = ("first", "warm", "expired")


def _mount_pid(where: Path) -> int:
    """The process serving the mount at ``where`` (its command line names the mount point)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mount" in cmd and str(where).encode() in cmd:
                return int(proc.name)
    raise SystemExit(f"no process serves the mount at {where}")


def _ls(directory: Path, files: int) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(["ls", "-l", str(directory)], capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    if out.count("\n-r") != files:
        raise SystemExit(f"ls -l listed {out.count(chr(10) + '-r')} files of {files}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--base", type=Path, default=None, help="another tree (a git worktree) to mount alike")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-listing-"))
    os.chdir(work)          # the commands run here: a directory holding no dgf/
    sides: dict[str, Path | None] = {"this tree": None}
    if args.base is not None:
        sides = {"base": args.base.resolve(), **sides}
    runs: dict[str, dict[str, list[float]]] = {
        s: {k: [] for k in (*STEPS, "mount CPU ms", "metaserver CPU ms")} for s in sides}
    feds: dict[str, local.Federation] = {}
    try:
        src = synth.small_corpus(work / "src", args.files, seed=5)
        for side, code in sides.items():
            feds[side] = fed = _federation(work / f"fed-{len(feds)}", code)
            up = {**os.environ, "DGF_CONFIG": str(fed.config("clinician"))}
            if code is not None:
                up["PYTHONPATH"] = str(code)
            measure.run([str(BIN / "dgf_up"), str(src[0].parent), "--to", "/many", "-r"], up)
        for r in range(args.runs):
            for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                code = sides[side]
                mine = {**os.environ, "DGF_CONFIG": str(feds[side].config("researcher"))}
                if code is not None:
                    mine["PYTHONPATH"] = str(code)
                where = work / f"mnt{r}-{'base' if code else 'this'}"
                where.mkdir()
                subprocess.run([sys.executable, "-c", "from dgf.cli import main; main()", "mount", str(where)],
                               env=mine, check=True, capture_output=True)
                try:
                    pid, meta = _mount_pid(where), feds[side].pids["metaserver"]
                    cpu0, meta0 = measure.cpu_of(pid), measure.cpu_of(meta)
                    directory = where / "many"
                    runs[side]["first"].append(_ls(directory, args.files))
                    runs[side]["warm"].append(_ls(directory, args.files))
                    time.sleep(ATTR_TTL + 0.5)
                    runs[side]["expired"].append(_ls(directory, args.files))
                    runs[side]["mount CPU ms"].append((measure.cpu_of(pid) - cpu0) * 1000)
                    runs[side]["metaserver CPU ms"].append((measure.cpu_of(meta) - meta0) * 1000)
                finally:
                    subprocess.run(["fusermount3", "-u", "-z", str(where)], check=False)
    finally:
        for fed in feds.values():
            local.down(fed.root, quiet=True)
        os.chdir("/")
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"files": args.files, "runs": args.runs, **{
        side: {k: round(statistics.median(v) * (1 if k.endswith("ms") else 1000), 1) for k, v in steps.items()}
        for side, steps in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
