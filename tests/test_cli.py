"""The command line: --help teaches every command; real invocations give one-line errors and
the documented exit statuses."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dgf import cli, local
from tests import corpus

BIN = Path(sys.executable).parent


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, prefix + (name,)))
        else:
            out.append(prefix + (name,))
    return out


@pytest.mark.parametrize("words", _commands(cli.main), ids=lambda w: " ".join(w) or "dgf")
def test_every_dgf_command_has_help(words: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli.main, [*words, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) >= 3


@pytest.mark.parametrize("script", ["dgf_up", "dgf_down", "dgf_find", "dgf-metaserver", "dgf-ioserver"])
def test_console_scripts_have_help(script: str) -> None:
    proc = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr


def _run(args: list[str], config: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("DGF_CONFIG", None)
    if config is not None:
        env["DGF_CONFIG"] = str(config)
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_round_trip_and_errors(federation: local.Federation, tmp_path: Path) -> None:
    clin, res = federation.config("clinician"), federation.config("researcher")
    bad = tmp_path / "bad.dcm"
    bad.write_text("hello")
    up = _run(["dgf_up", str(corpus.file("CT_small.dcm")), str(bad), "--to", "/cli"], clin)
    assert up.returncode == 5
    assert "uploaded 1 file(s)" in up.stdout and "1 failed" in up.stdout
    assert f"error: {bad}: not a DICOM file" in up.stderr
    found = _run(["dgf_find", "/DicomHeader[Modality='CT']", "/cli", "--show", "Modality", "--format", "csv"], res)
    assert found.returncode == 0 and found.stdout.splitlines()[0] == "path,Modality"
    assert found.stdout.splitlines()[1].endswith(",CT")
    count = _run(["dgf_find", "/DicomHeader", "/cli", "--count"], res)
    assert count.stdout.strip() == "1"
    bad_xpath = _run(["dgf_find", "/DicomHeader[", "/cli"], res)
    assert bad_xpath.returncode == 2 and bad_xpath.stderr.startswith("dgf_find: invalid XPath")
    assert len(bad_xpath.stderr.strip().splitlines()) == 1
    refused = _run(["dgf_down", "/cli", "--identified", "-o", str(tmp_path / "o")], res)
    assert refused.returncode == 4 and "may not receive patient identity" in refused.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.dcm"))
    down = _run(["dgf_down", "/cli", "--identified", "-o", str(tmp_path / "ok")], clin)
    assert down.returncode == 0, down.stderr
    [got] = list((tmp_path / "ok").rglob("*.dcm"))
    assert got.read_bytes() == corpus.file("CT_small.dcm").read_bytes()
    # --find: what the XPath matches, resolved by the metaserver, at its full path; a bad
    # expression is one line naming it, with nothing written.
    by_query = _run(["dgf_down", "/cli", "--find", "/DicomHeader[Modality='CT']", "-o", str(tmp_path / "q")], res)
    assert by_query.returncode == 0, by_query.stderr
    [hit] = list((tmp_path / "q").rglob("*.dcm"))
    assert hit.relative_to(tmp_path / "q").parts[0] == "cli"
    wrong = _run(["dgf_down", "/cli", "--find", "/DicomHeader[", "-o", str(tmp_path / "w")], res)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1 and "XPath" in wrong.stderr
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.dcm"))
    [path] = [line.split()[-1] for line in _run(["dgf", "ls", "/cli"], res).stdout.splitlines()]
    native = _run(["dgf", "xattr", "get", f"/cli/{path}", "--as", "native"], res)
    assert native.returncode == 0 and "<NativeDicomModel" in native.stdout
    assert '<DicomAttribute tag="00080060" vr="CS" keyword="Modality"><Value number="1">CT</Value>' \
        in native.stdout.replace("\n", "").replace(" " * 2, "")
    assert _run(["dgf", "xattr", "set", f"/cli/{path}", "user.note", "plain text"], clin).returncode == 0
    not_xml = _run(["dgf", "xattr", "get", f"/cli/{path}", "user.note", "--as", "native"], res)
    assert not_xml.returncode != 0 and "not an XML header" in not_xml.stderr
    ls = _run(["dgf", "ls", "-l", "/cli"], clin)
    assert ls.returncode == 0 and ls.stdout.startswith("-rw-r--r--")
    missing = _run(["dgf", "stat", "/cli/none"], clin)
    assert missing.returncode == 3 and missing.stderr.strip() == "dgf stat: /cli/none does not exist."
    noconf = _run(["dgf", "ls", "/"])
    assert noconf.returncode == 2 and "DGF_CONFIG" in noconf.stderr


def test_config_mistakes_are_named(federation: local.Federation, tmp_path: Path) -> None:
    clin = federation.config("clinician")
    text = clin.read_text()
    typo = tmp_path / "typo.conf"
    typo.write_text(text.replace("cache_dir", "cahce_dir") + "\n[limts]\nx = 1\n")
    os.symlink(federation.root / "keys", tmp_path / "keys")
    proc = _run(["dgf", "whoami"], typo)
    assert proc.returncode == 0 and proc.stdout.strip() == "clinician (clinician)"
    assert "unknown key 'cahce_dir' in [dgf] is ignored (did you mean 'cache_dir'?)" in proc.stderr
    assert "unknown section [limts] is ignored (did you mean 'limits'?)" in proc.stderr
    other = tmp_path / "other.conf"
    other.write_text(text.replace("principal = clinician", "principal = researcher"))
    proc = _run(["dgf", "whoami"], other)
    assert proc.returncode == 0 and proc.stdout.strip() == "clinician (clinician)"
    assert "names principal 'researcher', but its key" in proc.stderr and "enrolled as 'clinician'" in proc.stderr
    clean = _run(["dgf", "whoami"], clin)
    assert clean.stderr == ""


def test_local_status_and_down_messages(tmp_path: Path) -> None:
    proc = _run(["dgf", "local", "status", str(tmp_path / "none")])
    assert proc.returncode == 3 and "dgf local up" in proc.stderr


def test_find_for_researchers(federation: local.Federation, tmp_path: Path) -> None:
    clin, res = federation.config("clinician"), federation.config("researcher")
    src = tmp_path / "in"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (src / name).write_bytes(corpus.file(name).read_bytes())
    assert _run(["dgf_up", str(src), "-r", "--to", "/cohort"], clin).returncode == 0
    ct = "/DicomHeader[Modality='CT' and SliceThickness <= 5]"
    lines = _run(["dgf_find", ct, "/cohort", "--format", "jsonl", "--show", "Modality"], res).stdout.splitlines()
    assert [json.loads(x)["values"] for x in lines] == [{"Modality": "CT"}]
    study = _run(["dgf_find", "/DicomHeader", "/cohort", "--level", "study", "--format", "csv"], res)
    rows = list(csv.reader(study.stdout.splitlines()))
    assert rows[0] == ["StudyInstanceUID", "files", "path"] and len(rows) == 3 and rows[1][0].startswith("2.25.")
    explain = _run(["dgf_find", "/DicomHeader[Modality='CT' and count(ImageType) > 1]", "--explain"], res)
    assert "index, then XPath on each candidate" in explain.stdout and "index: 1 path(s): Modality='CT'" in explain.stdout
    assert _run(["dgf", "query", "save", "ct-thin", ct], res).returncode == 0
    assert _run(["dgf_find", "@ct-thin", "/cohort", "--count"], res).stdout.strip() == "1"
    assert "researcher/ct-thin\t" in _run(["dgf", "query", "list"], res).stdout
    unknown = _run(["dgf_find", "@nope"], res)
    assert unknown.returncode == 3 and "no saved query named 'nope'" in unknown.stderr
    bad = _run(["dgf", "query", "save", "broken", "/DicomHeader[Modality='CT'"], res)
    assert bad.returncode == 2 and "column" in bad.stderr
    gone = _run(["dgf", "query", "rm", "ct-thin"], res)
    assert gone.returncode == 0 and "removed researcher/ct-thin" in gone.stdout      # its own


def test_find_output_is_typed_and_mistakes_are_named(federation: local.Federation, tmp_path: Path) -> None:
    import pydicom

    clin, res = federation.config("clinician"), federation.config("researcher")
    files = [str(corpus.file(n)) for n in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm")]
    assert _run(["dgf_up", *files, "--to", "/typed"], clin).returncode == 0
    show = "Modality,ImageType,SliceThickness,Rows,PatientName,StudyDate"
    typed = json.loads(_run(["dgf_find", "/DicomHeader[Modality='CT']", "/typed", "--show", show,
                             "--format", "json"], res).stdout)
    [ct] = typed
    assert ct["values"]["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"] and ct["values"]["Rows"] == 128
    assert isinstance(ct["values"]["SliceThickness"], float) and ct["values"]["Modality"] == "CT"
    # DICOM JSON (PS3.18 F.2), read back by pydicom's own reader of that model.
    model = json.loads(_run(["dgf_find", "/DicomHeader[Modality='CT']", "/typed", "--show", show,
                             "--format", "dicom-json"], res).stdout)
    ds = pydicom.Dataset.from_json(model[0])
    original = pydicom.dcmread(corpus.file("CT_small.dcm"))
    assert ds.ImageType == original.ImageType and ds.Rows == original.Rows
    assert float(ds.SliceThickness) == float(original.SliceThickness) and ds.RetrieveURL == "dgf:" + ct["path"]
    assert model[0]["00100010"]["vr"] == "PN" and "Alphabetic" in model[0]["00100010"]["Value"][0]
    # Study level: --count counts studies; computed attributes as C-FIND gives them.
    assert _run(["dgf_find", "/DicomHeader", "/typed", "--count"], res).stdout.strip() == "3"
    assert _run(["dgf_find", "/DicomHeader[Modality='MR']", "/typed", "--count", "--level", "study"],
                res).stdout.strip() == "2"
    studies = json.loads(_run(["dgf_find", "/DicomHeader", "/typed", "--level", "study", "--format", "json",
                               "--show", "ModalitiesInStudy,NumberOfStudyRelatedInstances"], res).stdout)
    assert sorted(s["values"]["ModalitiesInStudy"] for s in studies) == ["CT", "MR", "MR"]
    assert {s["values"]["NumberOfStudyRelatedInstances"] for s in studies} == {1}
    # A typo is named on stderr with the nearest keyword; the query still runs (exit 0).
    typo = _run(["dgf_find", "/DicomHeader[Modalty='CT']", "/typed"], res)
    assert typo.returncode == 0 and typo.stdout == ""
    assert "warning: Modalty is not a DICOM keyword" in typo.stderr and "did you mean Modality?" in typo.stderr
    iso = _run(["dgf_find", "/DicomHeader[StudyDate >= '1990-01-01']", "/typed", "--count"], res)
    assert iso.stdout.strip() == "3" and "as the DICOM date 19900101" in iso.stderr
    age = _run(["dgf_find", "/DicomHeader[PatientAge >= '030Y']", "/typed"], res)
    assert age.returncode == 2 and "number(substring(PatientAge, 1, 3))" in age.stderr
    func = _run(["dgf_find", "/DicomHeader[StudyDate > date('2010-01-01')]", "/typed"], res)
    assert func.returncode == 2 and func.stderr.startswith("dgf_find: date() is not an XPath 1.0 function")
