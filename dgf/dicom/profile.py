"""The PS3.15 Annex E Table E.1-1 as data, and the options that select its columns.

``data/annex_e.json`` is derived from the standard's table (machine-readable copy by the
innolitics/dicom-standard project, MIT) by :func:`build`; ``data/iod_types.json`` (the Type of
each attribute with a combined code, per SOP class) from highdicom's tables of the standard by
:func:`build_iod_types`.  Regenerate them with::

    python -m dgf.dicom.profile ../shared/data/dicom-standard/confidentiality_profile_attributes.json \
        dgf/dicom/data/annex_e.json .../dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py
    python -m dgf.dicom.profile --iod-types .../site-packages/highdicom/_standard dgf/dicom/data/iod_types.json

Action codes (PS3.15 E.1.1): D dummy, Z zero-length or dummy, X remove, K keep, C clean,
U replace UID; combined codes (X/Z, X/D, Z/D, X/Z/D, X/Z/U*) are resolved by the attribute's
Type in the IOD of the instance's SOP class (:data:`BY_TYPE`): removed where it is Type 3 or not
in the IOD, emptied where Type 2, a dummy where Type 1.  Where the Type is unknown (nested
elements, SOP classes without a table) they resolve to the choice that is conformant whatever the
Type (:data:`COMBINED`), so no Type 1 or 2 attribute is ever removed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields
from functools import cached_property, lru_cache
from importlib import resources
from typing import Any

from dgf import errors

#: Option name -> (Table E.1-1 column, CID 7050 code, code meaning).
OPTIONS: dict[str, tuple[str, str, str]] = {
    "retain_patient_characteristics": ("rtnPatCharsOpt", "113108", "Retain Patient Characteristics Option"),
    "retain_long_modified_dates": ("rtnLongModifDatesOpt", "113107",
                                   "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_long_full_dates": ("rtnLongFullDatesOpt", "113106",
                               "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_device_identity": ("rtnDevIdOpt", "113109", "Retain Device Identity Option"),
    "retain_institution_identity": ("rtnInstIdOpt", "113112", "Retain Institution Identity Option"),
    "retain_uids": ("rtnUIDsOpt", "113110", "Retain UIDs Option"),
    "retain_safe_private": ("rtnSafePrivOpt", "113111", "Retain Safe Private Option"),
    "clean_descriptors": ("cleanDescOpt", "113105", "Clean Descriptors Option"),
}
BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")

#: Resolved action for each combined code when the attribute's Type is unknown (no IOD table for
#: the SOP class, or inside a sequence): the choice conformant whatever the Type.
COMBINED = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U", "X/Z/U": "U"}

#: Resolution by the attribute's Type in the IOD (PS3.15 E.1.1: X unless Z or D is needed to stay
#: conformant; Z for Type 2, D for Type 1).
BY_TYPE = {
    "X/Z": {"1": "Z", "2": "Z", "3": "X"},
    "X/D": {"1": "D", "2": "D", "3": "X"},
    "Z/D": {"1": "D", "2": "Z", "3": "Z"},
    "X/Z/D": {"1": "D", "2": "Z", "3": "X"},
    "X/Z/U*": {"1": "U", "2": "U", "3": "X"},
    "X/Z/U": {"1": "U", "2": "U", "3": "X"},
}

#: Private creators whose blocks are kept: dgf's own, which hold geometry and provenance numbers
#: that dgf writes itself (never copied from an input).
SAFE_PRIVATE_CREATORS = frozenset({"DGF RECON 1"})

#: Removed whatever the table says: digital signatures and the record of original values
#: (PS3.15 E.1.1 notes), which would otherwise carry identity through.
ALWAYS_REMOVE = frozenset({0xFFFAFFFA, 0x04000561, 0x04000550, 0x04000500})


@dataclass(frozen=True)
class Options:
    """Per-archive de-identification options.

    The default keeps what cohort research needs and nothing that names a patient: the Basic
    Profile, plus Retain Patient Characteristics (age, sex, size, weight) and Retain Longitudinal
    Temporal Information with Modified Dates (all dates of a patient shifted by one secret offset,
    so intervals and ages survive; times kept).

    ``retain_safe_private`` keeps the private attributes listed as safe (scan geometry, scale
    factors; :mod:`dgf.dicom.safe_private`), which quantitative work on some vendors' images needs;
    it is off by default because the list is per vendor and incomplete.

    ``clean_descriptors`` is off by default on purpose: dgf cleans a descriptor by keeping it
    only when it contains none of the patient's own identifiers (name parts, IDs, birth date),
    which cannot catch an unrelated identifier typed into free text.  Turn it on for archives
    whose descriptions are known to be protocol names.
    """

    retain_patient_characteristics: bool = True
    retain_long_modified_dates: bool = True
    retain_long_full_dates: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_uids: bool = False
    retain_safe_private: bool = False
    clean_descriptors: bool = False
    allow_burned_in: bool = False
    #: Per upload, like allow_burned_in: keep a file whose pixel data the end of file cuts short
    #: (refused by default); its XML header says how many bytes are missing.
    allow_truncated: bool = False
    #: Internal, for data dgf computes from archive data (reconstructions): its UIDs, patient and
    #: dates are already pseudonyms, so they are kept; every other rule still applies.
    derived: bool = False

    def __post_init__(self) -> None:
        if self.retain_long_full_dates and self.retain_long_modified_dates:
            raise errors.UsageError("choose either full dates or modified dates, not both.")

    @classmethod
    def from_names(cls, names: list[str], base: Options | None = None) -> Options:
        values = {f.name: getattr(base or cls(), f.name) for f in fields(cls)}
        for name in names:
            key, _, val = name.partition("=")
            key = key.strip().replace("-", "_")
            if key not in values:
                raise errors.UsageError(f"unknown de-identification option {key!r}; known: {', '.join(values)}.")
            values[key] = val.strip().lower() not in ("0", "false", "no", "off")
        if "retain_long_full_dates" in [n.partition("=")[0].replace("-", "_") for n in names] \
                and values["retain_long_full_dates"]:
            values["retain_long_modified_dates"] = False
        return cls(**values)

    @classmethod
    def archive(cls, names: list[str], allow_burned_in: bool = False, allow_truncated: bool = False) -> Options:
        """The options an archive set (exactly ``names`` enabled), with the uploader's
        per-upload acknowledgements of burned-in annotation and truncated pixel data."""
        unknown = sorted(set(names) - set(OPTIONS))
        if unknown:
            raise errors.UsageError(f"the archive names an unknown de-identification option {unknown[0]!r}.")
        return cls(**{n: n in names for n in OPTIONS}, allow_burned_in=allow_burned_in,
                   allow_truncated=allow_truncated)

    def enabled(self) -> list[str]:
        return [name for name in OPTIONS if getattr(self, name)]

    def codes(self) -> list[tuple[str, str]]:
        return [BASIC_CODE] + [(OPTIONS[n][1], OPTIONS[n][2]) for n in self.enabled()]


def load_table() -> dict[str, Any]:
    text = resources.files("dgf.dicom").joinpath("data/annex_e.json").read_text()
    table: dict[str, Any] = json.loads(text)
    return table


class Profile:
    """Annex E actions resolved for one set of options: ``action(tag)`` -> D Z X K C U S or None.

    ``S`` is the Modified Dates option's clean action (shift by the patient's offset); ``C`` is
    the Clean Descriptors option's.  None means the tag is not in the table.
    """

    def __init__(self, options: Options | None = None, table: dict[str, Any] | None = None) -> None:
        self.options = options or Options()
        self.table = table or load_table()
        self.edition = self.table["edition"]

    @cached_property
    def actions(self) -> dict[int, str]:
        """Actions for nested elements and SOP classes without an IOD table."""
        return self._resolve(None)

    def actions_for(self, sop_class: str) -> dict[int, str]:
        """Top-level actions for instances of ``sop_class``: combined codes resolved by Type."""
        cache = self.__dict__.setdefault("_by_class", {})
        if sop_class not in cache:
            types = iod_types().get(sop_class)
            cache[sop_class] = self._resolve(types) if types is not None else self.actions
        return cache[sop_class]  # type: ignore[no-any-return]

    def _resolve(self, types: dict[str, str] | None) -> dict[int, str]:
        out: dict[int, str] = {}
        enabled = self.options.enabled()
        for tag_hex, row in self.table["tags"].items():
            code = row["basicProfile"]
            for name in enabled:
                column = OPTIONS[name][0]
                opt = row.get(column)
                if opt == "K":
                    code = "K"
                elif opt == "C" and name == "retain_long_modified_dates":
                    code = "S"
                elif opt == "C" and name == "clean_descriptors":
                    code = "C"
            if code in BY_TYPE and types is not None:
                out[int(tag_hex, 16)] = BY_TYPE[code][types.get(tag_hex, "3")]
            else:
                out[int(tag_hex, 16)] = COMBINED.get(code, code)
        for tag in ALWAYS_REMOVE:
            out[tag] = "X"
        return out


@lru_cache(maxsize=1)
def iod_types() -> dict[str, dict[str, str]]:
    """SOP Class UID -> {tag hex: "1" | "2" | "3"} for the attributes with combined codes."""
    text = resources.files("dgf.dicom").joinpath("data/iod_types.json").read_text()
    return dict(json.loads(text)["sop_classes"])


def stored_profile(names: list[str]) -> Profile:
    """The profile a stored object is checked against (by its site, or the metaserver for a
    sealed one): the archive's options ``names``; burned-in and truncated pixel data are the
    uploader's to acknowledge, what is checked is the header."""
    return Profile(Options.archive(names, allow_burned_in=True, allow_truncated=True))


