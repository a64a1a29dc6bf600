"""A large header in the Native DICOM Model: ``dgf xattr get --as native`` against dcmtk's
``dcm2xml --native-format`` on the same RT Structure Set, in the same run.

    .venv/bin/python bench/native.py [--runs 5]

dgf reads the stored XML header from the metaserver and converts it (dgf/dicom/native.py);
dcmtk parses the DICOM file itself.  Both are whole commands (process start included), timed
with their CPU seconds and peak RSS.  Prints one JSON object.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if shutil.which("dcm2xml") is None:
        raise SystemExit("dcm2xml is missing: install the Debian package dcmtk.")
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-native-"))
    fed = local.up(work / "fed")
    try:
        env = dict(os.environ, DGF_CONFIG=str(fed.config("clinician")))
        rt = synth.rtstruct(work / "rt.dcm")
        subprocess.run([str(BIN / "dgf_up"), str(rt), "--to", "/bench-native"], check=True, env=env,
                       capture_output=True)
        path = subprocess.run([str(BIN / "dgf"), "ls", "/bench-native"], check=True, env=env,
                              capture_output=True, text=True).stdout.split()[-1]
        header = subprocess.run([str(BIN / "dgf"), "xattr", "get", f"/bench-native/{path}"], check=True,
                                env=env, capture_output=True).stdout
        ours, theirs = [], []
        for _ in range(args.runs):       # interleaved, so both see the same load
            ours.append(measure.run([str(BIN / "dgf"), "xattr", "get", f"/bench-native/{path}", "--as", "native"],
                                    env))
            theirs.append(measure.run(["dcm2xml", "--native-format", str(rt)]))

        def summary(rows: list[measure.Run]) -> dict[str, float]:
            return {"wall_s": round(statistics.median(r.wall for r in rows), 3),
                    "cpu_s": round(statistics.median(r.cpu for r in rows), 3),
                    "peak_rss_mb": round(max(r.rss for r in rows) / 1e6, 1)}

        dgf, dcmtk = summary(ours), summary(theirs)
        print(json.dumps({"file_mb": round(rt.stat().st_size / 1e6, 2), "xml_header_mb": round(len(header) / 1e6, 2),
                          "runs": args.runs, "dgf": dgf, "dcm2xml": dcmtk,
                          "wall_ratio_dcmtk_over_dgf": round(dcmtk["wall_s"] / dgf["wall_s"], 2)}, indent=1))
    finally:
        local.down(fed.root, quiet=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
