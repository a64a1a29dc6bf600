"""A raw DICOM element walker: byte spans of every element, item and sequence, no value decoding.

The de-identifier works on these spans so it can splice changed elements into an otherwise
byte-identical copy, which is both fast (no object model for a whole dataset) and what makes exact
re-identification natural (the original is the output with the changed spans put back).

Encodings follow PS3.5: file meta is always explicit VR little endian (7.1); the dataset uses the
transfer syntax's encoding; undefined-length sequences and items end with delimitation items
(7.5); UN with undefined length is an implicit VR little endian sequence (CP-246, 6.2.2);
encapsulated pixel data holds fragments, not datasets (A.4).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from dgf import errors
from dgf.dicom.dictionary import DicomDictionary, RepeatersDictionary

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQ_END = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

#: VRs with a 2-byte reserved field and 4-byte length in explicit VR (PS3.5 Table 7.1-1),
#: the 64-bit SV, UV and OV of PS3.5 2019 included.
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
VALID_VRS = frozenset({
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL",
    "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US",
    "UT", "UV",
})
_SHORT_VRS = {vr.encode(): vr for vr in VALID_VRS - LONG_VRS}
_LONG_VRS = {vr.encode(): vr for vr in LONG_VRS}
#: Nesting beyond this is refused: real data stays far below, and recursion must stay bounded.
MAX_DEPTH = 64
#: The most bytes a deflated dataset (PS3.5 A.5) may inflate to.  Deflate reaches ~1000:1, so
#: without a bound a 1 MB file would claim a gigabyte of memory wherever it is parsed: the
#: uploader, every site that checks it, the metaserver.  Deflated datasets in practice are
#: reports and small images, far below this.
INFLATED_MAX = 128 * 1024 * 1024


def dictionary_vr(tag: int) -> str:
    """VR of a public tag from the data dictionary ('UN' when unknown, first choice if ambiguous)."""
    entry = DicomDictionary.get(tag)
    if entry is None:
        if tag & 0xFFFF == 0:
            return "UL"  # group length
        if (tag >> 16) & 1 and 0x0010 <= (tag & 0xFFFF) <= 0x00FF:
            return "LO"  # private creator
        masked = _repeaters_vr(tag)
        return masked or "UN"
    vr = entry[0]
    return vr[:2] if " or " in vr else vr


def _repeaters_vr(tag: int) -> str | None:
    group = tag >> 16
    if 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
        for mask in ("50xx", "60xx"):
            key = mask + f"{tag & 0xFFFF:04x}".upper()
            entry = RepeatersDictionary.get(key)
            if entry is not None and mask[:2] == f"{group:04x}"[:2]:
                return entry[0][:2]
    return None


@dataclass(slots=True)
class Item:
    start: int
    vstart: int
    length: int
    end: int
    elems: list[Elem] = field(default_factory=list)


@dataclass(slots=True)
class Elem:
    """One element's byte span: header at ``start``, value from ``vstart``.  Slots, not a tuple:
    each element is built once and read a dozen times (a tuple's fields read ~10 ns slower)."""

    tag: int
    vr: str
    start: int
    vstart: int
    length: int  # UNDEFINED for undefined length
    end: int
    items: list[Item] | None = None  # sequences (and UN parsed as sequence)
    implicit_items: bool = False  # items encoded implicit VR LE (UN sequence)

    @property
    def value_end(self) -> int:
        return self.vstart + self.length if self.length != UNDEFINED else self.end


@dataclass(frozen=True)
class Encoding:
    implicit: bool
    little: bool

    @property
    def u16(self) -> struct.Struct:
        return _U16[self.little]

    @property
    def u32(self) -> struct.Struct:
        return _U32[self.little]


_U16 = {True: struct.Struct("<H"), False: struct.Struct(">H")}
_U32 = {True: struct.Struct("<I"), False: struct.Struct(">I")}
_TAG = {True: struct.Struct("<HH"), False: struct.Struct(">HH")}
# Element headers: (group, element, VR bytes, 16-bit length) explicit; (group, element, length, 0)
# implicit (the pad field keeps one unpack shape).
_HEAD_EXPLICIT = {True: struct.Struct("<HH2sH"), False: struct.Struct(">HH2sH")}
_HEAD_IMPLICIT = {True: struct.Struct("<HHI0s"), False: struct.Struct(">HHI0s")}
IMPLICIT = Encoding(True, True)
EXPLICIT = Encoding(False, True)
BIG = Encoding(False, False)

#: Element headers seen before, per encoding: the 8 bytes of a plain element's header (not a
#: sequence, delimiter, UN or long-VR element) -> (tag, VR, length).  What a header means is
#: fixed by its bytes, and a series repeats most of them file after file (the same tag, VR and
#: length), so one dict lookup stands for the unpack and the checks (a series parses ~15 % faster).
#: Bounded: emptied when full, so unique headers (hostile or not) cost memory only up to it.
_KNOWN_HEADS: dict[Encoding, dict[bytes, tuple[int, str, int]]] = {}
KNOWN_HEADS_MAX = 4096


def encoding_for(ts: str) -> Encoding:
    if ts == IMPLICIT_LE:
        return IMPLICIT
    if ts == EXPLICIT_BE:
        return BIG
    return EXPLICIT


class Parser:
    """Walks one buffer; ``parse(start, end, enc)`` returns the element list of a dataset."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
        self.size = len(data)
        self.warnings: list[str] = []
        #: (bytes present, bytes declared) when the pixel data is cut short at the end of file.
        self.truncated_pixels: tuple[int, int] | None = None
        #: Bytes of trailing zero padding after the last element (dropped, as pydicom and dcmtk do).
        self.padding = 0

    def _zero_tail(self, pos: int, end: int) -> bool:
        """True, and noted, when everything from ``pos`` to the end of the dataset is zero bytes."""
        if end != self.size or bytes(self.data[pos:end]).count(0) != end - pos:
            return False
        self.padding = end - pos
        self.warnings.append(f"the file ends in {end - pos} bytes of zero padding after its last "
                             "element; they were dropped")
        return True

    def _need(self, pos: int, n: int, what: str) -> None:
        if pos + n > self.size:
            raise errors.InvalidDicom(f"the file is truncated inside {what} at byte {pos}.")

    def read_tag(self, pos: int, enc: Encoding) -> int:
        self._need(pos, 4, "a tag")
        g, e = _TAG[enc.little].unpack_from(self.data, pos)
        return int((g << 16) | e)

    def parse(self, pos: int, end: int, enc: Encoding, depth: int = 0,
              stop_at_item_end: bool = False) -> tuple[list[Elem], int]:
        """Parse elements from ``pos`` until ``end`` (or an Item Delimitation Item)."""
        if depth > MAX_DEPTH:
            raise errors.InvalidDicom(f"sequences are nested deeper than {MAX_DEPTH} levels.")
        data = self.data
        size = self.size
        elems: list[Elem] = []
        append = elems.append
        u32 = enc.u32.unpack_from
        implicit = enc.implicit
        # One unpack per element header: tag, and the implicit length or the explicit VR + short length.
        head = (_HEAD_IMPLICIT if implicit else _HEAD_EXPLICIT)[enc.little].unpack_from
        known = _KNOWN_HEADS.setdefault(enc, {})
        seen = known.get
        # Slices of bytes (and of a memory map) are bytes; a memoryview's are not always
        # hashable, so such a buffer takes the long way.
        heads = data if not isinstance(data, memoryview) else None
        while pos < end:
            hit = seen(heads[pos:pos + 8]) if heads is not None else None
            if hit is not None:
                tag, vr, length = hit
                vend = pos + 8 + length
                if vend <= size and (not depth or vend <= end):
                    append(Elem(tag, vr, pos, pos + 8, length, vend))
                    pos = vend
                    continue
            if pos + 8 > size:
                if depth == 0 and self._zero_tail(pos, end):
                    break
                self._need(pos, 8, "an element header")
            g, e, vr_or_len, short = head(data, pos)
            tag = (g << 16) | e
            if g == 0xFFFE or not tag:
                if not tag and depth == 0 and self._zero_tail(pos, end):
                    break
                if tag == ITEM_END and stop_at_item_end:
                    return elems, pos + 8
                if g == 0xFFFE:
                    raise errors.InvalidDicom(f"unexpected delimiter ({g:04X},{e:04X}) at byte {pos}.")
            if implicit:
                vr = dictionary_vr(tag)
                length = vr_or_len
                vstart = pos + 8
                if length == UNDEFINED:
                    # Undefined length in implicit VR: a sequence, or encapsulated pixel data.
                    vr = "OB" if tag == PIXEL_DATA else "SQ"
            else:
                found = _SHORT_VRS.get(vr_or_len)
                if found is not None:
                    vr, length, vstart = found, short, pos + 8
                else:
                    found = _LONG_VRS.get(vr_or_len)
                    if found is None:
                        raise errors.InvalidDicom(
                            f"element ({g:04X},{e:04X}) at byte {pos} has an invalid VR {vr_or_len!r}.")
                    self._need(pos, 12, "an element header")
                    vr, length, vstart = found, u32(data, pos + 8)[0], pos + 12
            if length == UNDEFINED:
                elem = self._undefined(tag, vr, pos, vstart, enc, depth)
                vend = elem.end
            else:
                vend = vstart + length
                if vend > size:
                    if depth == 0 and tag == PIXEL_DATA and vstart <= size:
                        # Truncated pixel data as the last element: kept byte for byte, as
                        # pydicom reads it.  Any other truncated element is refused: it could
                        # hide identity.
                        self.warnings.append(f"element ({g:04X},{e:04X}) is truncated to "
                                             f"{size - vstart} of {length} bytes; kept as is")
                        self.truncated_pixels = (size - vstart, length)
                        append(Elem(tag, vr, pos, vstart, size - vstart, size))
                        return elems, size
                    raise errors.InvalidDicom(
                        f"the file is truncated: element ({g:04X},{e:04X}) claims {length} bytes "
                        f"but the file ends at byte {size}.")
                if vr == "SQ":
                    elem = Elem(tag, vr, pos, vstart, length, vend, self._items(vstart, vend, enc, depth))
                elif vr == "UN" and length and dictionary_vr(tag) == "SQ":
                    # A public sequence written as UN: its items are implicit VR LE (CP-246);
                    # left opaque when they do not parse (the de-identifier removes it).
                    try:
                        elem = Elem(tag, vr, pos, vstart, length, vend,
                                    self._items(vstart, vend, IMPLICIT, depth), True)
                    except errors.InvalidDicom:
                        elem = Elem(tag, vr, pos, vstart, length, vend)
                else:
                    elem = Elem(tag, vr, pos, vstart, length, vend)
                    if heads is not None and vstart == pos + 8 and tag and g != 0xFFFE and vr != "UN":
                        if len(known) >= KNOWN_HEADS_MAX:
                            known.clear()
                        known[heads[pos:pos + 8]] = (tag, vr, length)
            if depth and vend > end:
                raise errors.InvalidDicom(f"element ({g:04X},{e:04X}) at byte {pos} overruns the "
                                          f"sequence item that holds it (which ends at byte {end}).")
            append(elem)
            pos = vend
        return elems, pos

    def _undefined(self, tag: int, vr: str, pos: int, vstart: int, enc: Encoding, depth: int) -> Elem:
        if tag == PIXEL_DATA or vr in ("OB", "OW") and tag != PIXEL_DATA and (tag >> 16) == 0x7FE0:
            # Encapsulated pixel data: skip fragments up to the Sequence Delimitation Item.
            p = vstart
            while True:
                t = self.read_tag(p, enc)
                self._need(p, 8, "a pixel data fragment")
                n = enc.u32.unpack_from(self.data, p + 4)[0]
                if t == SEQ_END:
                    return Elem(tag, vr, pos, vstart, UNDEFINED, p + 8)
                if t != ITEM or n == UNDEFINED:
                    raise errors.InvalidDicom(f"encapsulated pixel data is malformed at byte {p}.")
                self._need(p + 8, n, "a pixel data fragment")
                p += 8 + n
        if vr not in ("SQ", "UN"):
            raise errors.InvalidDicom(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of VR {vr} has undefined length.")
        item_enc = IMPLICIT if vr == "UN" else enc
        items: list[Item] = []
        p = vstart
        while True:
            t = self.read_tag(p, item_enc)
            self._need(p, 8, "a sequence item")
            if t == SEQ_END:
                return Elem(tag, vr, pos, vstart, UNDEFINED, p + 8, items, vr == "UN")
            if t != ITEM:
                raise errors.InvalidDicom(f"expected a sequence item at byte {p}, found ({t >> 16:04X},{t & 0xFFFF:04X}).")
            item = self._item(p, item_enc, depth)
            items.append(item)
            p = item.end

    def _items(self, pos: int, end: int, enc: Encoding, depth: int) -> list[Item]:
        items = []
        while pos < end:
            if self.read_tag(pos, enc) != ITEM:
                raise errors.InvalidDicom(f"expected a sequence item at byte {pos}.")
            item = self._item(pos, enc, depth)
            if item.end > end:
                raise errors.InvalidDicom(f"a sequence item at byte {pos} overruns its sequence.")
            items.append(item)
            pos = item.end
        return items

    def _item(self, pos: int, enc: Encoding, depth: int) -> Item:
        self._need(pos, 8, "a sequence item")
        length = enc.u32.unpack_from(self.data, pos + 4)[0]
        vstart = pos + 8
        if length == UNDEFINED:
            elems, end = self.parse(vstart, self.size, enc, depth + 1, stop_at_item_end=True)
            if end > self.size or self.read_tag(end - 8, enc) != ITEM_END:
                raise errors.InvalidDicom(f"a sequence item at byte {pos} has no Item Delimitation Item.")
            return Item(pos, vstart, UNDEFINED, end, elems)
        end = vstart + length
        if end > self.size:
            raise errors.InvalidDicom(f"the file is truncated: a sequence item at byte {pos} claims {length} bytes "
                                      "past the end of file.")
        elems, _ = self.parse(vstart, end, enc, depth + 1)
        return Item(pos, vstart, length, end, elems)


@dataclass
class Part10:
    """A parsed Part 10 file: preamble, file meta elements, dataset elements and its encoding."""

    data: bytes
    has_preamble: bool
    meta: list[Elem]
    meta_end: int
    transfer_syntax: str
    encoding: Encoding
    dataset: list[Elem]
    deflated: bool = False
    original: bytes = b""  # for deflated files: the bytes as read (``data`` is inflated)
    warnings: list[str] = field(default_factory=list)
    #: (bytes present, bytes declared) of pixel data cut short by the end of the file.
    truncated: tuple[int, int] | None = None


def text_value(data: bytes | memoryview, elem: Elem) -> str:
    return bytes(data[elem.vstart:elem.value_end]).decode("latin-1").rstrip(" \0")


def private_block(tag: int) -> int:
    """The private block a private tag belongs to, as ``group << 8 | block`` (PS3.5 7.8.1): for
    a Private Creator (gggg,00bb) its own block, for a data element (gggg,bbxx) the block that
    reserves it."""
    el = tag & 0xFFFF
    return (tag >> 16) << 8 | (el if el <= 0xFF else el >> 8)


def private_creators(elems: list[Elem], data: bytes | memoryview) -> dict[int, str]:
    """The Private Creator values of one dataset level, by :func:`private_block`."""
    # (gggg,0010-00FF) with gggg odd: bit 16 set, bits 8-15 clear, bits 4-7 not all clear.
    return {(e.tag >> 16) << 8 | (e.tag & 0xFF): text_value(data, e) for e in elems
            if e.tag & 0x1FF00 == 0x10000 and e.tag & 0xF0}


def _looks_explicit(data: bytes, pos: int) -> bool:
    return len(data) >= pos + 6 and data[pos + 4:pos + 6].decode("latin-1") in VALID_VRS


def _inflate(deflated: bytes | memoryview) -> bytes:
    """A deflated dataset's bytes, never more than :data:`INFLATED_MAX` of them."""
    stream = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = stream.decompress(deflated, INFLATED_MAX + 1)
    except zlib.error as exc:
        raise errors.InvalidDicom("the deflated dataset cannot be inflated.") from exc
    if len(inflated) > INFLATED_MAX:
        raise errors.InvalidDicom(f"the deflated dataset inflates to more than {INFLATED_MAX} bytes, "
                                  "the most this archive inflates (store it uncompressed, e.g. dcmconv +te).")
    if not stream.eof:
        raise errors.InvalidDicom("the deflated dataset cannot be inflated (it is cut short).")
    return inflated


def parse_part10(data: bytes) -> Part10:
    """Parse a DICOM Part 10 file (PS3.10 7.1); raise :class:`InvalidDicom` with the reason.

    A file without preamble, or a bare dataset without file meta (as older tools write), is
    accepted with a warning naming the repair: its encoding is inferred from the first element.
    """
    warnings: list[str] = []
    if len(data) >= 132 and data[128:132] == b"DICM":
        pos, has_preamble = 132, True
    elif len(data) >= 8 and data[:2] == b"\x00\x08" and _looks_explicit(data, 0):
        # A bare big endian dataset: the only encoding that starts with group 0008 this way.
        ds_be, _ = Parser(data).parse(0, len(data), BIG)
        warnings.append("the file has no file meta information; a Part 10 header was written "
                        f"with the inferred transfer syntax {EXPLICIT_BE}")
        return Part10(data, False, [], 0, EXPLICIT_BE, BIG, ds_be, warnings=warnings)
    elif len(data) >= 8 and data[:2] == b"\x02\x00" and _looks_explicit(data, 0):
        pos, has_preamble = 0, False
        warnings.append("the file has no 128-byte preamble; a Part 10 header was written")
    else:
        pos, has_preamble = 0, False
        if len(data) < 8:
            raise errors.InvalidDicom("not a DICOM file (too short).")
    parser = Parser(data)
    meta: list[Elem] = []
    while pos + 8 <= len(data):
        g = struct.unpack_from("<H", data, pos)[0]
        if g != 0x0002:
            break
        elems, pos = parser.parse(pos, pos + 1, EXPLICIT)  # one element at a time
        meta.extend(elems)
    ts_elem = next((e for e in meta if e.tag == 0x00020010), None)
    if ts_elem is not None:
        ts = text_value(data, ts_elem)
    else:
        if pos + 8 > len(data):
            raise errors.InvalidDicom("the file has file meta information but no dataset.")
        group = struct.unpack_from("<H", data, pos)[0]
        if not meta and not 0x0004 <= group <= 0x0020:
            raise errors.InvalidDicom("not a DICOM file (no 'DICM' marker and no dataset at the start).")
        ts = EXPLICIT_LE if _looks_explicit(data, pos) else IMPLICIT_LE
        what = "no file meta information" if not meta else "no Transfer Syntax UID in its file meta"
        warnings.append(f"the file has {what}; the transfer syntax {ts} was inferred from the dataset")
    enc = encoding_for(ts)
    if not enc.implicit and enc.little and ts != DEFLATED_LE and not _looks_explicit(data, pos) \
            and pos + 8 <= len(data):
        # The transfer syntax says explicit VR but the dataset is implicit (a known writer bug
        # that pydicom also tolerates): parse as implicit, keep the bytes.
        enc = IMPLICIT
        warnings.append(f"the dataset is implicit VR although the transfer syntax {ts} is explicit; "
                        "it was read as implicit VR")
    if ts == DEFLATED_LE:
        body = data[:pos] + _inflate(memoryview(data)[pos:])
        dataset, _ = Parser(body).parse(pos, len(body), EXPLICIT)
        return Part10(body, has_preamble, meta, pos, ts, EXPLICIT, dataset, deflated=True,
                      original=data, warnings=warnings)
    dataset, _ = parser.parse(pos, len(data), enc)
    if not dataset:
        raise errors.InvalidDicom("the file has file meta information but no dataset.")
    return Part10(data, has_preamble, meta, pos, ts, enc, dataset, warnings=warnings + parser.warnings,
                  truncated=parser.truncated_pixels)


def stored_syntax(data: bytes | memoryview) -> str:
    """The transfer syntax a Part 10 file names in its file meta (Implicit VR Little Endian when
    it names none), read without parsing the dataset."""
    pos = 132 if bytes(data[128:132]) == b"DICM" else 0
    parser = Parser(data)
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        elems, pos = parser.parse(pos, pos + 1, EXPLICIT)
        if elems and elems[0].tag == 0x00020010:
            return text_value(data, elems[0])
    return IMPLICIT_LE


#: Top-level elements whose values no check reads: pixel data (native or encapsulated) and
#: waveform data.  An object sealed for an untrusted site may keep them from the metaserver
#: (``dgf.envelope``): nothing the profile or the XML header looks at lies inside them.
OPAQUE_TAGS = frozenset({PIXEL_DATA, 0x7FE00008, 0x7FE00009, 0x54001010})


def opaque_values(data: bytes | memoryview, elems: list[Elem], little: bool) -> list[tuple[int, int]]:
    """Byte ranges of ``data`` that parsing, validating and describing the dataset never read:
    the values of top-level :data:`OPAQUE_TAGS` elements (each fragment's value, not the item
    headers, for encapsulated pixel data)."""
    u32 = _U32[little]
    out: list[tuple[int, int]] = []
    for e in elems:
        if e.tag not in OPAQUE_TAGS:
            continue
        if e.length != UNDEFINED:
            out.append((e.vstart, e.vstart + e.length))
            continue
        p = e.vstart
        while p + 8 <= e.end - 8:               # the last 8 bytes: the Sequence Delimitation Item
            n = u32.unpack_from(data, p + 4)[0]
            if n:
                out.append((p + 8, p + 8 + n))
            p += 8 + n
    return out
