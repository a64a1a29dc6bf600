"""Orthanc, the peer the benchmarks measure dgf against: the Debian package, started on free
loopback ports with its storage on disk, SQLite index, no compression and no authentication."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Orthanc's DICOMweb plugin (Debian ``orthanc-dicomweb``).
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 300) -> None:
    """Until ``url`` answers at all (or ``proc`` exits: SystemExit naming ``what``)."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, timeout=2)
            return
        except requests.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{what} did not start") from None
            time.sleep(0.2)


@dataclass
class Orthanc:
    proc: subprocess.Popen[bytes]
    http_port: int
    dicom_port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


def start(work: Path, plugins: tuple[str, ...] = (), env: dict[str, str] | None = None,
          **config: Any) -> Orthanc:
    """Orthanc with its database in ``work/orthanc-db``, ``config`` added to its configuration;
    it is starting when this returns (``wait_http`` on ``/system`` to know it is up)."""
    binary = shutil.which("Orthanc")
    missing = [p for p in plugins if not Path(p).exists()]
    if binary is None or missing:
        raise SystemExit("Orthanc is needed (Debian: apt-get install orthanc"
                         + (" orthanc-dicomweb" if missing else "") + ").")
    http_port, dicom_port = free_port(), free_port()
    conf = work / "orthanc.json"
    conf.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(work / "orthanc-db"), "IndexDirectory": str(work / "orthanc-db"),
        "HttpPort": http_port, "DicomPort": dicom_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "StorageCompression": False, "Plugins": list(plugins), **config}))
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return Orthanc(proc, http_port, dicom_port)
