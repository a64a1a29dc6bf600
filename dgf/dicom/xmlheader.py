"""The XML header model (DESIGN.md section 6): the de-identified header as an XML document.

``<DicomHeader>`` holds one element per DICOM attribute, named by its keyword, with ``tag`` and
``vr`` attributes (and ``creator`` for private elements); a multi-valued attribute is repeated,
one sibling per value, so XPath comparisons test each value (``ImageType='LOCALIZER'``);
sequences hold ``<Item>`` children; binary values other than bulk data (pixel data, and any
value over ``BULK_VALUE_MAX``, shown as ``bulk="true"`` with its length) are base64 with
``enc="base64"``, as is any text XML cannot carry.  File meta elements come first.  The mapping is
lossless for every non-bulk element: :func:`to_dataset` rebuilds the header.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING

from lxml import etree

from dgf import errors
from dgf.dicom import raw
from dgf.dicom.dictionary import DicomDictionary
from dgf.dicom.raw import Elem, Encoding

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# pydicom itself (its package imports numpy, PIL and requests: ~0.3 s of CPU on a site's first
# upload) is imported only to read text in a character set other than ASCII, and to rebuild a
# Dataset from XML.

ROOT = "DicomHeader"
#: Bulk data that stays out of the XML (pixel data, waveforms, encapsulated documents).
BULK_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009, 0x54001010, 0x56000020, 0x00420011})
#: A binary value (bytes or numbers) longer than this is described, not copied, as bulk data
#: is: the header stays metadata whatever a file carries.  A 20 MB OW element made a 28 MB
#: header, stored and indexed at the metaserver and read by every query scan that reached it.
#: Real non-pixel values stay well below (palette LUTs of 128 KB, ICC profiles); text, however
#: long (an RT structure's contour points), stays.
BULK_VALUE_MAX = 1 << 20
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN",
                         "AT", "FD", "FL", "SL", "SS", "SV", "UL", "US", "UV"})


def is_bulk(tag: int, vr: str, length: int) -> bool:
    """Is an element (not a sequence) left out of the XML, described by its length?  ``vr`` as
    the header reads it (:func:`reading_vr`)."""
    return tag in BULK_TAGS or (length > BULK_VALUE_MAX and vr in _BINARY_VRS)


def reading_vr(e: Elem, implicit: bool) -> str:
    """The VR the header reads ``e`` by: a public element the file does not give one (implicit
    VR, or UN) is read by the dictionary's; where that is ambiguous (US or SS, OB or OW) the
    choice is binary either way, so :func:`is_bulk` holds for the choice made later."""
    return raw.dictionary_vr(e.tag) if (e.vr == "UN" or implicit) and not (e.tag >> 16) & 1 else e.vr


_NUMERIC = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_SINGLE_VALUE_TEXT = frozenset({"LT", "ST", "UT", "UR"})
_CHARSET_VRS = {"PN": {0x5C, 0x3D, 0x5E}, "SH": {0x5C}, "LO": {0x5C}, "UC": {0x5C},
                "ST": set(), "LT": set(), "UT": set()}
_KEYWORDS: dict[int, str] = {tag: entry[4] for tag, entry in DicomDictionary.items() if entry[4]}


def keyword(tag: int) -> str:
    kw = _KEYWORDS.get(tag)
    if kw:
        return kw
    return "PrivateElement" if (tag >> 16) & 1 else "UnknownElement"


_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})
_ATTR_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                               "\r": "&#13;", "\n": "&#10;", "\t": "&#9;"})


def _attrs(attrs: dict[str, str]) -> str:
    return "".join(f' {k}="{v.translate(_ATTR_ESCAPES)}"' for k, v in attrs.items())


_TEXT_VRS = frozenset(raw.VALID_VRS - {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"})
_HEADS: dict[tuple[int, str], tuple[str, str, str]] = {}
#: The XML of short elements seen before, by the element's bytes (header and value), per
#: encoding and Pixel Representation (the two other things its reading depends on).  Elements
#: repeat across the files of a series (Manufacturer, KVP, Rows, ...), so one slice and one
#: lookup stand for the element's reading.  Kept only for public elements that are not
#: sequences, nor Specific Character Set itself, nor text the character set reads (a value of
#: a _CHARSET_VRS VR that is not ASCII, or holds ISO 2022 escapes).  Bounded: emptied when full
#: (a few MB at most).
_FRAGMENTS: dict[tuple[Encoding, int], dict[bytes, str]] = {}
FRAGMENT_VALUE_MAX = 64
FRAGMENTS_MAX = 20_000


class _Builder:
    """Writes the XML as text: several times faster than building an lxml tree per file, and
    the escaping rules are the few XML 1.0 needs (characters it cannot carry go to base64)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        #: Specific Character Set's values, converted to Python codecs when a text first needs
        #: them (most text is ASCII, which every DICOM character set reads alike).
        self.charsets: list[str] | None = None
        self._encodings: list[str] | None = ["iso8859"]
        self.out: list[str] = []

    def encodings(self) -> list[str]:
        if self._encodings is None:
            from pydicom.charset import convert_encodings

            self._encodings = convert_encodings(self.charsets or [""])
        return self._encodings

    def add(self, elems: list[Elem], enc: Encoding, pixel_rep: int = 0) -> None:
        out = self.out
        creators: dict[tuple[int, int], str] = {}
        rep = next((e for e in elems if e.tag == PIXEL_REPRESENTATION), None)
        if rep is not None:
            pixel_rep = self._u16(rep, raw.IMPLICIT if rep.vr == "UN" else enc)
        data = self.data
        # A memoryview's slices are not always hashable: such a buffer takes the long way.
        spans = data if not isinstance(data, memoryview) else None
        fragments = _FRAGMENTS.setdefault((enc, pixel_rep), {})
        longest = FRAGMENT_VALUE_MAX + 12       # the value and the longest element header
        for e in elems:
            tag = e.tag
            if spans is not None and e.end - e.start <= longest and e.items is None and not tag & 0x10000 \
                    and tag != 0x00080005:
                fragment = fragments.get(spans[e.start:e.end])
                if fragment is not None:
                    out.append(fragment)
                    continue
            g, el = tag >> 16, tag & 0xFFFF
            if tag == 0x00080005:
                self.charsets = [v.strip() for v in raw.text_value(self.data, e).split("\\")]
                self._encodings = None
            # Public elements written as UN are read by their dictionary VR, as pydicom does; the
            # dictionary's ambiguous VRs (implicit VR files) are resolved as PS3.5 says.
            vr = e.vr
            if (e.vr == "UN" or enc.implicit) and not g & 1:
                vr = _resolve_vr(tag, raw.dictionary_vr(tag), pixel_rep)
            if e.items is not None:
                vr = "SQ"
            creator = None
            if g & 1:
                if 0x10 <= el <= 0xFF:
                    creators[(g, el)] = raw.text_value(self.data, e)
                else:
                    creator = creators.get((g, el >> 8))
            if creator is None and e.items is None and tag not in BULK_TAGS and e.length <= BULK_VALUE_MAX:
                # The common case, from a cache: name and opening tag of (tag, VR).
                key = (tag, vr)
                cached = _HEADS.get(key)
                if cached is None:
                    name = keyword(tag)
                    cached = _HEADS[key] = (name, f'<{name} tag="{tag:08X}" vr="{vr}"', f"</{name}>")
                name, head, close = cached
                value = bytes(data[e.vstart:e.value_end])
                attrs: dict[str, str] = {}
                values = self.values(e, vr, enc, attrs, value)
                start = len(out)
                self._write(head + _attrs(attrs) if attrs else head, close, values)
                if spans is not None and not g & 1 and tag != 0x00080005 and len(value) <= FRAGMENT_VALUE_MAX \
                        and (vr not in _CHARSET_VRS or value.isascii() and b"\x1b" not in value):
                    if len(fragments) >= FRAGMENTS_MAX:
                        fragments.clear()
                    fragments[spans[e.start:e.end]] = "".join(out[start:])
                continue
            attrs = {"tag": f"{tag:08X}", "vr": vr}
            if creator is not None:
                attrs["creator"] = creator
            name = keyword(tag)
            if e.items is not None:
                out.append(f"<{name}{_attrs(attrs)}>")
                item_enc = raw.IMPLICIT if e.implicit_items else enc
                for item in e.items:
                    out.append("<Item>")
                    self.add(item.elems, item_enc, pixel_rep)
                    out.append("</Item>")
                out.append(f"</{name}>")
                continue
            if is_bulk(tag, vr, e.length):
                attrs["bulk"] = "true"
                attrs["length"] = str(e.length if e.length != raw.UNDEFINED else e.end - e.vstart)
                out.append(f"<{name}{_attrs(attrs)}/>")
                continue
            values = self.values(e, vr, enc, attrs)
            self._write(f"<{name}{_attrs(attrs)}", f"</{name}>", values)

    def _write(self, head: str, close: str, values: list[str]) -> None:
        """One XML element per value (``head`` is the opening tag without its ``>``)."""
        out = self.out
        for value in values:
            if not value:
                out.append(head + "/>")
            elif _INVALID_XML.search(value):
                raw64 = base64.b64encode(value.encode("utf-8", "surrogateescape")).decode()
                out.append(f'{head} enc="base64">{raw64}{close}')
            else:
                out.append(f"{head}>{value.translate(_TEXT_ESCAPES)}{close}")

    def _u16(self, e: Elem, enc: Encoding) -> int:
        if e.length != 2:
            return 0
        return int(enc.u16.unpack_from(self.data, e.vstart)[0])

    def values(self, e: Elem, vr: str, enc: Encoding, attrs: dict[str, str],
               value: bytes | None = None) -> list[str]:
        if value is None:
            value = bytes(self.data[e.vstart:e.value_end])
        if e.vr == "UN":
            enc = raw.IMPLICIT  # UN values keep little endian byte order
        if vr in _NUMERIC:
            fmt = _NUMERIC[vr]
            size = struct.calcsize(fmt)
            if len(value) % size:
                attrs["enc"] = "base64"
                return [base64.b64encode(value).decode()]
            nums = struct.unpack(("<" if enc.little else ">") + fmt * (len(value) // size), value)
            if not nums:
                return [""]
            if vr == "FL":
                return [format(x, ".9g") for x in nums]
            return [repr(x) for x in nums]
        if vr == "AT":
            u16 = struct.unpack(("<" if enc.little else ">") + "H" * (len(value) // 2), value)
            return [f"{u16[i]:04X}{u16[i + 1]:04X}" for i in range(0, len(u16) - 1, 2)] or [""]
        if vr in _TEXT_VRS:
            if value.isascii() and b"\x1b" not in value:
                text = value.decode("ascii")  # every DICOM character set is ASCII in G0
            elif vr in _CHARSET_VRS:
                from pydicom.charset import decode_bytes

                text = decode_bytes(value, self.encodings(), _CHARSET_VRS[vr])
            else:
                text = value.decode("latin-1")
            text = text.rstrip("\0 ") if vr != "UI" else text.rstrip("\0")
            if not text:
                return [""]
            return [text] if vr in _SINGLE_VALUE_TEXT else text.split("\\")
        attrs["enc"] = "base64"
        return [base64.b64encode(value).decode()] if value else [""]


PIXEL_REPRESENTATION = 0x00280103
#: "US or SS" attributes (pixel values): SS where Pixel Representation is 1 (pydicom's list).
_US_OR_SS = frozenset({0x00189810, 0x00221452, 0x00280104, 0x00280105, 0x00280106, 0x00280107,
                       0x00280108, 0x00280109, 0x00280110, 0x00280111, 0x00280120, 0x00280121,
                       0x00281101, 0x00281102, 0x00281103, 0x00283002, 0x00409211, 0x00409216,
                       0x00603004, 0x00603006})
#: "OB or OW" attributes, always OW in Implicit VR Little Endian (PS3.5 A.1).
_OB_OR_OW = frozenset({0x7FE00010, 0x54000110, 0x54000112, 0x5400100A, 0x54001010})


def _resolve_vr(tag: int, vr: str, pixel_rep: int) -> str:
    """The VR of an element whose VR the file does not say (implicit VR, or UN)."""
    if tag in _US_OR_SS:
        return "SS" if pixel_rep == 1 else "US"
    if tag in _OB_OR_OW or (tag >> 24 == 0x60 and tag & 0xFFFF == 0x3000):
        return "OW"
    return vr


def header_xml(data: bytes | raw.Part10) -> bytes:
    """The XML header of a (de-identified) Part 10 file, or of its parse."""
    part = data if isinstance(data, raw.Part10) else raw.parse_part10(data)
    builder = _Builder(part.data)
    # A file kept with truncated pixel data (-O allow_truncated) says so, queryable as @truncated.
    missing = f' truncated="{part.truncated[1] - part.truncated[0]}"' if part.truncated else ""
    builder.out.append(f"<{ROOT}{missing}>")
    builder.add(part.meta, raw.EXPLICIT)
    builder.add(part.dataset, part.encoding)
    builder.out.append(f"</{ROOT}>")
    return "".join(builder.out).encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------------------------
# XML -> dataset (the reverse mapping, for losslessness and for tools that want a Dataset)


def _group(children: Iterable[etree._Element]) -> list[list[etree._Element]]:
    groups: list[list[etree._Element]] = []
    for child in children:
        if groups and groups[-1][0].get("tag") == child.get("tag"):
            groups[-1].append(child)
        else:
            groups.append([child])
    return groups


def _dataset(node: etree._Element, little: bool) -> Dataset:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = Dataset()
    for group in _group(node):
        first = group[0]
        tag = int(first.get("tag") or "0", 16)
        vr = first.get("vr") or "UN"
        if first.get("bulk") == "true":
            continue
        if vr == "SQ" or (len(first) and first[0].tag == "Item"):
            ds.add_new(tag, "SQ", Sequence([_dataset(item, little) for item in first]))
            continue
        texts = [(n.text or "") for n in group]
        if first.get("enc") == "base64":
            decoded = [base64.b64decode(t) for t in texts]
            if vr in _NUMERIC or vr in ("OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT"):
                ds.add_new(tag, vr, decoded[0])
                continue
            texts = [d.decode("utf-8", "surrogateescape") for d in decoded]
        if vr in _NUMERIC:
            conv = float if vr in ("FL", "FD") else int
            vals = [conv(t) for t in texts if t != ""]
            ds.add_new(tag, vr, vals[0] if len(vals) == 1 else (vals or None))
        elif vr == "AT":
            vals = [int(t, 16) for t in texts if t]
            ds.add_new(tag, vr, vals[0] if len(vals) == 1 else (vals or None))
        else:
            value = texts[0] if len(texts) == 1 else "\\".join(texts)
            ds.add_new(tag, vr, value)
    return ds


def _root(xml: bytes) -> etree._Element:
    """An XML header's root element, or a sentence saying what is wrong with it."""
    try:
        root = etree.fromstring(xml)
    except etree.XMLSyntaxError as exc:
        raise errors.UsageError(f"the XML header is not well-formed: {exc}.") from exc
    if root.tag != ROOT:
        raise errors.UsageError(f"the XML root must be <{ROOT}>, not <{root.tag}>.")
    return root


def top_text(xml: bytes, name: str) -> str | None:
    """The text of the first top-level element ``name`` of an XML header (None: there is none)."""
    node = _root(xml).find(name)
    return None if node is None else node.text or ""


def to_dataset(xml: bytes) -> tuple[Dataset, Dataset]:
    """(file meta, dataset) rebuilt from an XML header; bulk elements are absent."""
    full = _dataset(_root(xml), True)
    meta, ds = type(full)(), type(full)()
    for elem in full:
        (meta if elem.tag.group == 2 else ds).add(elem)
    return meta, ds


#: DICOM JSON (PS3.18 F.2) numbers, as pydicom writes them: integers and decimals.
_JSON_INTS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
_JSON_FLOATS = frozenset({"DS", "FD", "FL"})
_JSON_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


class _Unusual(Exception):
    """A value :func:`to_json` leaves to pydicom's conversion (a number held as raw bytes, a
    binary VR written as text)."""


def to_json(xml: bytes) -> dict[str, object]:
    """The dataset of an XML header (group 0002 left out, bulk elements absent) in the DICOM JSON
    model, straight from the XML: what ``to_dataset`` and pydicom's ``to_json_dict`` give (a
    test compares them over the real corpus), ~5x cheaper, and a malformed number is kept as
    its text where pydicom refuses.  A header holding a value it does not read directly (a
    number held as raw bytes, a binary VR written as text) goes pydicom's way instead."""
    root = _root(xml)
    try:
        return _json(root, top=True)
    except _Unusual:
        _, ds = to_dataset(xml)
        return dict(ds.to_json_dict(bulk_data_threshold=1 << 30, bulk_data_element_handler=None))


def _json(node: etree._Element, top: bool = False) -> dict[str, object]:
    out: dict[str, object] = {}
    for group in _group(node):
        first = group[0]
        tag = int(first.get("tag") or "0", 16)
        if first.get("bulk") == "true" or top and tag >> 16 == 2:
            continue
        vr = first.get("vr") or "UN"
        key = f"{tag:08X}"
        if vr == "SQ" or (len(first) and first[0].tag == "Item"):
            out[key] = {"vr": "SQ", "Value": [_json(item) for item in first]}
            continue
        texts = [(n.text or "") for n in group]
        if first.get("enc") == "base64":
            if vr in _JSON_BINARY:
                data = base64.b64decode(texts[0])      # as to_dataset reads it: the first
                out[key] = {"vr": vr, "InlineBinary": base64.b64encode(data).decode()} if data else {"vr": vr}
                continue
            if vr in _NUMERIC:
                raise _Unusual(key)                    # raw bytes of a number: pydicom's way
            texts = [base64.b64decode(t).decode("utf-8", "surrogateescape") for t in texts]
        if vr in _JSON_BINARY:
            raise _Unusual(key)
        if vr == "AT":
            found = [f"{int(t, 16):08X}" for t in texts if t]
            out[key] = {"vr": vr, "Value": found} if found else {"vr": vr}
            continue
        values = texts if len(texts) > 1 or vr in _SINGLE_VALUE_TEXT else texts[0].split("\\")
        entry: dict[str, object] = {"vr": vr}
        if values != [""]:
            if vr in _JSON_INTS or vr in _JSON_FLOATS:
                entry["Value"] = [_number(v, vr) for v in values]
            elif vr == "PN":
                entry["Value"] = [_person(v) for v in values]
            else:
                entry["Value"] = values
        out[key] = entry
    return dict(sorted(out.items()))


def _number(text: str, vr: str) -> int | float | str:
    """A number as pydicom writes it; a malformed one stays its text (pydicom refuses the
    whole dataset, and a viewer would get nothing)."""
    try:
        return int(text) if vr in _JSON_INTS else float(text)
    except ValueError:
        return text


def _person(value: str) -> dict[str, str]:
    parts = value.split("=")
    return dict(zip(("Alphabetic", "Ideographic", "Phonetic"), parts[:3]))


__all__ = ["header_xml", "to_dataset", "to_json", "keyword", "export"]


#: Stylesheets that export the header to other XML models (``dgf xattr get --as``).
EXPORTS = {"native": "native-dicom.xsl", "dcmtk": "dcmtk-xml.xsl"}


@cache
def _stylesheet(name: str) -> etree.XSLT:
    from importlib import resources

    return etree.XSLT(etree.fromstring(resources.files("dgf.dicom").joinpath("data/" + EXPORTS[name]).read_bytes()))


def export(xml: bytes, model: str) -> bytes:
    """The header in another model: ``native`` (PS3.19 Native DICOM Model) or ``dcmtk`` (dcmtk's
    format, which its ``xml2dcm`` turns into a DICOM file)."""
    if model not in EXPORTS:
        raise errors.UsageError(f"unknown export model {model!r}; known: {', '.join(EXPORTS)}.")
    if model == "native":
        from dgf.dicom.native import native

        return native(xml)    # the stylesheet's mapping, written directly (dgf/dicom/native.py)
    try:
        doc = etree.fromstring(xml)
    except etree.XMLSyntaxError as exc:
        raise errors.InvalidDicom("the value is not an XML header.") from exc
    if doc.tag != ROOT:
        raise errors.InvalidDicom("the value is not an XML header.")
    return bytes(_stylesheet(model)(doc))
