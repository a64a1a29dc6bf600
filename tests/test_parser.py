"""The raw element walker against the standard and against pydicom.

Differential: on every corpus file pydicom reads, the walker yields the same elements (tag, VR,
value bytes, nesting) or refuses with a reason a person can check.  Fuzz: on generated datasets,
cut, re-lengthened and re-typed at random, the walker parses consistently or refuses with
:class:`InvalidDicom`, never another exception.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
from collections.abc import Callable
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dgf import errors
from dgf.dicom import identity, raw, xmlheader
from dgf.dicom.profile import Options, Profile
from tests import corpus
from tests.test_dicom import _deidentify

#: The corpus files the walker refuses, with the words of the reason: each is cut short, and
#: pydicom "reads" it only by dropping the broken element.
REFUSED = {"rtplan_truncated.dcm": "truncated", "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated",
           "DICOMDIR-nooffset": "truncated"}

Tree = list[tuple[int, Any, Any]]


def _pydicom_tree(ds: Dataset) -> Tree:
    """(tag, VR, value bytes or items) as pydicom read them; None for values it has decoded."""
    out: Tree = []
    for tag in sorted(ds._dict):
        el = ds._dict[tag]
        vr, value = el.VR, el.value
        if isinstance(el, RawDataElement) and vr in ("SQ", None, "UN"):
            try:
                converted = ds[tag]          # pydicom reads sequences lazily
            except Exception:  # noqa: BLE001 - left as bytes, as pydicom itself would
                converted = None
            if converted is not None and isinstance(converted.value, pydicom.Sequence):
                value = converted.value
        if isinstance(value, pydicom.Sequence):
            out.append((int(tag), vr, [_pydicom_tree(item) for item in value]))
        elif isinstance(value, bytes):
            out.append((int(tag), vr, value))
        else:
            out.append((int(tag), vr, None))
    return out


def _walker_tree(data: bytes, elems: list[raw.Elem]) -> Tree:
    out: Tree = []
    for e in sorted(elems, key=lambda e: e.tag):
        if e.items is not None:
            out.append((e.tag, e.vr, [_walker_tree(data, item.elems) for item in e.items]))
        else:
            end = e.end - 8 if e.length == raw.UNDEFINED else e.value_end
            out.append((e.tag, e.vr, bytes(data[e.vstart:end])))
    return out


def _difference(theirs: Tree, ours: Tree, where: str = "") -> str | None:
    if [t for t, _, _ in theirs] != [t for t, _, _ in ours]:
        return f"{where or 'dataset'}: tags differ"
    for (tag, vr, value), (_, our_vr, our_value) in zip(theirs, ours):
        at = f"{where}/({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if value is None:
            continue                       # decoded by pydicom while reading (character set)
        if isinstance(value, list) != isinstance(our_value, list):
            return f"{at}: a sequence on one side only"
        if isinstance(value, list):
            if len(value) != len(our_value):
                return f"{at}: {len(value)} items vs {len(our_value)}"
            for i, (a, b) in enumerate(zip(value, our_value)):
                found = _difference(a, b, f"{at}[{i}]")
                if found:
                    return found
            continue
        # pydicom leaves implicit VRs open (None, "OB or OW"); the walker must pick one of them.
        if vr not in (None, "UN") and our_vr not in vr.split(" or "):
            return f"{at}: VR {vr} vs {our_vr}"
        if value != our_value:
            return f"{at}: values differ ({len(value)} vs {len(our_value)} bytes)"
    return None


def test_walker_agrees_with_pydicom_on_the_corpus() -> None:
    files = corpus.readable_files()
    assert len(files) > 150, "the pydicom corpus is missing; install pydicom-data"
    agreed, refused = 0, {}
    for path in files:
        data = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            try:
                part = raw.parse_part10(data)
            except errors.InvalidDicom as exc:
                refused[path.name] = str(exc)
                continue
            theirs = _pydicom_tree(ds)
        difference = _difference(theirs, _walker_tree(part.data, part.dataset))
        assert difference is None, f"{path.name}: {difference}"
        agreed += 1
    assert set(refused) == set(REFUSED), refused
    for name, reason in refused.items():
        assert REFUSED[name] in reason and "byte" in reason, (name, reason)
    assert agreed == len(files) - len(REFUSED)


# -- the 64-bit VRs and trailing padding ---------------------------------------------------

def _file(ds: Dataset) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _base() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P-64"
    ds.Modality = "OT"
    return ds


def test_sv_uv_ov_are_read_and_kept() -> None:
    ds = _base()
    ds.add_new(0x00720082, "SV", [-(2 ** 40), 7])          # Selector SV Value
    ds.add_new(0x00720083, "UV", [2 ** 63 + 5])            # Selector UV Value
    ds.add_new(0x00720081, "OV", struct.pack("<2Q", 1, 2 ** 64 - 1))  # Selector OV Value
    data = _file(ds)
    part = raw.parse_part10(data)
    by_tag = {e.tag: e for e in part.dataset}
    assert by_tag[0x00720082].vr == "SV" and by_tag[0x00720082].length == 16
    assert by_tag[0x00720083].vr == "UV" and by_tag[0x00720083].length == 8
    assert 0x00100010 in by_tag                              # the parse kept step after them
    result = _deidentify(data)
    assert identity.reidentify(result.data, identity.decode(identity.encode(result.identity))) == data
    xml = xmlheader.header_xml(result.data).decode()
    assert ">-1099511627776</SelectorSVValue>" in xml and ">9223372036854775813</SelectorUVValue>" in xml
    assert "Doe" not in xml


@pytest.mark.parametrize("pad", [1, 7, 8, 100, 4096])
def test_trailing_zero_padding_is_read_as_pydicom_reads_it(pad: int) -> None:
    original = corpus.file("CT_small.dcm").read_bytes()
    data = original + b"\0" * pad
    part = raw.parse_part10(data)
    assert [e.tag for e in part.dataset] == [e.tag for e in raw.parse_part10(original).dataset]
    assert any("zero padding" in w for w in part.warnings)
    result = _deidentify(data)
    assert not result.data.endswith(b"\0" * 8)               # the padding is not DICOM: dropped
    assert identity.reidentify(result.data, identity.decode(identity.encode(result.identity))) == data


def test_trailing_garbage_is_still_refused() -> None:
    data = corpus.file("CT_small.dcm").read_bytes() + b"\0\0\0\0junkjunk"
    with pytest.raises(errors.InvalidDicom, match="byte"):
        raw.parse_part10(data)


def test_a_deflate_bomb_is_refused_within_bounded_memory() -> None:
    # A 0.5 MB deflated file that inflates to 512 MiB was inflated whole (and copied once more)
    # wherever it was parsed: the uploader, each site that checks it, the metaserver.
    modest = raw.parse_part10(corpus.deflate_bomb(4))                     # the same file, 4 MiB
    assert modest.dataset[-1].tag == 0xFFFCFFFC and modest.dataset[-1].length == 4 << 20
    bomb = corpus.deflate_bomb(512)
    assert len(bomb) < 600_000
    tracemalloc.start()
    try:
        with pytest.raises(errors.InvalidDicom, match=f"inflates to more than {raw.INFLATED_MAX} bytes"):
            raw.parse_part10(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * raw.INFLATED_MAX
    with pytest.raises(errors.InvalidDicom, match="cut short"):
        raw.parse_part10(bomb[:50_000])                           # ~48 MiB, then nothing


def test_an_identity_record_is_read_within_its_bound() -> None:
    # up.commit inflated each uploaded record whole to read its original size: 0.3 MB could
    # claim gigabytes.  Past its limit only the head is read (a file whose profile removed a
    # large element has a large record, legitimately).
    record = {"v": 2, "original_sha256": "ab" * 32, "original_size": 5, "delta": ["A" * (64 << 20)]}
    blob = identity.encode(record)
    assert len(blob) < 1 << 20
    tracemalloc.start()
    try:
        head = identity.leading(blob, limit=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert head == {"v": 2, "original_sha256": "ab" * 32, "original_size": 5} and peak < 4 << 20
    assert identity.leading(blob, limit=65 << 20) == record                  # within it: whole
    with pytest.raises(errors.IntegrityError, match="corrupt"):
        identity.leading(blob[:1000], limit=65 << 20)
    with pytest.raises(errors.IntegrityError, match="unknown format version"):
        identity.leading(identity.encode({"v": 9, "delta": ["A" * (2 << 20)]}), limit=1 << 20)


# -- fuzz ---------------------------------------------------------------------------------

_SHORT_VRS = ["AE", "AS", "CS", "DA", "DS", "LO", "PN", "SH", "UI", "US", "UL", "FD", "SS"]
_LONG_VRS = ["OB", "OW", "UT", "UN", "SV", "UV", "OV", "UC"]


def _element(tag: int, vr: str, value: bytes) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in raw.LONG_VRS:
        return head + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


@st.composite
def _dataset(draw: Any, depth: int = 0) -> bytes:
    """A random explicit VR little endian dataset, sequences (defined and undefined length) included."""
    n = draw(st.integers(1, 6))
    tags = sorted(draw(st.sets(st.integers(0x00080000, 0x7FDFFFFF).filter(lambda t: t & 0xFFFF),
                               min_size=n, max_size=n)))
    out = b""
    for tag in tags:
        kind = draw(st.sampled_from(["short", "long", "seq"] if depth < 3 else ["short", "long"]))
        if kind == "seq":
            items = draw(st.lists(_dataset(depth + 1), max_size=3))
            undefined = draw(st.booleans())
            body = b""
            for item in items:
                if undefined:
                    body += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item + \
                        struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
                else:
                    body += struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
            if undefined:
                out += struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\0\0" + \
                    struct.pack("<I", 0xFFFFFFFF) + body + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
            else:
                out += _element(tag, "SQ", body)
        else:
            vr = draw(st.sampled_from(_SHORT_VRS if kind == "short" else _LONG_VRS))
            value = draw(st.binary(max_size=24))
            out += _element(tag, vr, value + b"\0" * (len(value) % 2))
    return out


_META = (b"\0" * 128 + b"DICM" + _element(0x00020000, "UL", struct.pack("<I", 30))
         + _element(0x00020010, "UI", b"1.2.840.10008.1.2.1\0"))


def _consistent(part: raw.Part10) -> None:
    """What every accepted parse must satisfy: spans inside the file, in order, nested inside
    their parents."""
    size = len(part.data)

    def check(elems: list[raw.Elem], lo: int, hi: int) -> None:
        pos = lo
        for e in elems:
            assert pos <= e.start < e.vstart <= e.end <= hi
            assert e.value_end <= e.end
            pos = e.end
            for item in e.items or ():
                assert e.vstart <= item.start < item.vstart <= item.end <= e.end
                check(item.elems, item.vstart, item.end)

    check(part.dataset, part.meta_end, size)


class _Forgetful(dict):  # type: ignore[type-arg]
    """In place of ``raw._KNOWN_HEADS``: every parse starts from headers it never finds."""

    class _Blank(dict):  # type: ignore[type-arg]
        def get(self, key: object, default: object = None) -> None:
            return None

    def setdefault(self, key: object, default: object = None) -> dict:  # type: ignore[type-arg]
        return self._Blank()


def _spans(elems: list[raw.Elem]) -> list[tuple[Any, ...]]:
    return [(e.tag, e.vr, e.start, e.vstart, e.length, e.end, e.implicit_items,
             None if e.items is None else [(i.start, i.vstart, i.length, i.end, _spans(i.elems)) for i in e.items])
            for e in elems]


def _with_and_without(module: object, memory: str, outcome: Callable[[], object]) -> tuple[object, object]:
    """``outcome()`` with the module's memory ``memory`` as it is, then with one that forgets."""
    remembered = outcome()
    saved = getattr(module, memory)
    setattr(module, memory, _Forgetful())
    try:
        return remembered, outcome()
    finally:
        setattr(module, memory, saved)


