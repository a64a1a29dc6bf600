"""The layers hold (issue 16): the servers never import the client side, and the shared core
(errors, types, wire, crypto, config, limits, integrity, the DICOM code) imports neither the
client side nor a server.  Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = {"dgf.client", "dgf.cli", "dgf.fuse", "dgf.reader", "dgf.transport", "dgf.local", "dgf.fsck", "dgf.mux"}
SERVERS = ("metaserver", "ioserver")
CORE = ["dgf/errors.py", "dgf/types.py", "dgf/wire.py", "dgf/crypto.py", "dgf/config.py", "dgf/limits.py",
        "dgf/integrity.py", "dgf/placement.py", "dgf/conebeam.py", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "dgf/dicom").glob("*.py"))]


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _offending(files: list[Path], forbidden: set[str], prefixes: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for f in files:
        for name in sorted(_imports(f)):
            if name in forbidden or name.startswith(prefixes):
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    return bad


def test_servers_never_import_the_client_side() -> None:
    files = [p for server in SERVERS for p in sorted((ROOT / server).rglob("*.py"))]
    assert len(files) > 10
    assert _offending(files, CLIENT) == []


def test_the_core_imports_no_client_and_no_server() -> None:
    files = [ROOT / f for f in CORE]
    assert all(f.exists() for f in files)
    assert _offending(files, CLIENT, tuple(f"{s}." for s in SERVERS) + SERVERS) == []


def _fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet); its stdout."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_upload_imports_neither_pydicom_nor_numpy() -> None:
    """De-identifying and uploading needs pydicom's dictionary only (dgf.dicom.dictionary): its
    package (numpy, requests, pixel plugins: 0.18 s of CPU) stays out of dgf_up."""
    out = _fresh("import sys; import dgf.cli, dgf.client, dgf.upload, dgf.dicom.pipeline, dgf.dicom.validate; "
                 "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydicom', 'numpy', 'lxml')))")
    assert out.strip() == "['pydicom._dicom_dict']"      # the table alone, not its package


def test_a_site_derives_headers_without_pydicom_until_a_text_needs_its_charsets() -> None:
    """A site checks objects and derives their XML headers with dgf.dicom alone: pydicom's package
    (0.3 s of CPU on a site's first upload) comes only for text in a character set beyond ASCII,
    and then reads it as before (the header of a French Latin-1 file keeps its accents)."""
    import pydicom
    from pydicom.data import get_testdata_file

    plain = get_testdata_file("CT_small.dcm", download=False)
    french = Path(pydicom.__file__).parent / "data" / "charset_files" / "chrFren.dcm"
    assert plain is not None and french.exists()
    out = _fresh("import sys; import ioserver.server; from dgf.dicom import raw, validate; "
                 "from dgf.dicom.xmlheader import header_xml; "
                 f"x = header_xml(open({str(plain)!r}, 'rb').read()); "
                 "print(sorted(m for m in sys.modules if m.startswith('pydicom')), len(x) > 20000); "
                 f"y = header_xml(open({str(french)!r}, 'rb').read()).decode(); "
                 "print('pydicom.charset' in sys.modules, 'Buc^J\u00e9r\u00f4me' in y)")
    assert out.split("\n")[:2] == ["['pydicom._dicom_dict'] True", "True True"]


def test_the_standalone_dictionary_is_pydicoms() -> None:
    """Loaded alone, the table is the very one pydicom uses once imported: held once."""
    out = _fresh("import sys; import dgf.dicom.dictionary as d; alone = 'pydicom' not in sys.modules; "
                 "from pydicom import datadict; "
                 "print(alone, d._source.__name__, d.DicomDictionary is datadict.DicomDictionary, "
                 "d.RepeatersDictionary is datadict.RepeatersDictionary, len(d.DicomDictionary) > 4000)")
    assert out.split() == ["True", "pydicom._dicom_dict", "True", "True", "True"]


def test_a_command_that_moves_no_object_imports_no_upload_or_reconstruction() -> None:
    """ls, stat and find import the client facade only: the upload, reconstruction and
    de-identification profile modules come with the first use (8 ms of CPU per command)."""
    out = _fresh("import sys; import dgf.cli, dgf.client; "
                 "print(sorted(m for m in ('dgf.upload', 'dgf.reconstruct', 'dgf.dicom.profile', 'dgf.download', "
                 "'dgf.reader') if m in sys.modules)); "
                 "from dgf.client import BATCH, ReconResult; print(BATCH, ReconResult.__module__)")
    assert out.split("\n")[:2] == ["[]", "200 dgf.reconstruct"]
