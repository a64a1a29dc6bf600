"""Writers cannot use the archive as a re-identification oracle (issue 13): pseudonyms and date
shifts are issued only to roles that may see identity, at a bounded rate, and every issuance
is audited without the patients' own IDs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dgf import crypto, errors, local
from dgf.client import Client
from tests import corpus


def test_pseudonyms_go_only_to_uploaders_at_a_bounded_rate_and_are_audited(tmp_path: Path) -> None:
    fed = local.up(tmp_path / "fed", limits={"pseudonyms_per_minute": "5"})
    try:
        guesses = [f"PAT-{i:04d}" for i in range(3)]
        for who in ("admin", "researcher"):
            with Client(fed.config(who)) as c:
                with pytest.raises(errors.PermissionDenied, match="may not call 'up.prepare'"):
                    c.meta.call("up.prepare", uids=[], patients=guesses)
        with Client(fed.config("clinician")) as c:
            got = c.meta.call("up.prepare", uids=[], patients=guesses)[0]["patients"]
            assert sorted(got) == guesses
            with pytest.raises(errors.LimitExceeded, match="pseudonyms_per_minute"):
                c.meta.call("up.prepare", uids=[], patients=[f"PAT-{i:04d}" for i in range(10, 13)])
            # An upload within the rate still works (one patient).
            assert c.upload([corpus.file("CT_small.dcm")], to="/rate").uploaded == 1
        with Client(fed.config("admin")) as admin:
            log = [e for e in admin.audit_log(100) if e["action"] == "pseudonym.issue"]
        assert [e["principal"] for e in log].count("clinician") >= 3
        assert any(e["outcome"] == "refused" for e in log)
        text = repr(log)
        assert not any(g in text for g in guesses) and "PAT-0010" not in text       # IDs never logged
        assert got[guesses[0]][0] in text                                            # pseudonyms are
    finally:
        local.down(fed.root, quiet=True)


# -- hostile writers: what a tampered client sends ---------------------------------------------

import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import pydicom  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st
from pydicom.dataset import Dataset  # noqa: E402

from dgf.dicom import identity  # noqa: E402
from dgf.dicom.xmlheader import header_xml  # noqa: E402
from dgf.transport import PutItem  # noqa: E402
from dgf.types import Site  # noqa: E402
from ioserver.store import object_path

TOKEN = "ZQXJVWKD"        # an "identifier" that appears in no corpus file
_CLEAN: dict[str, bytes] = {}     # one de-identified file, made once for the property test


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.Federation]:
    fed = local.up(tmp_path_factory.mktemp("hostile-writers") / "fed")
    with Client(fed.config("admin")) as admin:
        admin.mkdir("/hostile")
        admin.meta.call("admin.replicas.set", path="/hostile", copies=1)
    yield fed
    local.down(fed.root, quiet=True)


def _deidentified(fed: local.Federation, tmp_path: Path) -> bytes:
    """A file the archive de-identified, as a tampered client would start from."""
    with Client(fed.config("clinician")) as c:
        c.upload(corpus.fresh_instances(tmp_path / "src", 1), to="/hostile/src")
        path = c.ls("/hostile/src")[-1].path
        return c.read_file(path)


#: The batch receipts the site signed for _raw_put (REF -> token), which a commit carries.
TOKENS: dict[str, str] = {}


def _raw_put(c: Client, data: bytes) -> tuple[str, str | None, str | None]:
    """Put ``data`` on a site directly, as a client that skips de-identification would."""
    prep = c.meta.call("up.prepare", uids=[], patients=[])[0]
    site = sorted(prep["caps"])[0]
    c._learn_sites([Site.from_wire(s) for s in prep["sites"]])
    got: list[tuple[str | None, str | None]] = []
    c.site_link(site).put_many([PutItem(hashlib.sha256(data).hexdigest(), data, want_header=True)],
                               prep["caps"][site], lambda item, receipt, error: got.append((receipt, error)), TOKENS)
    return site, got[0][0], got[0][1]


def _stored(fed: local.Federation, data: bytes | str) -> bool:
    key = data if isinstance(data, str) else hashlib.sha256(data).hexdigest()
    return any(object_path(fed.root / f"store-{s}", key).exists() for s in fed.sites)


def _commit(c: Client, site: str, receipt: str, data: bytes, xml: str, path: str, binary: bool = False,
            **wire: Any) -> None:
    """Commit one file as a tampered client would; ``binary``: its header as bytes after the
    JSON (``xml_sizes``), as dgf_up sends it, else as the entry's JSON string."""
    entry = {"path": path, "key": hashlib.sha256(data).hexdigest(), "size": len(data), "site": site,
             "receipt": receipt, "patient": None, "copies": [], "identity": None,
             "derived_from": None, "blocks": "", "xattrs": {}}
    if not binary:
        c.meta.call("up.commit", json.dumps({"files": [{**entry, "xml": xml}], "receipts": TOKENS}).encode())
        return
    header = xml.encode()
    c.meta.call("up.commit", json.dumps({"files": [entry], "receipts": TOKENS}).encode() + header,
                **{"xml_sizes": [len(header)], **wire})


