"""C-STORE into dgf and into Orthanc, same run: what a modality sees, and what it costs.

    .venv/bin/python bench/dimse.py [--files 1000] [--runs 3]

Each run sends ``--files`` fresh small CT files (39 KB) with dcmtk's ``storescu``, one
association, first into ``dgf dicom serve`` on a local federation, then into Orthanc (the Debian
package, its own DICOM port, storage on disk, SQLite index), interleaved:

- **acknowledged**: wall seconds until storescu exits, i.e. every C-STORE answered Success
  (dgf: spooled and fsynced; Orthanc: stored and indexed);
- **in the archive** (dgf only): until the gateway's spool is empty, every instance
  de-identified, stored on a site and published;
- CPU seconds of storescu and every server process (dgf: gateway, metaserver, sites; Orthanc
  itself) from the first C-STORE until the archive holds everything, per file.

Prints one JSON object.
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

from bench import measure, orthanc, synth  # noqa: E402
from dgf import local  # noqa: E402

BIN = Path(sys.executable).parent


def _wait_echo(aet: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while subprocess.run(["echoscu", "-aet", "BENCH", "-aec", aet, "127.0.0.1", str(port)],
                         capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{aet} did not start")
        time.sleep(0.2)


def _store(aet: str, port: int, files: list[str], env: dict[str, str]) -> measure.Run:
    """storescu of ``files`` into ``aet``, one association."""
    try:
        return measure.run(["storescu", "-aet", "BENCH", "-aec", aet, "127.0.0.1", str(port), *files], env, [])
    except SystemExit as exc:
        raise SystemExit(f"into {aet}: {exc}") from None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-dimse-"))
    # dcmtk (storescu, and Orthanc, built on it) leaves Nagle's algorithm on unless told: with it,
    # each instance waits out the peer's delayed ACK (40 ms here); both sides run without it.
    nodelay = dict(os.environ, TCP_NODELAY="1")
    peer = orthanc.start(work, env=nodelay, DicomAet="ORTHANC")
    orthanc_port = peer.dicom_port
    fed = local.up(work / "fed")
    dgf_port = orthanc.free_port()
    conf = fed.root / "bench-dicom.conf"
    conf.write_text(f"[dicom]\nae_title = DGF\nlisten = 127.0.0.1:{dgf_port}\nspool = bench-spool\n"
                    "callers = BENCH=clinician.conf\n")
    gateway_log = open(work / "gateway.log", "wb")
    gateway = subprocess.Popen([str(BIN / "dgf"), "dicom", "serve", "--config", str(conf)],
                               stdout=gateway_log, stderr=gateway_log)
    results: dict[str, object] = {"files": args.files, "runs": args.runs}
    times: dict[str, list[float]] = {k: [] for k in ("dgf ack", "dgf archived", "dgf cpu", "orthanc ack",
                                                     "orthanc cpu")}
    try:
        _wait_echo("DGF", dgf_port, gateway)
        _wait_echo("ORTHANC", orthanc_port, peer.proc)
        servers = list(local.pids(fed.root).values())
        spool = fed.root / "bench-spool" / "incoming"
        for run in range(args.runs):
            src = synth.small_corpus(work / f"src{run}", args.files, seed=500 + run)
            files = [str(p) for p in src]
            before = sum(measure.cpu_of(p) for p in [*servers, gateway.pid])
            t0 = time.perf_counter()
            sent = _store("DGF", dgf_port, files, nodelay)
            ack = time.perf_counter() - t0
            while any(spool.glob("*/*.dcm")):
                time.sleep(0.02)
            archived = time.perf_counter() - t0
            cpu = sent.cpu + sum(measure.cpu_of(p) for p in [*servers, gateway.pid]) - before
            times["dgf ack"].append(ack)
            times["dgf archived"].append(archived)
            times["dgf cpu"].append(cpu)
            before = measure.cpu_of(peer.pid)
            o = _store("ORTHANC", orthanc_port, files, nodelay)
            times["orthanc ack"].append(o.wall)
            times["orthanc cpu"].append(o.cpu + measure.cpu_of(peer.pid) - before)
            shutil.rmtree(src[0].parent)
        med = {k: statistics.median(v) for k, v in times.items()}
        n = args.files
        results["files/s acknowledged: dgf, Orthanc, ratio"] = [
            round(n / med["dgf ack"]), round(n / med["orthanc ack"]), round(med["orthanc ack"] / med["dgf ack"], 2)]
        results["files/s into the archive (de-identified, published): dgf"] = round(n / med["dgf archived"])
        results["CPU ms per file, everything: dgf, Orthanc"] = [round(med["dgf cpu"] / n * 1000, 2),
                                                                round(med["orthanc cpu"] / n * 1000, 2)]
        results["seconds (median): " + ", ".join(med)] = [round(v, 2) for v in med.values()]
    except BaseException:
        print((work / "gateway.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        measure.stop(gateway, peer.proc)
        local.down(fed.root, quiet=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
