"""Replicas: how many copies, where, and what the metaserver accepts (issue 14)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from pydicom.uid import generate_uid

from dgf import errors, local, placement
from dgf.client import Client
from tests import corpus


def test_placement_rules() -> None:
    overrides = {"/a": 3, "/a/b/c": 1}
    assert placement.factor("/x.dcm", 2, overrides) == 2
    assert placement.factor("/a/x.dcm", 2, overrides) == 3
    assert placement.factor("/a/b/x.dcm", 2, overrides) == 3           # inherited from /a
    assert placement.factor("/a/b/c/d/x.dcm", 2, overrides) == 1
    assert placement.default_factor(1) == 1 and placement.default_factor(3) == 2
    sites = ["s3", "s1", "s2"]
    for basis in ("1.2.3", "4.5.6", "7.8.9"):
        two = placement.choose(basis, sites, 2)
        assert len(set(two)) == 2 and set(two) <= set(sites)
        assert placement.choose(basis, sites, 2) == two                 # deterministic
    assert placement.choose("x", sites, 2, first="s3") == ["s3", "s1"]   # the named site first
    assert len(placement.choose("x", sites, 5)) == 3                   # never twice on one site


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.Federation]:
    fed = local.up(tmp_path_factory.mktemp("three") / "fed", sites=("site-a", "site-b", "site-c"))
    yield fed
    local.down(fed.root, quiet=True)


def _fresh(tmp: Path, n: int) -> list[Path]:
    """``n`` real CT files, each its own instance and series (nothing is a link to another)."""
    out = []
    for i in range(n):
        ds = pydicom.dcmread(corpus.file("CT_small.dcm"))
        ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.save_as(tmp / f"f{i}.dcm")
        out.append(tmp / f"f{i}.dcm")
    return out


def _stored(fed: local.Federation, key: str) -> list[str]:
    return [site for site in fed.sites
            if (fed.root / f"store-{site}" / "objects" / key[:2] / key[2:4] / key).is_file()]


def test_copies_per_directory_on_distinct_sites(three: local.Federation, tmp_path: Path) -> None:
    with Client(three.config("admin")) as admin:
        for d in ("/one", "/all"):
            admin.mkdir(d)
        assert admin.meta.call("replicas.get", path="/")[0]["copies"] == 2     # the default
        admin.meta.call("admin.replicas.set", path="/one", copies=1)
        admin.meta.call("admin.replicas.set", path="/all", copies=3)
        with pytest.raises(errors.UsageError, match="between 1 and the number of sites"):
            admin.meta.call("admin.replicas.set", path="/all", copies=4)
        admin.mkdir("/all/deeper")
        inherited = admin.meta.call("replicas.get", path="/all/deeper")[0]
        assert inherited["copies"] == 3 and inherited["set_at"] == "/all"
        assert any(e["action"] == "replicas.set" and e["target"] == "/all" for e in admin.audit_log(20))
    with Client(three.config("clinician")) as c:
        for where, n in (("/default", 2), ("/one", 1), ("/all/deeper", 3)):
            (tmp_path / where.replace("/", "_")).mkdir()
            files = _fresh(tmp_path / where.replace("/", "_"), 6)
            report = c.upload(files, to=where)
            assert report.uploaded == len(files) and not report.failed
            for st in c.ls(where):
                sites = [s for s, state in c.stat(st.path).replicas if state == "ok"]
                assert len(sites) == n and sorted(sites) == sorted(_stored(three, st.object_key or ""))
        # Over the series, copies land on every site.
        used = {s for st in c.ls("/default") for s, _ in c.stat(st.path).replicas}
        assert len(used) >= 2
    with Client(three.config("researcher")) as r:
        with pytest.raises(errors.PermissionDenied):
            r.meta.call("admin.replicas.set", path="/one", copies=2)


def test_the_metaserver_publishes_only_fully_replicated_uploads(three: local.Federation, tmp_path: Path) -> None:
    """A writer that stores one copy and commits it is refused: the directory keeps two."""
    with Client(three.config("clinician")) as c:
        sent: list[bytes] = []
        original = c.meta.call

        def strip_copies(verb: str, payload: bytes = b"", wait_s: float | None = None, **args: object):  # type: ignore[no-untyped-def]
            if verb == "up.commit":
                batch = json.loads(payload)
                for f in batch["files"]:
                    f["copies"] = []
                payload = json.dumps(batch).encode()
                sent.append(payload)
            return original(verb, payload, wait_s, **args)

        c.meta.call = strip_copies  # type: ignore[method-assign]
        with pytest.raises(errors.UsageError, match="has 1 durable copy; its directory keeps 2"):
            c.upload(_fresh(tmp_path, 1), to="/forged")
        assert sent
        c.meta.call = original  # type: ignore[method-assign]
        with pytest.raises(errors.NotFound):
            c.stat("/forged")
        # A copy claimed twice at one site is one copy.
        batch = json.loads(sent[0])
        f = batch["files"][0]
        f["copies"] = [{"site": f["site"], "receipt": f["receipt"]}]
        with pytest.raises(errors.UsageError, match="has 1 durable copy"):
            c.meta.call("up.commit", json.dumps(batch).encode())
        # A receipt of one site presented as another's is refused.
        other = next(s for s in three.sites if s != f["site"])
        f["copies"] = [{"site": other, "receipt": f["receipt"]}]
        with pytest.raises(errors.PermissionDenied):
            c.meta.call("up.commit", json.dumps(batch).encode())
        assert base64.b64decode(f["blocks"]) == b"" or f["size"] > 0


def test_a_directory_wanting_more_copies_than_sites_fails_by_name(tmp_path: Path) -> None:
    fed = local.up(tmp_path / "fed", sites=("site-a",))
    try:
        with Client(fed.config("clinician")) as c:
            report = c.upload([corpus.file("CT_small.dcm")], to="/solo")
            assert report.uploaded == 1                                   # one site: one copy
            assert [s for s, _ in c.stat(c.ls("/solo")[0].path).replicas] == ["site-a"]
    finally:
        local.down(fed.root, quiet=True)
