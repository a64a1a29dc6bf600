"""Federation benchmark: ingest and download of two corpora, dgf against Orthanc in the same run.

Corpora (bench/synth.py): (a) small instances from pydicom's CT_small / MR_small headers with new
UIDs and varied patients; (b) ~0.5 MB CT instances (512x512 16-bit pixel data under a real CT
header).  dgf: a fresh local federation per run (metaserver + two sites on loopback), the Python
client in this process, de-identification, XML, identity and transfer included.  Orthanc (Debian
package, when installed): REST POST /instances one file at a time with one keep-alive client, then
GET /instances/{id}/file, the way the issue's peer figures were taken.

    python bench/federation.py [--small 1000] [--ct 1000] [--runs 3] [--no-orthanc]

Prints a Markdown table and writes bench/out/federation.json.  No identifying value appears in
either file: the corpora are synthetic and only counts and timings are recorded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import synth  # noqa: E402
from dgf import local  # noqa: E402
from dgf.client import Client  # noqa: E402

OUT = ROOT / "bench" / "out"


def corpus(kind: str, n: int) -> list[Path]:
    d = OUT / f"corpus-{kind}-{n}"
    if d.exists() and len(list(d.glob("*.dcm"))) == n:
        return sorted(d.glob("*.dcm"))
    shutil.rmtree(d, ignore_errors=True)
    print(f"generating {n} {kind} instances ...", file=sys.stderr)
    return synth.small_corpus(d, n, patients=100) if kind == "small" else synth.ct_corpus(d, n, patients=20)


def _size(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def dgf_run(files: list[Path], tmp: Path) -> tuple[float, float, float]:
    """(ingest, download into memory, download to disk) seconds on a fresh federation.

    Into memory is what the Orthanc figure measures (REST GET, body read, nothing written);
    to disk is ``dgf_down``: every file written to a temp name and renamed."""
    fed = local.up(tmp / "fed")
    try:
        with Client(fed.config("clinician")) as c:
            t0 = time.perf_counter()
            report = c.upload(files)
            ingest = time.perf_counter() - t0
            assert report.uploaded == len(files) and not report.failed, report.failed[:3]
        with Client(fed.config("researcher")) as c:
            got = []
            t0 = time.perf_counter()
            mem = c.fetch(["/"], lambda path, data: got.append(len(data)))
            memory = time.perf_counter() - t0
            assert mem.downloaded == len(files) == len(got), mem.failed[:3]
            t0 = time.perf_counter()
            down = c.download(["/"], tmp / "down")
            disk = time.perf_counter() - t0
            assert down.downloaded == len(files), down.failed[:3]
    finally:
        local.down(fed.root)
        shutil.rmtree(tmp, ignore_errors=True)
    return ingest, memory, disk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_run(files: list[Path], tmp: Path) -> tuple[float, float, float | None]:
    exe = shutil.which("Orthanc")
    if exe is None:
        raise FileNotFoundError("Orthanc")
    tmp.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cfg = tmp / "orthanc.json"
    cfg.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
        "HttpPort": port, "DicomPort": _free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [], "HttpServerEnabled": True,
        "DicomServerEnabled": False}))
    proc = subprocess.Popen([exe, str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/system")
                conn.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        ids = []
        t0 = time.perf_counter()
        for f in files:
            conn.request("POST", "/instances", body=f.read_bytes(),
                         headers={"Content-Type": "application/dicom"})
            resp = conn.getresponse()
            ids.append(json.loads(resp.read())["ID"])
        ingest = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in ids:
            conn.request("GET", f"/instances/{i}/file")
            data = conn.getresponse().read()
            assert data[128:132] == b"DICM"
        download = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    return ingest, download, None


def measure(name: str, run: Callable[[list[Path], Path], tuple[float, float, float | None]],
            files: list[Path], runs: int) -> dict[str, Any]:
    ingest, memory, disk = [], [], []
    for i in range(runs):
        a, b, c = run(files, Path(tempfile.mkdtemp(prefix="dgf-bench-")))
        ingest.append(a)
        memory.append(b)
        if c is not None:
            disk.append(c)
        print(f"  {name} run {i + 1}: ingest {a:.2f} s, download {b:.2f} s"
              + (f", to disk {c:.2f} s" if c is not None else ""), file=sys.stderr)
    size = _size(files)
    mi, mm = statistics.median(ingest), statistics.median(memory)
    row: dict[str, object] = {
        "system": name, "files": len(files), "bytes": size, "ingest_s": ingest, "download_s": memory,
        "ingest_files_s": len(files) / mi, "ingest_MB_s": size / mi / 1e6,
        "download_files_s": len(files) / mm, "download_MB_s": size / mm / 1e6}
    if disk:
        md = statistics.median(disk)
        row.update({"disk_s": disk, "disk_files_s": len(files) / md, "disk_MB_s": size / md / 1e6})
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--ct", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-orthanc", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, n in (("small", args.small), ("ct", args.ct)):
        if n <= 0:
            continue
        files = corpus(kind, n)
        print(f"corpus {kind}: {n} files, {_size(files) / 1e6:.0f} MB", file=sys.stderr)
        rows.append({"corpus": kind, **measure("dgf", dgf_run, files, args.runs)})
        if not args.no_orthanc and shutil.which("Orthanc"):
            rows.append({"corpus": kind, **measure("orthanc", orthanc_run, files, args.runs)})
    machine = f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}"
    (OUT / "federation.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"\nmachine: {machine}; medians of {args.runs}\n")
    print("| corpus | system | files | MB | ingest files/s | ingest MB/s | download files/s | "
          "download MB/s | to disk files/s | to disk MB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        disk = (f"{r['disk_files_s']:.0f} | {r['disk_MB_s']:.1f}" if "disk_s" in r else "- | -")
        print(f"| {r['corpus']} | {r['system']} | {r['files']} | {r['bytes'] / 1e6:.0f} | "
              f"{r['ingest_files_s']:.0f} | {r['ingest_MB_s']:.1f} | {r['download_files_s']:.0f} | "
              f"{r['download_MB_s']:.1f} | {disk} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