def _visible(fed: local.Federation, text: str) -> bool:
    """Can a researcher see ``text`` anywhere: a header, a query, a downloaded object?"""
    with Client(fed.config("researcher")) as r:
        rows = r.find(f"//*[contains(., '{text}')]", "/hostile")
        if rows:
            return True
        out = r.download(["/hostile"], fed.root / "researcher-view")
    assert not out.failed
    return any(text.encode() in p.read_bytes() for p in (fed.root / "researcher-view").rglob("*.dcm"))


def test_a_raw_identified_file_is_refused_by_the_site(hostile: local.Federation) -> None:
    original = corpus.file("CT_small.dcm").read_bytes()
    with Client(hostile.config("clinician")) as c:
        _, receipt, error = _raw_put(c, original)
    assert receipt is None and error is not None
    assert "not de-identified by this archive's profile" in error and "Patient Identity Removed" in error
    assert not _stored(hostile, original)                     # nothing of it stays on the site


def test_an_empty_commit_publishes_nothing_and_breaks_nothing(hostile: local.Federation) -> None:
    # A client may commit no files at all (its whole batch failed, or it is probing): the
    # answer is "none created", not an internal error from an INSERT with no rows.
    with Client(hostile.config("clinician")) as c:
        reply, _ = c.meta.call("up.commit", json.dumps({"files": [], "receipts": {}}).encode())
        assert reply["created"] == 0
        reply, _ = c.meta.call("up.commit", json.dumps({"files": []}).encode(), xml_sizes=[])
        assert reply["created"] == 0
        assert c.stat("/").is_dir


def test_a_forged_header_is_refused_by_the_metaserver(hostile: local.Federation, tmp_path: Path) -> None:
    clean = _deidentified(hostile, tmp_path)
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(clean))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25." + str(int(hashlib.sha256(b"x").hexdigest()[:30], 16))
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    with Client(hostile.config("clinician")) as c:
        site, receipt, error = _raw_put(c, data)
        assert receipt is not None, error                      # de-identified: the site takes it
        forged = header_xml(data).decode().replace("</DicomHeader>", f"<PatientAddress>{TOKEN}</PatientAddress>"
                                                                      "</DicomHeader>")
        for binary in (False, True):
            with pytest.raises(errors.PermissionDenied, match="not the one site"):
                _commit(c, site, receipt, data, forged, "/hostile/forged.dcm", binary)
        # Header sizes that do not fit the payload, or one per file, are refused by name.
        honest = header_xml(data).decode()
        for sizes, why in (([len(honest) + 10**6], "do not fit its payload"), ([-1], "do not fit"),
                           ([1, len(honest) - 1], "1 files but 2 xml_sizes"), ([True], "do not fit")):
            with pytest.raises(errors.UsageError, match=why):
                _commit(c, site, receipt, data, honest, "/hostile/forged.dcm", True, xml_sizes=sizes)
        with pytest.raises(errors.LimitExceeded, match="list_items"):
            _commit(c, site, receipt, data, honest, "/hostile/forged.dcm", True, xml_sizes=[0] * 10_001)
        # A size that moves the split between JSON and header: the JSON no longer parses.
        with pytest.raises(errors.UsageError, match="not a valid batch"):
            _commit(c, site, receipt, data, honest, "/hostile/forged.dcm", True, xml_sizes=[len(honest) + 3])
        # A receipt said to be another principal's, or an unenrolled site's: no site key signs it.
        for claimed in ("clinician", "site-z"):
            with pytest.raises(errors.UsageError, match="unknown site"):
                _commit(c, claimed, receipt, data, honest, "/hostile/forged.dcm", True)
        with pytest.raises(errors.NotFound):
            c.stat("/hostile/forged.dcm")
        _commit(c, site, receipt, data, honest, "/hostile/honest.dcm", True)        # the site's own
        assert c.getxattr("/hostile/honest.dcm", "user.dgf.dicom") == honest.encode()
    assert not _visible(hostile, TOKEN)