def build_iod_types(standard_dir: str, table: dict[str, Any]) -> dict[str, Any]:
    """Derive ``iod_types.json`` from highdicom's tables of the standard (``highdicom/_standard``:
    SOP class -> IOD -> modules -> attributes with Types).  Only top-level attributes whose Annex E
    action is a combined code are kept, with the strictest Type over the IOD's modules
    (1 and 1C count as 1, 2 and 2C as 2)."""
    import os

    from pydicom.datadict import tag_for_keyword

    def load(name: str) -> Any:
        with open(os.path.join(standard_dir, name), encoding="utf-8") as fh:
            return json.load(fh)

    sop_iod, iod_modules, module_attrs = (load("sop_class_iod_map.json"), load("iod_module_map.json"),
                                          load("module_attribute_map.json"))
    combined = {t for t, row in table["tags"].items()
                if any(row.get(c, "") in BY_TYPE for c in ["basicProfile"] + [v[0] for v in OPTIONS.values()])}
    out: dict[str, dict[str, str]] = {}
    for sop, iod in sorted(sop_iod.items()):
        types: dict[str, str] = {}
        for module in iod_modules.get(iod, []):
            for attr in module_attrs.get(module["key"], []):
                if attr["path"]:
                    continue
                tag = tag_for_keyword(attr["keyword"])
                if tag is None:
                    continue
                tag_hex = f"{tag:08X}"
                if tag_hex not in combined:
                    continue
                t = attr["type"][0]
                types[tag_hex] = min(types.get(tag_hex, "3"), t)
        out[sop] = dict(sorted(types.items()))
    return {"source": "highdicom/_standard (MIT): sop_class_iod_map, iod_module_map, module_attribute_map",
            "sop_classes": out}


