"""DICOM JSON (PS3.18 F.2) of header values as the index shows them: text, several values joined
by backslashes.  ``dgf_find --format dicom-json`` and QIDO-RS (``dgf web``) answer in it."""

from __future__ import annotations

from typing import Any

INTEGER_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
DECIMAL_VRS = frozenset({"DS", "FD", "FL"})
SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


def typed(text: str, vr: str) -> list[Any]:
    """A shown value (multi-values joined by backslashes) as a list of typed values."""
    if text == "" or vr == "SQ":
        return []
    parts = [text] if vr in SINGLE_TEXT_VRS or vr in BINARY_VRS else text.split("\\")
    out: list[Any] = []
    for part in parts:
        try:
            out.append(int(part) if vr in INTEGER_VRS else float(part) if vr in DECIMAL_VRS else part)
        except ValueError:
            out.append(part)          # a malformed number stays visible as its text
    return out


def attribute(text: str, vr: str) -> dict[str, Any]:
    """One attribute: its VR, and its values unless it has none."""
    values = typed(text, vr)
    entry: dict[str, Any] = {"vr": vr}
    if values and vr in BINARY_VRS:
        entry["InlineBinary"] = values[0]      # the header keeps binary values as base64
    elif values:
        entry["Value"] = [{"Alphabetic": v} for v in values] if vr == "PN" else values
    return entry


def dataset(values: dict[str, str], keywords: list[str], vrs: dict[str, str] | None = None) -> dict[str, Any]:
    """The attributes ``keywords`` of ``values`` keyed by tag (private or unknown names, which
    have no tag, are left out), in tag order."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    out: dict[str, Any] = {}
    for k in keywords:
        tag = tag_for_keyword(k)
        if tag is None:
            continue
        out[f"{tag:08X}"] = attribute(values.get(k, ""), (vrs or {}).get(k) or dictionary_VR(tag))
    return dict(sorted(out.items()))
