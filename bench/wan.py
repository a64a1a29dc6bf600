"""Ingest and download over a long link: dgf against Orthanc, both behind the same delay.

    .venv/bin/python bench/wan.py [--rtt-ms 0,20,50] [--files 300] [--large-mb 64] [--runs 3] [--base DIR]

Sites sit in hospitals and the metaserver elsewhere, so every link a client uses may be tens of
milliseconds long.  Each server (dgf's metaserver and both sites; Orthanc's HTTP port) is put
behind ``bench/delay.py``, which adds half of ``--rtt-ms`` to every byte each way (latency only:
no bandwidth cap, no loss).  dgf's clients reach the metaserver through its proxy (their config
names it) and the sites through theirs (an admin re-registers each site at its proxy, as
``dgf admin site add`` would).  Per round trip time, alternating the systems' order each run:

- ``--files`` fresh small CT files (``bench/synth.py``): ``dgf_up -r``, then ``dgf_down``;
  Orthanc: a Python client POSTs each to ``/instances`` on one keep-alive connection, then GETs
  each back (as ``bench/per_file.py``; ``--orthanc-connections K`` for K at once);
- one multi-frame object of ``--large-mb`` MB: ``dgf_up`` and ``dgf_down``; Orthanc: one POST and
  one GET.

A proxy with no delay is in the path at ``0`` too, so the rows differ by the delay alone.  With
``--base <worktree>`` that tree's ``dgf_up``/``dgf_down`` (on PYTHONPATH) run too, on files of
their own, against the same servers.  Prints one JSON object: files/s and MB/s per RTT, medians
of the runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, orthanc, synth  # noqa: E402
from bench.per_file import ORTHANC_CLIENT  # noqa: E402
from dgf import local  # noqa: E402
from dgf.client import Client  # noqa: E402
from dgf.config import read_section, write_section  # noqa: E402
from dgf.ssh import probe_host_key  # noqa: E402

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent.parent

#: Orthanc's client for one large file: argv = mode (up|down), port, file (up) or id, output.
ORTHANC_LARGE = r"""
import sys
from pathlib import Path
import requests
mode, port, what, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
base = f"http://127.0.0.1:{port}"
if mode == "up":
    r = requests.post(f"{base}/instances", data=Path(what).read_bytes())
    r.raise_for_status()
    out.write_text(r.json()["ID"])
else:
    with requests.get(f"{base}/instances/{what}/file", stream=True) as r, open(out, "wb") as f:
        r.raise_for_status()
        for chunk in r.iter_content(1 << 20):
            f.write(chunk)