def additions_2026c(path: str) -> dict[str, str]:
    """Basic-profile codes of the tags that edition 2026c added, read from dicom-anonymizer
    2.1.0's ``dicomfields_2026c.py`` (BSD-3): its lists of tags per action, by name."""
    import runpy

    lists = runpy.run_path(path)
    codes = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
             "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}
    return {f"{t[0]:04X}{t[1]:04X}": code for name, code in codes.items() for t in lists.get(name, [])
            if len(t) == 2}


def build(rows: list[dict[str, Any]], edition: str, source: str,
          additions: dict[str, str] | None = None) -> dict[str, Any]:
    """The project's data file from the table rows (tags only; pattern rows become rules in code),
    plus ``additions`` (tag -> basic-profile code) for tags a newer edition added; existing
    rows are never changed by them."""
    tags: dict[str, dict[str, str]] = {}
    patterns = []
    for row in rows:
        entry = {k: v for k, v in row.items() if k not in ("name", "tag", "id", "stdCompIOD")}
        entry["name"] = row["name"]
        tag = row["tag"].strip("()").replace(",", "")
        if all(c in "0123456789ABCDEFabcdef" for c in tag) and len(tag) == 8:
            tags[tag.upper()] = entry
        else:
            patterns.append({"tag": row["tag"], **entry})
    from pydicom.datadict import keyword_for_tag

    for tag_hex, code in (additions or {}).items():
        if tag_hex not in tags:
            tags[tag_hex] = {"basicProfile": code, "name": keyword_for_tag(int(tag_hex, 16)) or tag_hex,
                             "addedIn": "2026c"}
    return {"edition": edition, "source": source, "tags": dict(sorted(tags.items())),
            "patterns": patterns}


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--iod-types":
        data = build_iod_types(argv[1], load_table())
        with open(argv[2], "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=0)
            fh.write("\n")
        print(f"{len(data['sop_classes'])} SOP classes -> {argv[2]}")
        return 0
    if len(argv) not in (2, 3):
        print("usage: python -m dgf.dicom.profile SOURCE.json OUT.json [DICOMFIELDS_2026C.py]\n"
              "       python -m dgf.dicom.profile --iod-types HIGHDICOM_STANDARD_DIR OUT.json", file=sys.stderr)
        return 2
    rows = json.loads(open(argv[0], encoding="utf-8").read())
    source = "DICOM PS3.15 Table E.1-1, edition 2024b, via innolitics/dicom-standard commit 7f4749d (MIT)"
    additions, edition = None, "2024b"
    if len(argv) == 3:
        additions, edition = additions_2026c(argv[2]), "2024b+2026c"
        source += ("; plus the basic-profile codes of the tags edition 2026c added, from "
                   "dicom-anonymizer 2.1.0 dicomfields_2026c.py (BSD-3)")
    data = build(rows, edition, source, additions)
    with open(argv[1], "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=0, sort_keys=False)
        fh.write("\n")
    print(f"{len(data['tags'])} tags, {len(data['patterns'])} pattern rows -> {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
