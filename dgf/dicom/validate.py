"""Is this object de-identified by the archive's profile?  The check a site runs on every object
it is asked to store, before it signs a receipt (issue 13: writers cannot bypass
de-identification).

The de-identifier (:mod:`dgf.dicom.deid`) decides what to do with each element; this module
checks the outcome, element by element, with the same resolution of actions (PS3.15 Annex E
Table E.1-1 and the archive's options):

- an element the profile removes (X) is absent or empty, and so are curves, overlays and private
  elements other than dgf's own blocks (and, with Retain Safe Private, the safe ones);
- an element the profile empties (Z, and person names not in the table) is empty; a dummy (D)
  is the de-identifier's dummy for its VR (dates with Modified Dates may be any shifted date);
- UIDs the profile replaces (U) have the archive's pseudonym form ``2.25.<decimal>`` (or are
  well-known DICOM UIDs), in the dataset and in the file meta;
- the Patient's Name and ID are a patient pseudonym (``P`` + 16 base-32 characters);
- the de-identification markers are present (Patient Identity Removed = YES, a method).

What it cannot check: a shifted date or a cleaned descriptor looks like any other, and whether
a pseudonym is the right one for the patient (the metaserver checks that against the identity
record at commit).  Descriptors are accepted as they are, as the de-identifier keeps them.
"""

from __future__ import annotations

import re

from dgf import errors
from dgf.dicom import raw
from dgf.dicom.deid import (
    DEID_METHOD,
    DUMMY,
    PATIENT_ID,
    PATIENT_IDENTITY_REMOVED,
    PATIENT_NAME,
    WELL_KNOWN_UID_ROOT,
    _actions_by_vr,
    _safe_private,
)
from dgf.dicom.profile import SAFE_PRIVATE_CREATORS, Profile

PSEUDO_UID = re.compile(r"2\.25\.[1-9][0-9]{0,39}|2\.25\.0")
PSEUDO_PATIENT = re.compile(r"P[A-Z2-7]{16}")
#: (0002,0003) Media Storage SOP Instance UID: the file meta repeats the instance UID.
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003
SOP_CLASS_UID = 0x00080016
NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"})
#: At most this many problems are listed (the first one names the file's fault).
MAX_PROBLEMS = 5


def problems(data: bytes | memoryview | raw.Part10, profile: Profile) -> list[str]:
    """What in the Part 10 file ``data`` (or its parse) the archive's profile would not have left
    there (empty when it is de-identified as the profile says)."""
    part = data if isinstance(data, raw.Part10) else raw.parse_part10(data)  # type: ignore[arg-type]
    found: list[str] = []
    opts = profile.options
    if not opts.retain_uids:
        for e in part.meta:
            if e.tag == MEDIA_STORAGE_SOP_INSTANCE_UID:
                _check_uids(part.data, e, found)
    top = {e.tag: e for e in part.dataset}
    marker = top.get(PATIENT_IDENTITY_REMOVED)
    if marker is None or raw.text_value(part.data, marker) != "YES":
        found.append("(0012,0062) Patient Identity Removed is not YES: the file was not de-identified")
    if DEID_METHOD not in top:
        found.append("(0012,0063) De-identification Method is missing")
    sop_class = raw.text_value(part.data, top[SOP_CLASS_UID]) if SOP_CLASS_UID in top else ""
    _check(part.data, part.dataset, profile, profile.actions_for(sop_class), "", found)
    return found[:MAX_PROBLEMS]


def check(data: bytes | memoryview | raw.Part10, profile: Profile, what: str) -> None:
    """Raise :class:`~dgf.errors.PolicyRefused` naming the first problems of ``data``."""
    try:
        found = problems(data, profile)
    except errors.InvalidDicom as exc:
        raise errors.PolicyRefused(f"{what} is not a DICOM file this archive stores ({exc.message})") from exc
    if found:
        raise errors.PolicyRefused(f"{what} is not de-identified by this archive's profile: "
                                   + "; ".join(found) + ".")


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _where(path: str, tag: int) -> str:
    """An element's place for a message: formatted only when a problem names it (a site checks
    every element of every object it stores)."""
    return f"{path}{_tag(tag)}"


def _check_uids(data: bytes, e: raw.Elem, found: list[str]) -> None:
    for uid in raw.text_value(data, e).split("\\"):
        if uid and not uid.startswith(WELL_KNOWN_UID_ROOT) and not PSEUDO_UID.fullmatch(uid):
            found.append(f"{_tag(e.tag)} holds a UID that is not an archive pseudonym")
            return


def _check(data: bytes, elems: list[raw.Elem], profile: Profile, actions: dict[int, str], path: str,
           found: list[str]) -> None:
    opts = profile.options
    by_vr = _actions_by_vr(opts)
    creators = raw.private_creators(elems, data)
    safe = _safe_private(elems, creators) if creators and opts.retain_safe_private else set()
    for e in elems:
        if len(found) >= MAX_PROBLEMS:
            return
        tag, group = e.tag, e.tag >> 16
        vr = raw.dictionary_vr(tag) if e.vr == "UN" else e.vr
        if group & 1:
            if creators.get(raw.private_block(tag)) not in SAFE_PRIVATE_CREATORS and e.start not in safe:
                found.append(f"private element {_where(path, tag)} is present")
            continue
        if 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
            found.append(f"curve or overlay element {_where(path, tag)} is present")
            continue
        if e.vr == "UN" and e.items is None and vr == "SQ" and e.length:
            found.append(f"{_where(path, tag)} is an unparsed sequence")
            continue
        if path == "" and tag in (PATIENT_ID, PATIENT_NAME):
            if not PSEUDO_PATIENT.fullmatch(raw.text_value(data, e)):
                found.append(f"{_where(path, tag)} is not a patient pseudonym")
            continue
        act = actions.get(tag)
        if act is None:
            act = by_vr.get(vr)
        if act == "U" and opts.retain_uids:
            act = "K"
        if e.items is None:
            # Only the values the profile changes are read, and of those only values with a
            # dummy are decoded (never pixel data, which may be gigabytes).
            if act in ("X", "Z", "D") and e.length and not (vr in DUMMY and raw.text_value(data, e) == ""):
                if act == "X":
                    found.append(f"{_where(path, tag)} is present; the profile removes it")
                elif act == "Z":
                    found.append(f"{_where(path, tag)} has a value; the profile empties it")
                elif not _is_dummy(data, e, vr, opts.retain_long_modified_dates):
                    found.append(f"{_where(path, tag)} holds a value other than the profile's dummy")
            elif act == "U" and vr == "UI":
                _check_uids(data, e, found)
        elif e.items and act == "X":
            found.append(f"sequence {_where(path, tag)} is present; the profile removes it")
        elif e.items and act == "Z":
            found.append(f"sequence {_where(path, tag)} has items; the profile empties it")
        if e.items is not None and act not in ("X", "Z"):
            sub = profile.actions
            for i, item in enumerate(e.items):
                _check(data, item.elems, profile, sub, f"{_where(path, tag)}[{i}]", found)


def _is_dummy(data: bytes, e: raw.Elem, vr: str, shifted_dates: bool) -> bool:
    if vr in ("DA", "DT") and shifted_dates:
        return True                   # a shifted date looks like any date
    if vr in NUMERIC_VRS:
        return not any(bytes(data[e.vstart:e.value_end]))
    return raw.text_value(data, e) == DUMMY.get(vr, "")