def _parse_both(data: bytes) -> tuple[object, object]:
    """The parse of ``data`` with the headers seen before, and without: spans and warnings,
    or the refusal's words."""
    def outcome() -> object:
        try:
            part = raw.parse_part10(data)
        except errors.InvalidDicom as exc:
            return str(exc)
        return _spans(part.meta), _spans(part.dataset), part.warnings, part.truncated

    return _with_and_without(raw, "_KNOWN_HEADS", outcome)


def test_remembered_headers_change_no_parse() -> None:
    """A header seen in an earlier file stands for its unpacking and checks: a file cut inside
    an element, padded with zeros, or overrunning a sequence item is still read, or refused,
    word for word as without it."""
    original = corpus.file("CT_small.dcm").read_bytes()
    raw.parse_part10(original)                                  # its headers are remembered
    part = raw.parse_part10(original)
    cuts = [e.vstart + 1 for e in part.dataset[::7] if e.length not in (0, raw.UNDEFINED)]
    cases = [original, original + b"\0" * 16, *(original[:cut] for cut in cuts)]
    item_elems = [e for e in part.dataset if e.items]
    for sq in item_elems:                                       # an element longer than its item
        first = sq.items[0].elems[0] if sq.items and sq.items[0].elems else None
        if first is not None and first.vstart == first.start + 8:
            grown = bytearray(original)
            struct.pack_into("<H", grown, first.start + 6, first.length + 2 + sq.items[0].end - first.end)
            cases.append(bytes(grown))
    # Implicit VR: eight zero bytes are an empty (0000,0000) inside a dataset, padding at its end.
    meta = b"\0" * 128 + b"DICM" + _element(0x00020010, "UI", b"1.2.840.10008.1.2\0")
    modality = struct.pack("<HHI", 0x0008, 0x0060, 2) + b"OT"
    cases += [meta + modality + b"\0" * 8 + struct.pack("<HHI", 0x0010, 0x0020, 4) + b"P-64",
              meta + modality + b"\0" * 16]
    assert len(cases) > 10
    for case in cases:
        remembered, fresh = _parse_both(case)
        assert remembered == fresh
    assert isinstance(_parse_both(original[:cuts[0]])[0], str)  # the cut is refused, not misread