def test_a_commit_sets_no_attribute_beside_the_header_its_site_derived(hostile: local.Federation,
                                                                       tmp_path: Path) -> None:
    """The header checked by the site could be overridden through the entry's ``xattrs`` (a forged
    ``user.dgf.dicom`` was published and indexed), as could reserved or non-user attributes.  A
    commit now sets none but a derived file's provenance: everything else is refused by name,
    nothing is published, and the honest commit that follows carries the site's header."""
    data = _deidentified(hostile, tmp_path)
    honest = header_xml(data).decode()
    forged = honest.replace("</DicomHeader>", f"<PatientAddress>{TOKEN}</PatientAddress></DicomHeader>")
    with Client(hostile.config("clinician")) as c:
        site, receipt, error = _raw_put(c, data)
        assert receipt is not None, error
        entry = {"path": "/hostile/attrs.dcm", "key": hashlib.sha256(data).hexdigest(), "size": len(data),
                 "site": site, "receipt": receipt, "patient": None, "copies": [], "identity": None,
                 "derived_from": None, "blocks": "", "xml": honest}
        for attrs in ({"user.dgf.dicom": forged}, {"user.dgf.replicas": "9"}, {"trusted.x": TOKEN},
                      {"user.note": TOKEN}, {"user.dgf.provenance": "{}"}):
            with pytest.raises(errors.PermissionDenied, match=f"sets the attribute '{next(iter(attrs))}'"):
                c.meta.call("up.commit", json.dumps({"files": [{**entry, "xattrs": attrs}],
                                                     "receipts": TOKENS}).encode())
            with pytest.raises(errors.NotFound):
                c.stat("/hostile/attrs.dcm")
        c.meta.call("up.commit", json.dumps({"files": [{**entry, "xattrs": {}}], "receipts": TOKENS}).encode())
        assert c.getxattr("/hostile/attrs.dcm", "user.dgf.dicom") == honest.encode()
        assert c.listxattr("/hostile/attrs.dcm") == ["user.dgf.dicom"]
    assert not _visible(hostile, TOKEN)


