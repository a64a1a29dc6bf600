"""DICOMweb against dgf and Orthanc's DICOMweb plugin, same run, same data.

    .venv/bin/python bench/dicomweb.py [--studies 10000] [--series 100] [--queries 200] [--runs 5]

Loads ``--studies`` small studies (one 39 KB instance each) and one CT series of ``--series``
0.5 MB instances into both systems (dgf: a local federation and ``dgf web serve``; Orthanc: the
Debian package with ``orthanc-dicomweb``, SQLite index, storage on disk), then, on keep-alive
HTTP connections:

- **QIDO-RS**: ``/studies?StudyInstanceUID=X`` for ``--queries`` random studies, interleaved:
  latency p50 and p95 (ms);
- **the study list**: what a viewer asks first (OHIF: ``/studies?limit=101&offset=0&...``), and a
  page further on (``offset=1000``), each ``--runs`` times, interleaved: latency p50 (ms);
- **the series' metadata** (``/studies/S/series/T/metadata``, what a viewer reads before it shows
  a series), ``--runs`` times, interleaved: latency p50 (ms);
- **WADO-RS**: the whole series as ``multipart/related; type="application/dicom";
  transfer-syntax=*``, ``--runs`` times, interleaved: MB/s (median), and CPU seconds of every
  server process (dgf: web server, metaserver, sites; Orthanc itself) per retrieval.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, orthanc, synth  # noqa: E402
from dgf import local  # noqa: E402
from dgf.client import Client  # noqa: E402

BIN = Path(sys.executable).parent
ALL_SYNTAXES = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _retrieve(session: requests.Session, url: str) -> int:
    got = 0
    with session.get(url, headers={"Accept": ALL_SYNTAXES}, stream=True, timeout=300) as r:
        r.raise_for_status()
        for chunk in r.iter_content(1 << 20):
            got += len(chunk)
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--series", type=int, default=100)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgf-bench-dicomweb-"))
    # One patient per study: the load issues more pseudonyms than a clinician may in a minute.
    fed = local.up(work / "fed", limits={"pseudonyms_per_minute": str(args.studies * 2)})
    web_port = orthanc.free_port()
    conf = fed.root / "bench-web.conf"
    conf.write_text(f"[web]\nlisten = 127.0.0.1:{web_port}\ntokens = bench-tokens.json\nviewer = off\n"
                    f"find_limit = {max(10_000, args.studies + 10)}\n")
    token = subprocess.run([str(BIN / "dgf"), "web", "token", "create", "bench", "--config", str(conf),
                            "--principal", str(fed.config("researcher"))],
                           capture_output=True, text=True, check=True).stdout.strip()
    web_log = open(work / "web.log", "wb")
    web = subprocess.Popen([str(BIN / "dgf"), "web", "serve", "--config", str(conf)], stdout=web_log, stderr=web_log)
    peer = orthanc.start(work, (orthanc.DICOMWEB_PLUGIN,),
                         DicomWeb={"Enable": True, "Root": "/dicom-web/", "EnableWado": False})
    orthanc_port = peer.http_port
    results: dict[str, object] = {"studies": args.studies, "series instances": args.series,
                                  "queries": args.queries, "runs": args.runs}
    try:
        dgf_url, orthanc_url = f"http://127.0.0.1:{web_port}/dicomweb", f"http://127.0.0.1:{orthanc_port}/dicom-web"
        orthanc.wait_http(dgf_url, web, "dgf web serve")
        orthanc.wait_http(f"http://127.0.0.1:{orthanc_port}/system", peer.proc, "Orthanc")
        small = synth.small_corpus(work / "small", args.studies, patients=args.studies, seed=77)
        series = synth.ct_corpus(work / "series", args.series, patients=1, seed=78)
        t0 = time.perf_counter()
        with Client(fed.config("clinician")) as c:
            report = c.upload([*small, *series])
            if report.failed:
                raise SystemExit(f"dgf did not take {len(report.failed)} file(s): {report.failed[0].reason}")
        results["load seconds: dgf"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        o = requests.Session()
        for p in [*small, *series]:
            o.post(f"http://127.0.0.1:{orthanc_port}/instances", data=p.read_bytes(), timeout=60).raise_for_status()
        results["load seconds: Orthanc"] = round(time.perf_counter() - t0, 1)
        shutil.rmtree(work / "small")
        # The studies as each system names them (dgf's are de-identified UIDs).
        with Client(fed.config("researcher")) as c:
            rows = c.find("/DicomHeader", "/", show=["StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows"])
        dgf_studies = sorted({r["values"]["StudyInstanceUID"] for r in rows if r["values"].get("Rows") == "128"
                              or r["values"].get("Modality") == "MR"})
        big = next(r for r in rows if r["values"].get("Rows") == "512")
        dgf_series = f"{dgf_url}/studies/{big['values']['StudyInstanceUID']}/series/{big['values']['SeriesInstanceUID']}"
        orthanc_studies = sorted(o.get(f"http://127.0.0.1:{orthanc_port}/studies?expand", timeout=120).json(),
                                 key=lambda s: s["ID"])
        o_uids = [s["MainDicomTags"]["StudyInstanceUID"] for s in orthanc_studies]
        import pydicom
        head = pydicom.dcmread(series[0], stop_before_pixels=True)
        orthanc_series = f"{orthanc_url}/studies/{head.StudyInstanceUID}/series/{head.SeriesInstanceUID}"
        d = requests.Session()
        d.headers["Authorization"] = f"Bearer {token}"
        rng = random.Random(5)
        lat: dict[str, list[float]] = {"dgf": [], "orthanc": []}
        for _ in range(args.queries):
            for name, session, url, uids in (("dgf", d, dgf_url, dgf_studies), ("orthanc", o, orthanc_url, o_uids)):
                uid = rng.choice(uids)
                t = time.perf_counter()
                r = session.get(f"{url}/studies", params={"StudyInstanceUID": uid}, timeout=60,
                                headers={"Accept": "application/dicom+json"})
                lat[name].append(time.perf_counter() - t)
                if r.status_code != 200 or len(r.json()) != 1:
                    raise SystemExit(f"{name}: QIDO of one study answered {r.status_code} with {r.text[:200]}")
        for name, v in lat.items():
            v.sort()
            results[f"QIDO-RS one study among {args.studies}, ms p50/p95: {name}"] = [
                round(statistics.median(v) * 1000, 1), round(v[int(len(v) * 0.95)] * 1000, 1)]
        page = {"limit": "101", "fuzzymatching": "false", "includefield": "00081030,00080060"}
        listed: dict[str, list[float]] = {f"{n} {o}": [] for n in ("dgf", "orthanc") for o in (0, 1000)}
        for _ in range(args.runs):
            for offset in (0, 1000):
                for name, session, url in (("dgf", d, dgf_url), ("orthanc", o, orthanc_url)):
                    t = time.perf_counter()
                    r = session.get(f"{url}/studies", params={**page, "offset": str(offset)}, timeout=300,
                                    headers={"Accept": "application/dicom+json"})
                    listed[f"{name} {offset}"].append(time.perf_counter() - t)
                    if r.status_code != 200 or len(r.json()) != min(101, max(0, args.studies + 1 - offset)):
                        raise SystemExit(f"{name}: the study list answered {r.status_code} with {r.text[:200]}")
        for key, v in listed.items():
            who, at = key.split()
            results[f"QIDO-RS study list, limit 101 offset {at}, ms p50: {who}"] = round(
                statistics.median(v) * 1000, 1)
        meta: dict[str, list[float]] = {"dgf": [], "orthanc": []}
        for _ in range(args.runs):
            for name, session, url in (("dgf", d, dgf_series), ("orthanc", o, orthanc_series)):
                t = time.perf_counter()
                r = session.get(f"{url}/metadata", timeout=300, headers={"Accept": "application/dicom+json"})
                meta[name].append(time.perf_counter() - t)
                if r.status_code != 200 or len(r.json()) != args.series:
                    raise SystemExit(f"{name}: the series' metadata answered {r.status_code} with {r.text[:200]}")
        for name, v in meta.items():
            results[f"WADO-RS metadata of the {args.series}-instance series, ms p50: {name}"] = round(
                statistics.median(v) * 1000, 1)
        dgf_pids = [web.pid, *local.pids(fed.root).values()]
        wado: dict[str, list[float]] = {"dgf": [], "orthanc": []}
        cpu: dict[str, list[float]] = {"dgf": [], "orthanc": []}
        size = 0
        for _ in range(args.runs):
            for name, session, url, pids in (("dgf", d, dgf_series, dgf_pids), ("orthanc", o, orthanc_series, [peer.pid])):
                before = sum(measure.cpu_of(p) for p in pids)
                t = time.perf_counter()
                size = _retrieve(session, url)
                wado[name].append(time.perf_counter() - t)
                cpu[name].append(sum(measure.cpu_of(p) for p in pids) - before)
        mb = size / 1e6
        for name in wado:
            results[f"WADO-RS series of {args.series} ({mb:.0f} MB), MB/s median: {name}"] = round(
                mb / statistics.median(wado[name]), 1)
            results[f"WADO-RS server CPU seconds per series: {name}"] = round(statistics.median(cpu[name]), 3)
        results["ratios dgf/Orthanc: QIDO p50 latency, WADO MB/s"] = [
            round(statistics.median(lat["dgf"]) / statistics.median(lat["orthanc"]), 2),
            round(statistics.median(wado["orthanc"]) / statistics.median(wado["dgf"]), 2)]
        results["ratios dgf/Orthanc: study list p50 latency, offset 0 and 1000"] = [
            round(statistics.median(listed[f"dgf {n}"]) / statistics.median(listed[f"orthanc {n}"]), 2)
            for n in (0, 1000)]
    except BaseException:
        print((work / "web.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        measure.stop(web, peer.proc)
        local.down(fed.root, quiet=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