def test_remembered_headers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raw, "KNOWN_HEADS_MAX", 8)
    monkeypatch.setattr(raw, "_KNOWN_HEADS", {})
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        remembered, fresh = _parse_both(corpus.file(name).read_bytes())
        assert remembered == fresh
        assert all(len(known) <= 8 for known in raw._KNOWN_HEADS.values())


def _xml_both(data: bytes) -> tuple[object, object]:
    """The XML header of ``data`` with the elements' XML seen before, and without (or the
    refusal's words)."""
    def outcome() -> object:
        try:
            return xmlheader.header_xml(data)
        except errors.DgfError as exc:
            return str(exc)

    return _with_and_without(xmlheader, "_FRAGMENTS", outcome)


def test_remembered_element_xml_changes_no_header() -> None:
    """An element's XML kept from an earlier file stands for its reading only where nothing else
    could change it: across the whole corpus (character sets, implicit VR, big endian, private
    blocks, sequences), each header reads the same with every other file's elements remembered."""
    files = [p.read_bytes() for p in corpus.readable_files()]
    assert len(files) > 50
    for data in files:
        _xml_both(data)                                          # remember every file's elements
    compared = 0
    for data in files:
        remembered, fresh = _xml_both(data)
        assert remembered == fresh
        compared += isinstance(fresh, bytes)
    assert compared > 50
    assert sum(len(kept) for kept in xmlheader._FRAGMENTS.values()) > 100