def test_malformed_commit_entries_are_refused_by_name_within_seconds(hostile: local.Federation,
                                                                     tmp_path: Path) -> None:
    """Each field of a commit entry is checked before the commit is used: a wrong type was an
    internal error (KeyError, TypeError), and a relative path sent the metaserver's thread into
    an endless loop (the client gave up after 30 s; the thread spun on)."""
    data = _deidentified(hostile, tmp_path)
    with Client(hostile.config("clinician")) as c:
        site, receipt, error = _raw_put(c, data)
        assert receipt is not None, error
        entry = {"path": "/hostile/shape.dcm", "key": hashlib.sha256(data).hexdigest(), "size": len(data),
                 "site": site, "receipt": receipt, "patient": None, "copies": [], "identity": None,
                 "derived_from": None, "blocks": "", "xattrs": {}, "xml": header_xml(data).decode()}
        cases: list[tuple[dict[str, Any], type[errors.DgfError], str]] = [
            ({"path": "hostile/shape.dcm"}, errors.UsageError, "namespace paths are absolute"),
            ({"path": "/"}, errors.UsageError, "names the root directory"),
            ({"path": None}, errors.UsageError, "its 'path' is not a string"),
            ({"size": "12"}, errors.UsageError, "its 'size' is not an integer"),
            ({"size": True}, errors.UsageError, "its 'size' is not an integer"),
            ({"key": "x" * 64}, errors.UsageError, "64 hex digits"),
            ({"site": ["a"]}, errors.UsageError, "its 'site' is not a string"),
            ({"copies": "site-b"}, errors.UsageError, "its 'copies' is not a list or null"),
            ({"copies": ["site-b"]}, errors.UsageError, "lists a copy that is not a site and a receipt"),
            ({"identity": "!!", "patient": "p"}, errors.UsageError, "its 'identity' is not base64"),
            ({"identity": "AAAA"}, errors.UsageError, "an identity record but no patient"),
            ({"blocks": 5}, errors.UsageError, "its 'blocks' is not a string or null"),
            ({"xattrs": "x"}, errors.UsageError, "its 'xattrs' is not an object or null"),
        ]
        for change, kind, why in cases:
            bad = {**entry, **change}
            t = time.monotonic()
            with pytest.raises(kind, match=re.escape(why)):
                c.meta.call("up.commit", json.dumps({"files": [entry | {"path": "/hostile/ok-first.dcm"}, bad],
                                                     "receipts": TOKENS}).encode())
            assert time.monotonic() - t < 10, change
        for what in ("/hostile/shape.dcm", "/hostile/ok-first.dcm"):      # nothing of any of them
            with pytest.raises(errors.NotFound):
                c.stat(what)
        # A file and, below it, another file in one commit: named, whichever comes first.
        for order in (1, -1):
            pair = [entry | {"path": "/hostile/new/x"}, entry | {"path": "/hostile/new/x/y.dcm"}][::order]
            with pytest.raises(errors.NotADirectory, match="both a file and a directory in this commit"):
                c.meta.call("up.commit", json.dumps({"files": pair, "receipts": TOKENS}).encode())
        with pytest.raises(errors.NotFound):
            c.stat("/hostile/new")
        c.meta.call("up.commit", json.dumps({"files": [entry], "receipts": TOKENS}).encode())
        assert c.stat("/hostile/shape.dcm").size == len(data)


def test_a_refused_commit_leaves_no_patient_key_in_the_vault(hostile: local.Federation, tmp_path: Path) -> None:
    """Patient data keys were made before a commit's entries were checked, so a writer could
    fill the vault with keys of made-up patients by sending commits it knew would be refused.
    Keys are now made only for a commit every entry of which passed."""
    import sqlite3

    data = _deidentified(hostile, tmp_path)
    record = base64.b64encode(identity.encode({"v": 2, "original_size": len(data), "delta": []})).decode()
    with Client(hostile.config("clinician")) as c:
        site, receipt, error = _raw_put(c, data)
        assert receipt is not None, error
        entry = {"path": "/hostile/keyed.dcm", "key": hashlib.sha256(data).hexdigest(), "size": len(data),
                 "site": site, "receipt": receipt, "patient": "PSEUDO-KEYED", "copies": [], "identity": record,
                 "derived_from": None, "blocks": "", "xattrs": {}, "xml": header_xml(data).decode()}
        refused = [entry | {"path": "/hostile/refused-1.dcm", "patient": "PSEUDO-REFUSED-1"},
                   entry | {"path": "/hostile/refused-2.dcm", "patient": "PSEUDO-REFUSED-2", "receipt": "forged"}]
        with pytest.raises(errors.PermissionDenied):
            c.meta.call("up.commit", json.dumps({"files": refused, "receipts": TOKENS}).encode())
        c.meta.call("up.commit", json.dumps({"files": [entry], "receipts": TOKENS}).encode())
        assert c.stat("/hostile/keyed.dcm").size == len(data)
    with sqlite3.connect(hostile.root / "metadata.db", timeout=30) as db:
        held = {row[0] for row in db.execute("SELECT pseudonym FROM vault_patients WHERE pseudonym LIKE 'PSEUDO-%'")}
    assert held == {"PSEUDO-KEYED"}


