"""A command's fixed cost: what `dgf ls /`, `dgf stat`, a one-row `dgf_find` cost before any work.

    .venv/bin/python bench/fixed_cost.py [--runs 15]

On a local federation holding a few files: wall seconds of each command (median of ``--runs``,
bytecode compiled first, as an installed package has it), the import time of the command's own
modules (``python -X importtime``: every top-level ``dgf.*`` import, cumulative), and the cost of
connecting (connect + first verb, against the next verb on the open connection).  Each is
measured twice in the same run: with the default shared connection (a connection master, see
``dgf/mux.py``, started by a first command) and with every command connecting by itself
(``shared_connection = 0``).

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

from bench import synth  # noqa: E402
from dgf import local, mux  # noqa: E402
from dgf.client import Client  # noqa: E402
from dgf.config import ClientConfig  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", "dgf", "metaserver", "ioserver"], cwd=root,
                   env=env, check=True, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-fixed-"))
    fed = local.up(work / "fed")
    results: dict[str, object] = {"runs": args.runs}
    try:
        with Client(fed.config("clinician")) as c:
            report = c.upload(synth.small_corpus(work / "src", 20, patients=4))
        one = sorted(report.paths)[0]
        shared = fed.config("researcher")
        own = fed.root / "researcher-own.conf"
        own.write_text(shared.read_text() + "shared_connection = 0\n")
        commands = {"dgf ls /": [str(BIN / "dgf"), "ls", "/"],
                    "dgf stat FILE": [str(BIN / "dgf"), "stat", one],
                    "dgf_find XPATH --limit 1": [str(BIN / "dgf_find"), "/DicomHeader[Modality='CT']", "--limit", "1"]}
        for mode, conf in (("shared", shared), ("own connection", own)):
            env["DGF_CONFIG"] = str(conf)
            subprocess.run(commands["dgf ls /"], env=env, check=True, capture_output=True)   # starts the master
            sock = mux.socket_path(ClientConfig.load(conf))
            deadline = time.monotonic() + 30
            while mode == "shared" and sock is not None and not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            for name, cmd in commands.items():
                walls = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    subprocess.run(cmd, env=env, check=True, capture_output=True)
                    walls.append(time.perf_counter() - t)
                results[f"{name} ({mode}): wall ms, median"] = round(statistics.median(walls) * 1000, 1)
            imports = []
            for _ in range(5):
                out = subprocess.run([sys.executable, "-X", "importtime", "-c",
                                      "import sys; sys.argv=['dgf','ls','/']; from dgf.cli import main; main()"],
                                     env=env, capture_output=True, text=True)
                imports.append(sum(int(line.split("|")[1]) for line in out.stderr.splitlines()
                                   if line.startswith("import time:") and line.count("|") == 2
                                   and line.rsplit("|", 1)[1].startswith(" dgf")))
            results[f"imports of `dgf ls /` ({mode}): ms, every top-level dgf.* module, median of 5"] = \
                round(statistics.median(imports) / 1000, 1)
        for mode, flag in (("shared", True), ("own connection", False)):
            first, nxt = [], []
            for _ in range(args.runs):
                t = time.perf_counter()
                c = Client(fed.config("researcher"), shared=flag)
                c.whoami()
                t1 = time.perf_counter()
                c.whoami()
                nxt.append(time.perf_counter() - t1)
                first.append(t1 - t)
                c.close()
            results[f"connect + first verb ({mode}), ms (median)"] = round(statistics.median(first) * 1000, 2)
            results[f"a verb on an open channel ({mode}), ms (median)"] = round(statistics.median(nxt) * 1000, 2)
    finally:
        local.down(fed.root, quiet=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