def test_remembered_element_xml_keeps_to_its_pixel_representation() -> None:
    """In an implicit VR file, (0028,0106) Smallest Image Pixel Value is US or SS as (0028,0103)
    Pixel Representation says: the same element bytes read 65535 in one file and -1 in the next."""
    meta = b"\0" * 128 + b"DICM" + _element(0x00020010, "UI", b"1.2.840.10008.1.2\0")

    def implicit(rep: int) -> bytes:
        return (meta + struct.pack("<HHIH", 0x0028, 0x0103, 2, rep)
                + struct.pack("<HHI", 0x0028, 0x0106, 2) + b"\xff\xff")

    unsigned = xmlheader.header_xml(implicit(0)).decode()
    signed = xmlheader.header_xml(implicit(1)).decode()
    assert 'vr="US">65535<' in unsigned and 'vr="SS">-1<' in signed
    assert xmlheader.header_xml(implicit(0)).decode() == unsigned


def _explicit(transfer_syntax: bytes, body: bytes) -> bytes:
    return b"\0" * 128 + b"DICM" + _element(0x00020010, "UI", transfer_syntax) + body


def test_remembered_element_xml_keeps_to_its_encoding_and_character_set() -> None:
    """The same bytes are (0010,1010) in little endian and (1000,1010) in big endian; and the
    UTF-8 bytes of "Müller" read so under ISO_IR 192, as "MÃ¼ller" under ISO_IR 100."""
    age = b"\x10\x00\x10\x10AS\x00\x00"                  # an empty element: its length reads 0 both ways
    little = xmlheader.header_xml(_explicit(b"1.2.840.10008.1.2.1\0", age)).decode()
    big = xmlheader.header_xml(_explicit(b"1.2.840.10008.1.2.2\0", age)).decode()
    assert '<PatientAge tag="00101010"' in little and '<UnknownElement tag="10001010"' in big

    def described(charset: bytes) -> str:
        return xmlheader.header_xml(_explicit(b"1.2.840.10008.1.2.1\0", _element(0x00080005, "CS", charset)
                                              + _element(0x00081030, "LO", b"M\xc3\xbcller"))).decode()

    assert ">M\u00fcller<" in described(b"ISO_IR 192")
    assert ">M\u00c3\u00bcller<" in described(b"ISO_IR 100")
    assert ">M\u00fcller<" in described(b"ISO_IR 192")