def _identity_bomb(mib: int) -> bytes:
    """An identity record of ~``mib`` KB that inflates to ``mib`` MiB of JSON."""
    comp = zlib.compressobj(1)
    chunk = b"A" * (1 << 20)
    parts = [comp.compress(b'{"v":2,"original_size":1,"delta":["')]
    parts += [comp.compress(chunk) for _ in range(mib)]
    return b"".join(parts) + comp.compress(b'"]}') + comp.flush()


def test_decompression_bombs_cost_bounded_memory(hostile: local.Federation, tmp_path: Path) -> None:
    """A deflated DICOM dataset and an identity record are inflated by whoever parses them:
    ~0.5 MB of either used to claim 0.3-1 GB of a site's or the metaserver's memory."""
    from tests.test_hostile import SERVER_RSS_BOUND, _peak_rss

    pids = local.pids(hostile.root)
    bomb = corpus.deflate_bomb(512)                     # 0.5 MB inflating to 512 MiB
    with Client(hostile.config("clinician")) as c:
        site, receipt, error = _raw_put(c, bomb)       # a writer that skips the uploader
        assert receipt is None and error is not None
        assert "inflates to more than 134217728 bytes" in error
        assert not _stored(hostile, bomb)
        (tmp_path / "bomb.dcm").write_bytes(bomb)
        report = c.upload([tmp_path / "bomb.dcm"], to="/hostile/bombs")
        assert report.uploaded == 0 and "inflates to more than" in report.failed[0].reason
        # An identity record of 0.3 MB that inflates to 320 MiB: only its head is read.
        data = _deidentified(hostile, tmp_path)
        site, receipt, error = _raw_put(c, data)
        assert receipt is not None, error
        entry = {"path": "/hostile/bombed.dcm", "key": hashlib.sha256(data).hexdigest(), "size": len(data),
                 "site": site, "receipt": receipt, "patient": "PSEUDO-BOMB", "copies": [],
                 "identity": base64.b64encode(_identity_bomb(320)).decode(), "derived_from": None,
                 "blocks": "", "xattrs": {}, "xml": header_xml(data).decode()}
        c.meta.call("up.commit", json.dumps({"files": [entry], "receipts": TOKENS}).encode())
        assert c.stat("/hostile/bombed.dcm").size == len(data)
        # A real file whose profile removes 100 MiB (Data Set Trailing Padding): its record
        # inflates past identity_bytes (64 MiB), and is taken and restores the exact original.
        padded = corpus.pad(corpus.fresh_instances(tmp_path / "padded", 1)[0], 100)
        report = c.upload([padded], to="/hostile/padded")
        assert report.uploaded == 1, report.failed
        [stored] = c.ls("/hostile/padded")
        assert stored.size < 1 << 20                                      # the padding went
        got = c.read_file(stored.path, identified=True)
        assert hashlib.sha256(got).digest() == hashlib.sha256(padded.read_bytes()).digest()
    for name in ("metaserver", site):
        assert _peak_rss(pids[name]) < SERVER_RSS_BOUND, name
    with Client(hostile.config("researcher")) as r:              # both still serve
        assert r.ls("/hostile/src")


