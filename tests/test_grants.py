"""Cohort grants (issue 13): in a grant-only archive a researcher sees, finds, downloads and
lists only the files of its unexpired grants; revocation and expiry take effect within
seconds; an open archive and other roles are unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dgf import errors, local
from dgf.client import Client
from tests import corpus


def _dgf(fed: local.Federation, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DGF_CONFIG=str(fed.config("admin")))
    return subprocess.run([str(Path(sys.executable).parent / "dgf"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def _eventually(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_a_researcher_sees_only_its_grants(tmp_path: Path) -> None:
    fed = local.up(tmp_path / "fed")
    try:
        with Client(fed.config("clinician")) as c:
            c.upload(corpus.fresh_instances(tmp_path / "ct", 2), to="/cohort/ct")
            c.upload([corpus.file("MR_small.dcm")], to="/cohort/mr")
            ct = sorted(st.path for st in c.ls("/cohort/ct"))
            mr = c.ls("/cohort/mr")[0].path
        with Client(fed.config("admin")) as admin:
            admin.save_query("lung-ct", "/DicomHeader[Modality='CT']")
        with Client(fed.config("researcher")) as r:                # open: everything
            assert len(r.find("/DicomHeader", "/cohort")) == 3
        assert "access: grants" in _dgf(fed, "admin", "access", "grants").stdout
        with Client(fed.config("researcher")) as r:
            assert r.find("/DicomHeader", "/cohort") == []           # no grant: nothing exists
            assert r.ls("/") == []
            with pytest.raises(errors.NotFound):
                r.stat(ct[0])
            assert r.download(["/cohort"], tmp_path / "none").downloaded == 0
        until = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
        added = _dgf(fed, "admin", "grant", "add", "researcher", "@lung-ct", "--until", until)
        assert added.returncode == 0, added.stderr
        gid = added.stdout.split()[1].rstrip(":")
        mine = subprocess.run([str(Path(sys.executable).parent / "dgf"), "grants"], capture_output=True, text=True,
                              env=dict(os.environ, DGF_CONFIG=str(fed.config("researcher"))))
        assert "access: grants" in mine.stdout and f"{gid}\t@lung-ct\t{until}" in mine.stdout, mine.stdout
        with Client(fed.config("admin")) as admin:                 # editing the query does not widen it
            admin.save_query("lung-ct", "/DicomHeader")
        with Client(fed.config("researcher")) as r:
            _eventually(lambda: len(r.find("/DicomHeader", "/")) == 2)
            assert sorted(x["path"] for x in r.find("/DicomHeader", "/")) == ct
            assert r.find_count("/DicomHeader", "/") == 2
            assert r.find("/DicomHeader", "/", level="series", show=["SeriesInstanceUID"]) != []
            assert [st.path for st in r.ls("/cohort")] == ["/cohort/ct"]
            assert r.getxattr(ct[0], "user.dgf.dicom").startswith(b"<DicomHeader")
            for hidden in (mr, "/cohort/mr"):
                with pytest.raises(errors.NotFound):
                    r.stat(hidden)
            with pytest.raises(errors.NotFound):
                r.getxattr(mr, "user.dgf.dicom")
            out = r.download(["/cohort"], tmp_path / "out")
            assert out.downloaded == 2 and not out.failed
            assert r.resolve([mr])["files"] == []                 # no capability for it either
        with Client(fed.config("clinician")) as c:                 # other roles are not restricted
            assert len(c.find("/DicomHeader", "/cohort")) == 3
        with Client(fed.config("researcher")) as held:             # capabilities in hand, in use
            resolved = held.resolve([ct[0]])
            _, key, _, sites = resolved["files"][0]
            link = held.site_link(sites[0])
            assert len(link.call("get", resolved["caps"][sites[0]], key=key)[1]) > 0
            assert _dgf(fed, "admin", "grant", "remove", gid).returncode == 0

            def refused_at_the_site() -> bool:
                try:
                    link.call("get", resolved["caps"][sites[0]], key=key)
                    return False
                except errors.PermissionDenied:
                    return True
            _eventually(refused_at_the_site, timeout=6)                # the site learns the revocation
        with Client(fed.config("researcher")) as r:
            _eventually(lambda: r.find("/DicomHeader", "/") == [], timeout=5)
        # A grant that ends: gone once it has.
        with Client(fed.config("admin")) as admin:
            admin.meta.call("admin.grant.add", principal="researcher", saved="@lung-ct", until=time.time() + 3)
        with Client(fed.config("researcher")) as r:
            assert len(r.find("/DicomHeader", "/")) == 3          # the query as it is now: every file
            _eventually(lambda: r.find("/DicomHeader", "/") == [], timeout=8)
        log = _dgf(fed, "admin", "audit", "--limit", "40").stdout
        assert "grant.add" in log and "grant.remove" in log and "access.mode" in log
    finally:
        local.down(fed.root, quiet=True)
