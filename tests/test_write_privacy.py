"""Writers cannot use the archive as a re-identification oracle (issue 13): pseudonyms and date
shifts are issued only to roles that may see identity, at a bounded rate, and every issuance
is audited without the patients' own IDs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgf import errors, local
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
