"""CPU per file of ingest and download, dgf against Orthanc in the same run (issue 16).

    .venv/bin/python bench/per_file.py [--files 1000] [--runs 3] [--dir DIR] [--orthanc-connections K]

Each run makes ``--files`` fresh small CT files (39 KB, ``bench/synth.py``) and, interleaved:

- **dgf**: ``dgf_up`` of them into a local federation, then ``dgf_down`` of them to disk;
- **Orthanc** (the Debian package, SQLite index, storage on disk, no compression): a Python
  client on one keep-alive connection ``POST``s each file to ``/instances``, then ``GET``s each
  ``/instances/ID/file`` and writes it to disk (what Orthanc's own import script does, and what
  a client must do to get files out of it).  With ``--orthanc-connections K`` it sends on K
  connections at once, one thread each, each taking a contiguous share of the files: Orthanc
  serves requests in parallel (HttpThreadsCount), so its files/s with one connection may say
  more about its client than about it.

CPU seconds are the client's (with its children) plus every server process's over the same
interval (dgf: metaserver and both sites; Orthanc: itself), from ``wait4`` and ``/proc``: they
hold on a busy machine where wall time does not.  Prints one JSON object; medians of the runs,
dgf's ingest and download also split by process, and the kernel CPU this machine charges to
create one empty file in the work directory, before and after the runs (a floor under every
per-file figure that writes files: dgf stores two copies, Orthanc one, and each download
writes one).

On this project's VM that cost moves between 0.02 and 0.8 ms from one directory to another of
the same ext4, and over minutes in the same one (/tmp, /var/tmp, /home took turns): ``--dir``
puts everything, both systems' storage and downloads, in a work directory under DIR.
``--dir /dev/shm`` (tmpfs) measures the software alone: no disk, and no cost to make a file
durable, for either system.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, orthanc, synth  # noqa: E402
from dgf import local  # noqa: E402

BIN = Path(sys.executable).parent

#: The Orthanc client: argv = mode (up|down), port, list file, output, connections; each
#: connection a keep-alive session in its own thread, taking a contiguous share of the files.
ORTHANC_CLIENT = r"""
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import requests
mode, port, listing, out, k = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
base = f"http://127.0.0.1:{port}"
items = listing.read_text().split()
shares = [items[len(items) * i // k:len(items) * (i + 1) // k] for i in range(k)]
def up(share):
    s, ids = requests.Session(), []
    for p in share:
        r = s.post(f"{base}/instances", data=Path(p).read_bytes(), timeout=60)
        r.raise_for_status()
        ids.append(r.json()["ID"])
    return ids
def down(share):
    s = requests.Session()
    for i in share:
        r = s.get(f"{base}/instances/{i}/file", timeout=60)
        r.raise_for_status()
        (out / f"{i}.dcm").write_bytes(r.content)
    return []
if mode == "down":
    out.mkdir(parents=True, exist_ok=True)
work = up if mode == "up" else down
if k == 1:
    done = [work(items)]
else:
    with ThreadPoolExecutor(k) as pool:
        done = list(pool.map(work, shares))
if mode == "up":
    out.write_text("\n".join(i for ids in done for i in ids))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the work directory goes (default: the system's temp)")
    ap.add_argument("--orthanc-connections", type=int, default=1, metavar="K",
                    help="Orthanc's client sends on K keep-alive connections at once, one thread each "
                         "(default 1, as Orthanc's own import script does)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-per-file-", dir=args.dir))
    peer = orthanc.start(work)
    port = peer.http_port
    fed = local.up(work / "fed")
    env = {"DGF_CONFIG": str(fed.config("clinician")), "PATH": str(BIN) + ":/usr/bin:/bin"}
    client = work / "orthanc_client.py"
    client.write_text(ORTHANC_CLIENT)
    pids = local.pids(fed.root)
    servers = list(pids.values())
    split: dict[str, dict[str, list[float]]] = {w: {k: [] for k in ("client", *pids)} for w in ("up", "down")}
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in ("dgf up", "dgf down", "Orthanc up", "Orthanc down")}
    n = args.files
    try:
        orthanc.wait_http(f"http://127.0.0.1:{port}/system", peer.proc, "Orthanc")
        create_before = measure.create_cost(work)
        for run in range(args.runs):
            src = synth.small_corpus(work / f"src{run}", n, seed=900 + run)
            listing = work / f"files{run}.txt"
            listing.write_text("\n".join(map(str, src)))
            commands = {"up": [str(BIN / "dgf_up"), str(src[0].parent), "--to", f"/run{run}", "-r"],
                        "down": [str(BIN / "dgf_down"), f"/run{run}", "-o", str(work / f"down{run}")]}
            done = {}
            for what, command in commands.items():
                before = {k: measure.cpu_of(p) for k, p in pids.items()}
                done[what] = measure.run(command, env, servers)
                spent = {k: measure.cpu_of(p) - before[k] for k, p in pids.items()}
                for k, v in {"client": done[what].cpu - sum(spent.values()), **spent}.items():
                    split[what][k].append(v)
            up, down = done["up"], done["down"]
            ids = work / f"ids{run}.txt"
            oup = measure.run([sys.executable, str(client), "up", str(port), str(listing), str(ids),
                               str(args.orthanc_connections)], None,
                              [peer.pid])
            odown = measure.run([sys.executable, str(client), "down", str(port), str(ids), str(work / f"odown{run}"),
                                 str(args.orthanc_connections)],
                                None, [peer.pid])
            got = sum(1 for _ in (work / f"down{run}").rglob("*.dcm")), sum(1 for _ in (work / f"odown{run}").iterdir())
            if got != (n, n):
                raise SystemExit(f"run {run}: downloaded {got}, not {n} each")
            for key, r in (("dgf up", up), ("dgf down", down), ("Orthanc up", oup), ("Orthanc down", odown)):
                runs[key].append((r.wall, r.cpu))
            for d in (src[0].parent, work / f"down{run}", work / f"odown{run}"):
                shutil.rmtree(d)
        create_cost = measure.create_cost(work)
    finally:
        measure.stop(peer.proc)
        local.down(fed.root, quiet=True)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    out: dict[str, object] = {"files": n, "runs": args.runs, "Orthanc connections": args.orthanc_connections}
    for what in ("up", "down"):
        mine, theirs = med[f"dgf {what}"], med[f"Orthanc {what}"]
        out[f"{what}: CPU ms per file, dgf / Orthanc / ratio"] = [
            round(mine[1] / n * 1000, 2), round(theirs[1] / n * 1000, 2), round(mine[1] / theirs[1], 2)]
        out[f"{what}: files/s, dgf / Orthanc / ratio"] = [round(n / mine[0]), round(n / theirs[0]),
                                                          round(theirs[0] / mine[0], 2)]
    for what, by_process in split.items():
        out[f"dgf {what}: CPU ms per file by process"] = {k: round(statistics.median(v) / n * 1000, 2)
                                                          for k, v in by_process.items()}
    out["kernel CPU ms to create one file here, before / after the runs"] = [round(create_before, 3),
                                                                            round(create_cost, 3)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
