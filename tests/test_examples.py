"""The README's demo is a test: it must run end to end on the embedded default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_and_restores_originals(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "5 of 5 example files came back byte-identical" in proc.stdout
    assert "may not receive patient identity" in proc.stdout
    assert "Stopped metaserver, site-a, site-b" in proc.stdout
    # The DICOM side: storescu in, findscu answered from the index (ModalitiesInStudy counted).
    assert "$ storescu -aet MODALITY" in proc.stdout and "(0008,0061) CS [CT" in proc.stdout
    # The web side: STOW-RS stored (coerced: de-identified), QIDO-RS finds the MR study.
    assert "202: stored as http://127.0.0.1:" in proc.stdout
    assert "(QIDO-RS)" in proc.stdout and "1 instance(s)" in proc.stdout