"""


class Proxies:
    """bench/delay.py in front of some ``host:port`` targets, one-way delay ``rtt_ms / 2``."""

    def __init__(self, rtt_ms: float, targets: list[str], listen: dict[str, int] | None = None) -> None:
        """``listen``: the port to listen on for a target, where not any free one."""
        named = [f"{t}={listen[t]}" if listen and t in listen else t for t in targets]
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.delay", "--delay-ms", str(rtt_ms / 2), *named],
                                     cwd=HERE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.at: dict[str, int] = {}
        for _ in targets:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise SystemExit("bench/delay.py did not start")
            target, _, at = line.strip().partition(" -> ")
            self.at[target] = int(at.rpartition(":")[2])

    def close(self) -> None:
        measure.stop(self.proc)


def _through(fed: local.Federation, proxies: Proxies, work: Path) -> Path:
    """A clinician config whose metaserver is behind its proxy; each site re-registered at its
    proxy (its host key pinned as before)."""
    state = json.loads((fed.root / "federation.json").read_text())
    meta = read_section(fed.config("clinician"), "dgf")["metaserver"]
    with Client(fed.config("admin")) as admin:
        for site in state["sites"]:
            addr = (fed.root / f"{site}.addr").read_text().strip()
            host, _, port = addr.rpartition(":")
            admin.meta.call("admin.site.add", site=site, host="127.0.0.1", port=proxies.at[addr],
                            host_key=probe_host_key(host, int(port)))
    config = work / "clinician-wan.conf"
    shutil.copy(fed.config("clinician"), config)
    section = read_section(config, "dgf")
    section.update(metaserver=f"127.0.0.1:{proxies.at[meta]}",
                   key=str((fed.root / section["key"]).resolve()),
                   cache_dir=str(work / "cache-wan"))
    write_section(config, "dgf", section)
    return config


def _dgf(env: dict[str, str], src: Path, large: Path, tag: str, work: Path, side: str = "dgf") -> dict[str, float]:
    """dgf's four transfers of one run at one RTT (``side``: "dgf", or "base" for the clients
    of ``--base``): wall seconds by name."""
    tag = f"{side}-{tag}"
    return {
        f"{side} up": measure.run([str(BIN / "dgf_up"), str(src), "--to", f"/{tag}", "-r"], env).wall,
        f"{side} down": measure.run([str(BIN / "dgf_down"), f"/{tag}", "-o", str(work / f"down-{tag}")], env).wall,
        f"{side} large up": measure.run([str(BIN / "dgf_up"), str(large), "--to", f"/large-{tag}"], env).wall,
        f"{side} large down": measure.run([str(BIN / "dgf_down"), f"/large-{tag}", "-o",
                                           str(work / f"ldown-{tag}")], env).wall,
    }


def _orthanc(port: int, listing: Path, large: Path, tag: str, work: Path, k: int) -> dict[str, float]:
    """Orthanc's four transfers of one run at one RTT (``port``: its proxy): wall seconds by name."""
    import requests

    py, ids, lid = [sys.executable], work / f"ids-{tag}.txt", work / f"lid-{tag}.txt"
    small, big = str(work / "orthanc_client.py"), str(work / "orthanc_large.py")
    out = {
        "Orthanc up": measure.run([*py, small, "up", str(port), str(listing), str(ids), str(k)]).wall,
        "Orthanc down": measure.run([*py, small, "down", str(port), str(ids), str(work / f"odown-{tag}"),
                                     str(k)]).wall,
        "Orthanc large up": measure.run([*py, big, "up", str(port), str(large), str(lid)]).wall,
    }
    out["Orthanc large down"] = measure.run([*py, big, "down", str(port), lid.read_text(),
                                             str(work / f"oldown-{tag}.dcm")]).wall
    # Orthanc's storage is kept small: the large instance goes once read back.
    requests.delete(f"http://127.0.0.1:{port}/instances/{lid.read_text()}").raise_for_status()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtt-ms", default="0,20,50", help="round trip times to add, comma-separated")
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--large-mb", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--orthanc-connections", type=int, default=1, metavar="K")
    ap.add_argument("--dir", default=None, help="where the work directory goes (default: the system's temp)")
    ap.add_argument("--base", type=Path, default=None,
                    help="another tree (a git worktree) whose clients run alike, against the same servers")
    args = ap.parse_args()
    rtts = [float(r) for r in args.rtt_ms.split(",")]
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-wan-", dir=args.dir))
    peer = orthanc.start(work)
    fed = local.up(work / "fed")
    (work / "orthanc_client.py").write_text(ORTHANC_CLIENT)
    (work / "orthanc_large.py").write_text(ORTHANC_LARGE)
    state = json.loads((fed.root / "federation.json").read_text())
    targets = [read_section(fed.config("clinician"), "dgf")["metaserver"],
               *((fed.root / f"{s}.addr").read_text().strip() for s in state["sites"]),
               f"127.0.0.1:{peer.http_port}"]
    mb = 0.0
    rows: dict[str, dict[str, list[float]]] = {}
    # The proxies listen on the same ports at every RTT, so the sites stay where the metaserver
    # and a client's cache say they are (dgf_up and dgf_down open links to them ahead).
    listen = {t: orthanc.free_port() for t in targets}
    try:
        orthanc.wait_http(f"http://127.0.0.1:{peer.http_port}/system", peer.proc, "Orthanc")
        for run in range(args.runs):
            for rtt in rtts:
                tag = f"r{run}-{int(rtt)}"
                src = synth.small_corpus(work / f"src-{tag}", args.files, seed=1000 + run * 100 + int(rtt))
                listing = work / f"files-{tag}.txt"
                listing.write_text("\n".join(map(str, src)))
                # A new instance each time: the same bytes again would be one more name of a
                # stored object in dgf, and nothing new in Orthanc.
                (work / "large").mkdir(exist_ok=True)
                large = synth.multiframe(work / "large" / f"{tag}.dcm", args.large_mb * 1024 * 1024,
                                         seed=run * 100 + int(rtt))
                mb = large.stat().st_size / 1e6
                proxies = Proxies(rtt, targets, listen)
                try:
                    env = {"DGF_CONFIG": str(_through(fed, proxies, work)), "PATH": str(BIN) + ":/usr/bin:/bin"}
                    steps = [functools.partial(_dgf, env, src[0].parent, large, tag, work),
                             functools.partial(_orthanc, proxies.at[targets[-1]], listing, large, tag, work,
                                               args.orthanc_connections)]
                    if args.base is not None:
                        # Other files, of the same sizes: the same ones would be stored already.
                        bsrc = synth.small_corpus(work / f"bsrc-{tag}", args.files, seed=5000 + run * 100 + int(rtt))
                        blarge = synth.multiframe(work / "large" / f"b{tag}.dcm", args.large_mb * 1024 * 1024,
                                                  seed=9000 + run * 100 + int(rtt))
                        benv = {**env, "PYTHONPATH": str(args.base.resolve())}
                        steps.insert(1, functools.partial(_dgf, benv, bsrc[0].parent, blarge, tag, work, "base"))
                    row = rows.setdefault(f"{rtt:g} ms", {})
                    for step in (steps if run % 2 == 0 else steps[::-1]):
                        for key, wall in step().items():
                            row.setdefault(key, []).append(wall)
                    if args.base is not None:
                        shutil.rmtree(bsrc[0].parent)
                        blarge.unlink()
                        for d in (work / f"down-base-{tag}", work / f"ldown-base-{tag}"):
                            shutil.rmtree(d)
                finally:
                    proxies.close()
                got = (sum(1 for _ in (work / f"down-dgf-{tag}").rglob("*.dcm")),
                       sum(1 for _ in (work / f"odown-{tag}").iterdir()))
                if got != (args.files, args.files):
                    raise SystemExit(f"{tag}: downloaded {got}, not {args.files} each")
                for d in (src[0].parent, work / f"down-dgf-{tag}", work / f"odown-{tag}", work / f"ldown-dgf-{tag}"):
                    shutil.rmtree(d)
                for f in (work / f"oldown-{tag}.dcm", large):
                    f.unlink()
                time.sleep(0.5)
    finally:
        measure.stop(peer.proc)
        local.down(fed.root, quiet=True)
        shutil.rmtree(work, ignore_errors=True)
    out: dict[str, object] = {"files": args.files, "large MB": round(mb, 1), "runs": args.runs,
                              "Orthanc connections": args.orthanc_connections}
    for rtt_key, row in rows.items():
        med = {k: statistics.median(v) for k, v in row.items()}
        sides = ["dgf", *(["base"] if args.base is not None else []), "Orthanc"]
        label = " / ".join(sides)
        out[f"RTT {rtt_key}"] = {
            f"small up files/s, {label}": [round(args.files / med[f"{x} up"]) for x in sides],
            f"small down files/s, {label}": [round(args.files / med[f"{x} down"]) for x in sides],
            f"large up MB/s, {label}": [round(mb / med[f"{x} large up"], 1) for x in sides],
            f"large down MB/s, {label}": [round(mb / med[f"{x} large down"], 1) for x in sides],
            "each run's wall seconds": {k: [round(w, 3) for w in v] for k, v in row.items()},
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
