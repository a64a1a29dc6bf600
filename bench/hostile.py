"""Hostile-client figures for bench/RESULTS.md: parked cursors survived, peak server memory
under oversized requests, and how long a hung (SIGSTOPped) site takes to fail a download and a
mount read with the default client timeout.

    .venv/bin/python bench/hostile.py [--cursors 200] [--headers 20000]

Runs a local federation with default limits in a temporary directory; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgf import errors, local  # noqa: E402
from dgf.client import Client  # noqa: E402
from metaserver.engine import NewFile  # noqa: E402
from metaserver.sql import SqlEngine  # noqa: E402

BIN = Path(sys.executable).parent


def _header(i: int) -> bytes:
    return (f'<DicomHeader><PatientID tag="00100020" vr="LO">P{i % 100}</PatientID>'
            f'<Modality tag="00080060" vr="CS">{"CT" if i % 2 else "MR"}</Modality></DicomHeader>').encode()


def _rss(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _login_and_query(fed: local.Federation) -> float:
    t0 = time.perf_counter()
    with Client(fed.config("clinician")) as c:
        c.find_count("/DicomHeader[Modality='CT']", "/load/0")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cursors", type=int, default=200)
    ap.add_argument("--headers", type=int, default=20000)
    args = ap.parse_args()
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fed = local.up(Path(tmp) / "fed")
        try:
            pids = local.pids(fed.root)
            engine = SqlEngine(f"sqlite:///{fed.root / 'metadata.db'}")
            engine.create_files([NewFile(f"/load/{i // 1000}/{i:06d}.dcm", f"{i:064x}", 1, "site-a",
                                         {"user.dgf.dicom": _header(i)}) for i in range(args.headers)])
            engine.close()
            base = [_login_and_query(fed) for _ in range(5)]
            # Parked cursors: scans over every header, each abandoned after its first page.
            with Client(fed.config("researcher")) as r:
                for _ in range(args.cursors):
                    r.meta.call("find", xpath="/DicomHeader[PatientID]", root="/load")
                after = [_login_and_query(fed) for _ in range(5)]
            out["parked_cursors"] = args.cursors
            out["login_and_query_s_before_median"] = round(statistics.median(base), 3)
            out["login_and_query_s_after_median"] = round(statistics.median(after), 3)
            # Oversized requests, each refused by its limit; then the servers' peak memory.
            with Client(fed.config("researcher")) as r:
                refused = 0
                for attempt in (lambda: r.meta.call("ns.stat", path="/" + "x" * (16 << 20)),
                                lambda: r.meta.call("down.resolve", paths=["/"] * 20_000),
                                lambda: r.find("(" * 5000 + "1" + ")" * 5000),
                                lambda: r.find("/DicomHeader[" + " or ".join(f"PatientID='{i}'" for i in range(8000)) + "]")):
                    for _ in range(4):
                        try:
                            attempt()
                        except errors.DgfError:
                            refused += 1
            with Client(fed.config("researcher")) as r:
                _, body = r.meta.call("down.resolve", paths=["/"] * 3000)
            out["oversized_requests_refused"] = refused
            out["resolve_of_slash_x3000_reply_bytes"] = len(body)
            out["peak_rss_mb"] = {k: round(_rss(p) / 2**20, 1) for k, p in pids.items()}
            # A hung site, default client timeout (30 s).
            import pydicom.data
            src = pydicom.data.get_testdata_file("CT_small.dcm", download=False)
            if not isinstance(src, str):
                raise SystemExit("pydicom's test file CT_small.dcm is missing.")
            with Client(fed.config("clinician")) as c:
                c.upload([src], to="/hung", site="site-b")
                path = c.ls("/hung")[0].path
            mnt = Path(tmp) / "mnt"
            mnt.mkdir()
            env = dict(os.environ, DGF_CONFIG=str(fed.config("researcher")))
            subprocess.run([str(BIN / "dgf"), "mount", str(mnt)], check=True, env=env, capture_output=True)
            os.kill(pids["site-b"], signal.SIGSTOP)
            try:
                with Client(fed.config("researcher")) as r:
                    t0 = time.perf_counter()
                    report = r.download([path], Path(tmp) / "out")
                    out["hung_site_download_fails_after_s"] = round(time.perf_counter() - t0, 1)
                    out["hung_site_download_reason"] = report.failed[0].reason if report.failed else "(succeeded)"
                t0 = time.perf_counter()
                done = subprocess.run(["cat", str(mnt / path.lstrip("/"))], capture_output=True)
                out["hung_site_mount_read_fails_after_s"] = round(time.perf_counter() - t0, 1)
                out["hung_site_mount_read_error"] = done.stderr.decode().strip()
            finally:
                os.kill(pids["site-b"], signal.SIGCONT)
                subprocess.run([str(BIN / "dgf"), "umount", "--lazy", str(mnt)], capture_output=True)
        finally:
            local.down(fed.root, quiet=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
