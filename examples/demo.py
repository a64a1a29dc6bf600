"""The main job on the embedded default, in a minute: ``make demo`` runs this.

Starts a local federation (metaserver + two I/O sites on loopback), uploads real DICOM files
(pydicom's CT, MR and RT examples plus a small synthetic cohort) with the real CLI, runs a cohort
query, downloads de-identified copies as a researcher and exact originals as a clinician, shows
that the researcher is refused identity (and that the refusal is audited), then shows the DICOM
side (a modality's storescu into 'dgf dicom serve', a viewer's findscu), the web side (STOW-RS
and QIDO-RS against 'dgf web serve', which also serves the OHIF viewer) and stops the servers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import synth  # noqa: E402
from dgf import local  # noqa: E402

BIN = Path(sys.executable).parent
EXAMPLES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "rtstruct.dcm"]


def sh(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a dgf command as a user would, echoing it and its output."""
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"\n$ DGF_CONFIG={config.name} {shown}")
    env = dict(os.environ, DGF_CONFIG=str(config))
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    for line in out[:8]:
        print("  " + (line if len(line) <= 150 else line[:147] + "..."))
    if len(out) > 8:
        print(f"  ... ({len(out) - 8} more lines)")
    if check and proc.returncode != 0:
        raise SystemExit(f"demo step failed with exit status {proc.returncode}")
    return proc


def dicom_side(fed: local.Federation, tmp: Path, example: Path) -> None:
    """The archive as a DICOM node: a modality stores with dcmtk's storescu, a viewer queries
    with findscu (both talk to 'dgf dicom serve' as the AE titles of DIR/dicom.conf)."""
    if shutil.which("storescu") is None:
        print("\n(dcmtk is not installed: the DICOM side of the demo is skipped; apt-get install dcmtk)")
        return
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = fed.root / "dicom.conf"
    conf.write_text(conf.read_text().replace("listen = 127.0.0.1:11112", f"listen = 127.0.0.1:{port}"))
    print(f"\n$ dgf dicom serve --config {conf.name} &        # AE DGF on 127.0.0.1:{port}")
    ready = fed.root / "dicom.addr"
    ready.unlink(missing_ok=True)
    gateway = subprocess.Popen([str(BIN / "dgf"), "dicom", "serve", "--config", str(conf), "--ready-file", str(ready)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ready.exists():
            if gateway.poll() is not None:
                raise SystemExit("dgf dicom serve did not start")
            time.sleep(0.1)
        for cmd in (["storescu", "-aet", "MODALITY", "-aec", "DGF", "127.0.0.1", str(port), str(example)],
                    ["findscu", "-S", "-aet", "RESEARCH", "-aec", "DGF", "127.0.0.1", str(port),
                     "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "ModalitiesInStudy",
                     "-k", "NumberOfStudyRelatedInstances"]):
            print("\n$ " + " ".join(cmd))
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TCP_NODELAY="1"))
            shown = [line for line in (out.stdout + out.stderr).splitlines()
                     if "(0020,000d)" in line or "(0008,0061)" in line or "(0020,1208)" in line]
            for line in shown[:9]:
                print("  " + line.strip())
            if len(shown) > 9:
                print(f"  ... ({len(shown) - 9} more lines)")
            if out.returncode != 0:
                raise SystemExit(f"{cmd[0]} failed with exit status {out.returncode}")
            while any((fed.root / "dicom-spool" / "incoming").glob("*/*.dcm")):
                time.sleep(0.1)              # the stored instance is in the archive
    finally:
        gateway.terminate()
        gateway.wait(15)


