"""Data has owners (issue 13): saved queries and user.* attributes belong to the principal who
made them; others read them and cannot change them; every change is audited."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgf import crypto, errors, local
from dgf.client import Client
from dgf.config import write_section
from tests import corpus


def _second_researcher(fed: local.Federation, admin: Client, name: str) -> Path:
    """Enrol another researcher and hand it a config, as an admin does."""
    key = fed.root / "keys" / name
    if not key.exists():
        admin.principal_add(name, "researcher", crypto.generate_keypair(key, name))
    base = dict(line.split(" = ", 1) for line in fed.config("researcher").read_text().splitlines() if " = " in line)
    conf = fed.root / f"{name}.conf"
    write_section(conf, "dgf", {**base, "principal": name, "key": f"keys/{name}", "cache_dir": f"cache-{name}"})
    return conf


def test_saved_queries_belong_to_who_saved_them(federation: local.Federation, admin: Client,
                                                clinician: Client, researcher: Client) -> None:
    clinician.upload([corpus.file("CT_small.dcm")], to="/owned/q")
    # A clinician's query is its own: saved as clinician/NAME, found by @NAME for the clinician.
    assert clinician.save_query("ct-cohort", "/DicomHeader[Modality='CT']") == "clinician/ct-cohort"
    assert [r["path"] for r in clinician.find("@ct-cohort", "/owned")] == \
        [r["path"] for r in researcher.find("@clinician/ct-cohort", "/owned")]
    # The researcher cannot overwrite or remove it, neither by full name nor by its own bare name.
    with pytest.raises(errors.PermissionDenied, match="belongs to 'clinician'"):
        researcher.save_query("clinician/ct-cohort", "/DicomHeader[Modality='XX']")
    with pytest.raises(errors.PermissionDenied, match="belongs to clinician"):
        researcher.remove_query("clinician/ct-cohort")
    assert researcher.save_query("ct-cohort", "/DicomHeader[Modality='XX']") == "researcher/ct-cohort"
    assert len(clinician.find("@ct-cohort", "/owned")) == 1          # the clinician's own, unchanged
    assert researcher.find("@ct-cohort", "/owned") == []             # the researcher's own
    # A shared query is an admin's: everyone uses it, only admins change it.
    assert admin.save_query("all-ct", "/DicomHeader[Modality='CT']") == "all-ct"
    assert len(researcher.find("@all-ct", "/owned")) == 1
    with pytest.raises(errors.PermissionDenied, match="only an admin"):
        researcher.remove_query("all-ct")
    assert researcher.remove_query("ct-cohort") == "researcher/ct-cohort"
    assert admin.remove_query("clinician/ct-cohort") == "clinician/ct-cohort"     # moderation
    actions = [(e["action"], e["target"], e["principal"]) for e in admin.audit_log(50)]
    assert ("query.save", "clinician/ct-cohort", "clinician") in actions
    assert ("query.remove", "clinician/ct-cohort", "admin") in actions


def test_user_attributes_belong_to_who_set_them(federation: local.Federation, admin: Client,
                                                researcher: Client, clinician: Client) -> None:
    clinician.upload([corpus.file("MR_small.dcm")], to="/owned/x")
    path = clinician.ls("/owned/x")[0].path
    researcher.setxattr(path, "user.review", b"needs a second look")
    with Client(_second_researcher(federation, admin, "bob")) as bob:
        assert bob.getxattr(path, "user.review") == b"needs a second look"       # others read it
        with pytest.raises(errors.PermissionDenied, match="set by 'researcher'"):
            bob.setxattr(path, "user.review", b"fine")
        with pytest.raises(errors.PermissionDenied, match="set by 'researcher'"):
            bob.removexattr(path, "user.review")
        bob.setxattr(path, "user.bob-note", b"mine")
    assert researcher.getxattr(path, "user.review") == b"needs a second look"
    researcher.setxattr(path, "user.review", b"done")                           # the owner may
    admin.removexattr(path, "user.bob-note")                                     # an admin may
    researcher.removexattr(path, "user.review")
    assert "user.review" not in researcher.listxattr(path)
    entries = [(e["action"], e["principal"]) for e in admin.audit_log(50) if e["target"] == path]
    assert ("xattr.set", "researcher") in entries and ("xattr.remove", "admin") in entries
