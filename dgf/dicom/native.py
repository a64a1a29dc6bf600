"""The PS3.19 Native DICOM Model of an XML header, written directly.

The mapping is the one ``data/native-dicom.xsl`` states (kept for ``xsltproc`` users, and held
equal to this module by the tests, which also hold both to dcmtk's ``dcm2xml --native-format``).
libxslt spent 1.65 s on a 16 MB RTSTRUCT header, most of it finding each attribute's run of
values through ``following-sibling``; here each parent's runs are found in one pass and the
document is written as text, one element per line as dcmtk writes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import groupby

from lxml import etree

from dgf import errors

ROOT = "DicomHeader"
#: VRs whose base64 values are text (not InlineBinary); a substring test, as in the stylesheet.
_TEXT_VRS = "AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT"
_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_XPATH_SPACE = re.compile(r"[ \t\r\n]+")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)


def _text(s: str) -> str:
    if "&" in s:
        s = s.replace("&", "&amp;")
    if "<" in s:
        s = s.replace("<", "&lt;")
    if ">" in s:
        s = s.replace(">", "&gt;")
    if "\r" in s:
        s = s.replace("\r", "&#13;")
    return s


def _attr(s: str) -> str:
    return _text(s).replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")


def _string(el: etree._Element) -> str:
    """XPath's string-value of an element."""
    return el.text or "" if not len(el) else "".join(str(t) for t in el.itertext())


class _Out(list):  # type: ignore[type-arg]
    """The output as it is written: pieces of text, handed to ``sink`` every ~1 MB."""

    def __init__(self, sink: Callable[[bytes], object]) -> None:
        super().__init__()
        self.sink = sink
        self.pending = 0

    def flush(self) -> None:
        self.sink("".join(self).encode("utf-8"))
        self.clear()


def native(xml: bytes) -> bytes:
    """The header ``xml`` (dgf's model) as a Native DICOM Model document (UTF-8)."""
    parts: list[bytes] = []
    write_native(xml, parts.append)
    return b"".join(parts)


def write_native(xml: bytes, sink: Callable[[bytes], object]) -> None:
    """:func:`native`, handed to ``sink`` in pieces as it is written (a large header's output is
    never held whole)."""
    try:
        root = etree.fromstring(xml, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise errors.InvalidDicom("the value is not an XML header.") from exc
    if root.tag != ROOT:
        raise errors.InvalidDicom("the value is not an XML header.")
    out = _Out(sink)
    out.append('<?xml version="1.0" encoding="UTF-8"?>\n<NativeDicomModel xml:space="preserve">\n')
    _children(out, [c for c in root if isinstance(c.tag, str) and not (c.get("tag") or "").startswith("0002")])
    out.append("</NativeDicomModel>\n")
    out.flush()


def _children(out: _Out, elems: list[etree._Element], tails: bool = False) -> None:
    """Apply the stylesheet's templates to sibling elements ``elems`` (in document order; with
    ``tails``, the text between them too, as the built-in rule copies it).  A run is a stretch
    of adjacent siblings with one tag (in headers dgf writes, all values of an attribute are
    adjacent; the stylesheet would also gather a later, separate stretch into the first)."""
    tags = [el.get("tag") for el in elems]
    j, n = 0, len(elems)
    for tag, group in groupby(tags):
        k = j + sum(1 for _ in group)
        el = elems[j]
        if tag is None:
            for other in elems[j:k]:
                _builtin(out, other)
                if tails:
                    out.append(_text(other.tail or ""))
            j = k
            continue
        if not (tag[4:] == "0000" or (el.tag == "PrivateElement" and el.get("creator") is None and tag[4:6] != "00")):
            _attribute(out, el, tag, elems[j:k])
            if len(out) > 20000:
                out.flush()
        if tails:
            out.extend(_text(other.tail or "") for other in elems[j:k])
        j = k
    assert j == n


def _builtin(out: _Out, el: etree._Element) -> None:
    """XSLT's built-in rule for an element without a tag: its text and its children, in order."""
    out.append(_text(el.text or ""))
    _children(out, [c for c in el if isinstance(c.tag, str)], tails=True)


def _attribute(out: _Out, el: etree._Element, tag: str, run: list[etree._Element]) -> None:
    creator = el.get("creator")
    name = f"{tag[:4]}00{tag[6:8]}" if creator is not None and tag[4:6] != "00" else tag
    vr = el.get("vr") or ""
    head = f'<DicomAttribute tag="{_attr(name)}" vr="{_attr(vr)}"'
    if el.tag not in ("PrivateElement", "UnknownElement"):
        head += f' keyword="{el.tag}"'
    if creator is not None:
        head += f' privateCreator="{_attr(creator)}"'
    items = [c for c in el if c.tag == "Item"] if vr == "SQ" else []
    bulk = el.get("bulk") == "true"
    empty = (not items if vr == "SQ" else not bulk and len(run) == 1 and (
        _string(el) == "" or vr == "PN" and not _string(el).translate(_PN_MARKS)))
    out.append(head + (">" if empty else ">\n"))
    if empty:
        pass
    elif vr == "SQ":
        for n, item in enumerate(items, 1):
            kids = [c for c in item if isinstance(c.tag, str)]
            out.append(f'<Item number="{n}">\n' if kids else f'<Item number="{n}">')
            _children(out, kids)
            out.append("</Item>\n")
    elif bulk:
        out.append(f'<BulkData uri="#{_attr(tag)}"/>\n')
    elif el.get("enc") == "base64" and vr not in _TEXT_VRS:
        out.append(f"<InlineBinary>{_text(_string(el))}</InlineBinary>\n")
    elif vr == "PN":
        for n, value in enumerate(run, 1):
            out.append(f'<PersonName number="{n}">\n')
            _person_name(out, _XPATH_SPACE.sub(" ", _string(value)).strip(" "))
            out.append("</PersonName>\n")
    else:
        out.extend(f'<Value number="{n}">{_text((v.text or "" if not len(v) else _string(v)).rstrip(" "))}</Value>\n'
                   for n, v in enumerate(run, 1))
    out.append("</DicomAttribute>\n")


_PN_MARKS = str.maketrans("", "", "^= ")
_PN_BLANK = str.maketrans("", "", "^ ")


def _person_name(out: list[str], text: str) -> None:
    """Component groups separated by '=', each split into its five components at '^'."""
    groups = text.split("=")
    for name, group in zip(_GROUPS, groups):
        if not group.translate(_PN_BLANK):
            continue
        out.append(f"<{name}>\n")
        for component, part in zip(_COMPONENTS, group.split("^")):
            if part:
                out.append(f"<{component}>{_text(part)}</{component}>\n")
        out.append(f"</{name}>\n")