def web_side(fed: local.Federation, example: Path) -> None:
    """The archive over DICOMweb: a token, 'dgf web serve', a STOW-RS of one file, QIDO-RS and
    a rendered frame back (the OHIF viewer is at the same address)."""
    import json
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = fed.root / "web.conf"
    conf.write_text(conf.read_text().replace("listen = 127.0.0.1:8042", f"listen = 127.0.0.1:{port}"))
    token_file = fed.root / "demo-web.token"
    if not token_file.exists():
        print(f"\n$ dgf web token create demo --config {conf.name} --principal clinician.conf")
        made = subprocess.run([str(BIN / "dgf"), "web", "token", "create", "demo", "--config", str(conf),
                               "--principal", str(fed.config("clinician"))], capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"dgf web token create failed: {made.stderr.strip()}")
        token_file.touch(0o600)
        token_file.write_text(made.stdout.strip() + "\n")
        print(f"  dgf_**** (kept in {token_file})")
    token = token_file.read_text().strip()
    print(f"\n$ dgf web serve --config {conf.name} &        # http://127.0.0.1:{port}/")
    ready = fed.root / "web.addr"
    ready.unlink(missing_ok=True)
    log = open(fed.root / "logs" / "web.log", "ab")
    server = subprocess.Popen([str(BIN / "dgf"), "web", "serve", "--config", str(conf), "--ready-file", str(ready)],
                              stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}/dicomweb"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.monotonic() + 300          # the first start fetches the viewer (npm)
        while not ready.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dgf web serve did not start; see {fed.root / 'logs' / 'web.log'}")
            time.sleep(0.1)
        boundary = "dgfdemo"
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + example.read_bytes()
                + f"\r\n--{boundary}--\r\n".encode())
        print(f"\n$ POST {base}/studies   (STOW-RS of {example.name})")
        stow = urllib.request.Request(f"{base}/studies", data=body, method="POST", headers={
            **auth, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        with urllib.request.urlopen(stow, timeout=60) as r:
            answer = json.load(r)
            print(f"  {r.status}: stored as {answer['00081199']['Value'][0]['00081190']['Value'][0]}")
        print(f"\n$ GET {base}/studies?ModalitiesInStudy=MR   (QIDO-RS)")
        with urllib.request.urlopen(urllib.request.Request(f"{base}/studies?ModalitiesInStudy=MR", headers=auth),
                                    timeout=60) as r:
            studies = json.load(r)
        for st in studies[:3]:
            print(f"  study {st['0020000D']['Value'][0]}  patient {st['00100020']['Value'][0]}  "
                  f"{st['00201208']['Value'][0]} instance(s)")
        print(f"\nOpen http://127.0.0.1:{port}/ and sign in with the token in {token_file} to browse the archive "
              f"in the OHIF viewer (after the demo: dgf local up {fed.root}; dgf web serve --config {conf}).")
    finally:
        server.terminate()
        server.wait(15)
        log.close()


def main(root: Path) -> int:
    from pydicom.data import get_testdata_file

    if root.exists():
        local.down(root, quiet=True)
        shutil.rmtree(root)
    print(f"Starting a local federation in {root} ...")
    fed = local.up(root)
    print(f"  metaserver {fed.metaserver}; sites {', '.join(fed.sites)}; configs admin/clinician/researcher.conf")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inbox = Path(tmp) / "inbox"
            inbox.mkdir()
            originals = []
            for name in EXAMPLES:
                src = Path(get_testdata_file(name, download=False))
                shutil.copyfile(src, inbox / name)
                originals.append(inbox / name)
            synth.small_corpus(inbox / "cohort", 60, patients=12)
            clin, res = fed.config("clinician"), fed.config("researcher")

            sh(clin, "dgf_up", str(inbox), "-r")
            sh(res, "dgf", "ls", "/")
            sh(res, "dgf_find", "/DicomHeader[Modality='CT' and PatientSex='F']", "--show",
               "PatientID,PatientAge,StudyDate", "--format", "csv")
            sh(res, "dgf_find", "//ReferencedRTPlanSequence/Item", "--count")

            rt = subprocess.run([str(BIN / "dgf_find"), "/DicomHeader[Modality='RTDOSE']"], capture_output=True,
                                text=True, env=dict(os.environ, DGF_CONFIG=str(res))).stdout.split()[0]
            sh(res, "dgf", "xattr", "get", "--pretty", rt)
            sh(res, "dgf_down", "--find", "/DicomHeader[Modality='MR']", "-o", str(Path(tmp) / "research"))
            refused = sh(res, "dgf_down", rt, "--identified", "-o", str(Path(tmp) / "nope"), check=False)
            assert refused.returncode == 4, "a researcher must be refused identity"
            sh(clin, "dgf_down", "/", "--identified", "-o", str(Path(tmp) / "clinic"))
            back = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (Path(tmp) / "clinic").rglob("*.dcm")}
            same = sum(hashlib.sha256(p.read_bytes()).hexdigest() in back for p in originals)
            print(f"\n{same} of {len(originals)} example files came back byte-identical for the clinician.")
            sh(fed.config("admin"), "dgf", "admin", "audit", "--limit", "3")
            dicom_side(fed, Path(tmp), originals[0])
            web_side(fed, originals[1])
            if same != len(originals):
                return 1
    finally:
        stopped = local.down(root)
        print(f"\nStopped {', '.join(stopped)}. The archive stays in {root}; "
              f"'dgf local up {root}' brings it back.")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-federation").resolve()))