def test_remembered_element_xml_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xmlheader, "FRAGMENTS_MAX", 8)
    monkeypatch.setattr(xmlheader, "_FRAGMENTS", {})
    for name in ("CT_small.dcm", "MR_small_bigendian.dcm", "rtplan.dcm", "J2K_pixelrep_mismatch.dcm"):
        remembered, fresh = _xml_both(corpus.file(name).read_bytes())
        assert remembered == fresh
        assert all(len(kept) <= 8 for kept in xmlheader._FRAGMENTS.values())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_dataset(), data=st.data())
def test_walker_fuzz_parses_consistently_or_refuses(body: bytes, data: st.DataObject) -> None:
    blob = bytearray(_META + body)
    part = raw.parse_part10(bytes(blob))                    # the generated file itself is valid
    _consistent(part)
    for _ in range(data.draw(st.integers(1, 4))):
        mutation = data.draw(st.sampled_from(["cut", "length", "vr", "byte", "undefined"]))
        at = data.draw(st.integers(len(_META), max(len(_META), len(blob) - 1)))
        if mutation == "cut":
            del blob[at:]
        elif mutation == "length" and at + 4 <= len(blob):
            blob[at:at + 4] = struct.pack("<I", data.draw(st.integers(0, 2 ** 32 - 1)))
        elif mutation == "vr" and at + 2 <= len(blob):
            blob[at:at + 2] = data.draw(st.sampled_from(_SHORT_VRS + _LONG_VRS + ["SQ", "\0\0", "zz"])).encode()
        elif mutation == "undefined" and at + 4 <= len(blob):
            blob[at:at + 4] = b"\xff\xff\xff\xff"
        elif at < len(blob):
            blob[at] = data.draw(st.integers(0, 255))
    remembered, fresh = _parse_both(bytes(blob))
    assert remembered == fresh                             # headers seen before change nothing
    remembered, fresh = _xml_both(bytes(blob))
    assert remembered == fresh                             # so does elements' XML seen before
    try:
        mutated = raw.parse_part10(bytes(blob))
    except errors.InvalidDicom as exc:
        assert str(exc).endswith(".")                      # a sentence, not a traceback
        return
    _consistent(mutated)
    # What the walker accepts, the de-identifier handles: a result or a clear refusal.
    try:
        _deidentify(bytes(blob), Profile(Options(allow_burned_in=True, allow_truncated=True)))
    except errors.DgfError:
        pass