def test_a_batch_receipt_vouches_only_for_its_own_objects(hostile: local.Federation, tmp_path: Path) -> None:
    """A put.batch's objects share one signed receipt; a commit cannot make it vouch for
    another object, another site, or claims the site did not sign."""
    clean = _deidentified(hostile, tmp_path)
    datas = []
    for n in (1, 2):
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(clean))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.{7700 + n}"
        buf = pydicom.filebase.DicomBytesIO()
        ds.save_as(buf, enforce_file_format=True)
        datas.append(buf.getvalue())
    with Client(hostile.config("clinician")) as c:
        prep = c.meta.call("up.prepare", uids=[], patients=[])[0]
        site = sorted(prep["caps"])[0]
        c._learn_sites([Site.from_wire(s) for s in prep["sites"]])
        tokens: dict[str, str] = {}
        got: list[str | None] = []
        # The uploader asks for the header of the copy it publishes (object 0) only.
        items = [PutItem(hashlib.sha256(d).hexdigest(), d, want_header=(n == 0)) for n, d in enumerate(datas)]
        c.site_link(site).put_many(items, prep["caps"][site], lambda item, receipt, error: got.append(receipt),
                                   tokens)
        assert len(tokens) == 1 and all(r is not None and r.startswith(next(iter(tokens)) + "#") for r in got)
        ref = next(iter(tokens))
        first = {r.partition("#")[2]: r for r in got if r}
        assert items[0].header == header_xml(datas[0]) and items[1].header == b""
        body = tokens[ref].split(".")[0]
        signed = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["objs"]
        assert signed[0][3] == hashlib.sha256(items[0].header).hexdigest() and signed[1][3] == ""
        entry = {"path": "/hostile/batch-0.dcm", "key": hashlib.sha256(datas[0]).hexdigest(), "size": len(datas[0]),
                 "site": site, "receipt": first["1"], "xml": header_xml(datas[0]).decode(), "patient": None,
                 "copies": [], "identity": None, "derived_from": None, "blocks": "", "xattrs": {}}

        def commit(receipts: dict[str, str], **change: object) -> None:
            c.meta.call("up.commit", json.dumps({"files": [{**entry, **change}], "receipts": receipts}).encode())

        with pytest.raises(errors.PermissionDenied, match="does not match its object"):
            commit(tokens)                                           # object 1's entry for object 0
        for index in ("7", "\u00b2", "-1", ""):                      # out of range, not ASCII digits
            with pytest.raises(errors.PermissionDenied, match="names no object of its batch"):
                commit(tokens, receipt=ref + "#" + index)
        with pytest.raises(errors.UsageError, match="its 'receipt' is not a string"):
            commit(tokens, receipt=[ref, 0])
        with pytest.raises(errors.PermissionDenied, match="does not carry"):
            commit({})
        body, sig = tokens[ref].split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        claims["objs"][1][0] = entry["key"]                          # vouch for object 0 unsigned
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=") + "." + sig
        with pytest.raises(errors.PermissionDenied, match="invalid signature"):
            commit({ref: forged})
        other = next(s for s in hostile.sites if s != site)
        with pytest.raises(errors.PermissionDenied, match="invalid signature"):
            commit(tokens, receipt=first["0"], site=other)           # site A's receipt as site B's
        # Object 1 was checked but its header not derived: it cannot be the published copy.
        with pytest.raises(errors.PermissionDenied, match="not the one site"):
            commit(tokens, path="/hostile/batch-1.dcm", key=hashlib.sha256(datas[1]).hexdigest(),
                   size=len(datas[1]), xml=header_xml(datas[1]).decode())
        # A receipt kept for later (its bytes may have been deleted since) is refused: here the
        # site's own signature on generations two hours old.
        stale = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        stale["gens"] = [g - 2 * 3600 * 10**9 for g in stale["gens"]]
        kept = crypto.sign_token(crypto.load_signing_key(hostile.root / "keys" / site), stale)
        with pytest.raises(errors.PermissionDenied, match=r"signed 2\.0 h ago; a receipt is good for 1 h"):
            commit({ref: kept}, receipt=first["0"])
        with pytest.raises(errors.NotFound):
            c.stat("/hostile/batch-0.dcm")
        commit(tokens, receipt=first["0"])                          # its own entry: published
        assert c.stat("/hostile/batch-0.dcm").size == len(datas[0])
        # Removed, its bytes deleted at the site: the receipt, replayed, brings back no name.
        c.rm("/hostile/batch-0.dcm")
        assert not _stored(hostile, datas[0])
        with pytest.raises(errors.PermissionDenied, match="deleted since it was signed"):
            commit(tokens, receipt=first["0"], path="/hostile/replayed.dcm")
        with pytest.raises(errors.NotFound):
            c.stat("/hostile/replayed.dcm")


PLANTS = [
    ("PatientName", lambda ds, t: setattr(ds, "PatientName", f"{t}^JOHN")),
    ("PatientID", lambda ds, t: setattr(ds, "PatientID", t)),
    ("OtherPatientIDs", lambda ds, t: setattr(ds, "OtherPatientIDs", t)),
    ("PatientAddress", lambda ds, t: setattr(ds, "PatientAddress", f"1 {t} Street")),
    ("InstitutionName", lambda ds, t: setattr(ds, "InstitutionName", f"{t} Hospital")),
    ("ReferringPhysicianName", lambda ds, t: setattr(ds, "ReferringPhysicianName", t)),
    ("AccessionNumber", lambda ds, t: setattr(ds, "AccessionNumber", t)),
    ("private", lambda ds, t: (ds.private_block(0x0041, "ACME", create=True).add_new(0x01, "LO", t))),
    ("nested", lambda ds, t: setattr(ds, "RequestAttributesSequence", [Dataset()]) or
     setattr(ds.RequestAttributesSequence[0], "RequestedProcedureID", t)),
    ("StudyUID", lambda ds, t: setattr(ds, "StudyInstanceUID", "1.2.840.113619." + str(sum(map(ord, t))))),
    ("marker", lambda ds, t: (setattr(ds, "PatientIdentityRemoved", "NO"), setattr(ds, "PatientComments", t))),
]


@settings(max_examples=len(PLANTS) * 2, deadline=None, suppress_health_check=list(HealthCheck))
@given(plant=st.sampled_from(PLANTS), token=st.text(alphabet="ABCDEFGHJKMNPQRSTVWXYZ", min_size=6, max_size=10))
def test_identifiers_planted_by_a_hostile_writer_never_reach_a_researcher(
        hostile: local.Federation, tmp_path_factory: pytest.TempPathFactory, plant: tuple[str, Any],
        token: str) -> None:
    """A hostile writer plants an identifier in a de-identified file (a name, an ID, an address,
    a private or nested element, a UID from the hospital's root, a marker turned off) and puts it
    on a site itself: the site refuses it, and the token is nowhere a researcher can look."""
    if "clean" not in _CLEAN:
        _CLEAN["clean"] = _deidentified(hostile, tmp_path_factory.mktemp("clean"))
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_CLEAN["clean"]))
    plant[1](ds, token)
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    with Client(hostile.config("clinician")) as c:
        site, receipt, error = _raw_put(c, data)
        assert receipt is None and error and "not de-identified" in error, (plant[0], error)
    assert not _stored(hostile, data)
    assert not _visible(hostile, token)


def test_erasing_a_patient_removes_their_files_objects_and_identity(tmp_path: Path) -> None:
    fed = local.up(tmp_path / "fed")
    try:
        with Client(fed.config("clinician")) as c:
            c.upload(corpus.fresh_instances(tmp_path / "a", 2), to="/erase/a")       # one patient
            c.upload([corpus.file("MR_small.dcm")], to="/erase/b")                   # another
            rows = c.find("/DicomHeader", "/erase", show=["PatientID"])
            doomed = {r["values"]["PatientID"] for r in rows if r["path"].startswith("/erase/a/")}
            assert len(doomed) == 1
            patient = doomed.pop()
            keys = [c.stat(st.path).object_key or "" for st in c.ls("/erase/a")]
            kept = c.ls("/erase/b")[0].path
        assert all(_stored(fed, k) for k in keys)
        def erase(who: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(Path(sys.executable).parent / "dgf"), "admin", "erase", patient, "--yes"],
                                  capture_output=True, text=True, env={**os.environ, "DGF_CONFIG": str(fed.config(who))})

        refused = erase("researcher")
        assert refused.returncode != 0 and "may not call 'admin.erase'" in refused.stderr
        done = erase("admin")
        assert done.returncode == 0 and "2 file(s) removed" in done.stdout, done.stdout + done.stderr
        with Client(fed.config("clinician")) as c:
            assert c.find(f"/DicomHeader[PatientID='{patient}']") == []
            assert c.ls("/erase/a") == []
            assert len(c.read_file(kept, identified=True)) > 0                      # the other patient stays
        assert not any(_stored(fed, k) for k in keys)                               # bytes gone from the sites
        with Client(fed.config("admin")) as admin:
            assert any(e["action"] == "patient.erase" and e["target"] == patient for e in admin.audit_log(30))
    finally:
        local.down(fed.root, quiet=True)
