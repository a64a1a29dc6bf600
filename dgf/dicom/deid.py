"""De-identification to PS3.15 Annex E, working on raw elements and splicing bytes.

Two steps so a batch needs one round trip to the metaserver, which alone holds the pseudonym key:

1. :func:`analyze` parses a file, decides each element's action from the :class:`Profile` (by tag,
   then by VR for PN/DA/DT/TM not in the table), and lists the UIDs and the patient key that need
   pseudonyms;
2. :func:`apply` writes the de-identified file: unchanged elements are copied as byte spans,
   changed ones re-encoded, defined lengths of changed sequences recomputed, markers added
   (PS3.15 E.1.1: Patient Identity Removed, De-identification Method and its Code Sequence,
   Longitudinal Temporal Information Modified), the file meta and preamble replaced.

While writing it records, for every byte of the original, either where the same bytes sit in the
output or the original bytes themselves; that delta is the heart of the identity record, so
re-identification rebuilds the original file exactly (:mod:`dgf.dicom.identity`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from dgf import errors, integrity
from dgf.dicom import identity as identity_record
from dgf.dicom import raw, safe_private
from dgf.dicom.profile import SAFE_PRIVATE_CREATORS, Options, Profile
from dgf.dicom.raw import UNDEFINED, Elem, Encoding, Item, Part10

#: dgf's implementation class UID (2.25 + a fixed UUID) and version name, for the new file meta.
IMPLEMENTATION_UID = "2.25.279185436297406287146413585962826049245"
IMPLEMENTATION_VERSION = "DGF_0_1"

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
PATIENT_BIRTH_DATE = 0x00100030
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SOP_UID = 0x00080018
SOP_CLASS = 0x00080016
MODALITY = 0x00080060
BURNED_IN = 0x00280301
PATIENT_IDENTITY_REMOVED = 0x00120062
DEID_METHOD = 0x00120063
DEID_METHOD_CODES = 0x00120064
LONGITUDINAL_MODIFIED = 0x00280303

#: Modalities whose images often carry burned-in text; without a Burned In Annotation value they
#: are treated as if it said YES.
BURNED_IN_MODALITIES = frozenset({"US", "ES", "XC", "SC", "OT", "GM", "SM", "DOC"})

TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
                      "UC", "UI", "UR", "UT"})
#: Dummy values (action D) that are valid for their VR; dates are shifted or dummied by the caller.
DUMMY = {"AE": "ANONYMIZED", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101",
         "DS": "0", "DT": "19000101000000", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED",
         "PN": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED", "TM": "000000",
         "UC": "ANONYMIZED", "UT": "ANONYMIZED", "UR": ""}
WELL_KNOWN_UID_ROOT = "1.2.840.10008."

Seg = tuple[int, int] | bytes

#: Files at least this large are de-identified from a memory map: the header is parsed in place,
#: bulk data is never read into memory, and the output is a layout of new bytes and spans of the
#: source that the uploader streams (see :func:`analyze_file`).
STREAM_MIN = 32 * 1024 * 1024
#: The largest object: one DICOM element holds at most 2^32-2 bytes (PS3.5 7.1.1; 2^32-1 means
#: undefined length), so a single-frame-set object beyond 4 GiB cannot be written.
MAX_OBJECT = 2 ** 32 - 1
_READ = 1024 * 1024


@dataclass
class DeidPlan:
    """What :func:`analyze` found: the parse, each element's action, and what needs pseudonyms."""

    part: Part10
    actions: dict[int, str]  # element start offset -> action code
    dirty: set[int]  # start offsets of elements/items whose bytes change
    uids: set[str]
    patient_key: str
    top: dict[int, Elem]
    #: For a memory-mapped file (:func:`analyze_file`): its descriptor, read with pread.
    fd: int | None = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            data = self.part.data
            if isinstance(data, mmap.mmap):
                try:
                    data.close()
                except BufferError:
                    pass        # a view is still alive; the map goes with it

    def top_text(self, tag: int) -> str:
        e = self.top.get(tag)
        return raw.text_value(self.part.data, e) if e is not None else ""


@dataclass(frozen=True)
class Pseudonyms:
    uids: dict[str, str]
    patient: str
    date_offset_days: int


@dataclass
class Result:
    data: bytes
    key: str  # SHA-256 of the de-identified bytes
    patient: str
    study_uid: str
    series_uid: str
    sop_uid: str
    identity: dict[str, object]  # the identity record, see dgf.dicom.identity
    warnings: list[str] = field(default_factory=list)  # repairs made on read, one sentence each
    #: Streamed results (``data`` empty): the output as new bytes and (start, end) spans of the
    #: source file, its size and its hash list.
    layout: list[Seg] | None = None
    size: int = 0
    blocks: bytes = b""
    #: Byte ranges of the output holding only pixel (or waveform) values: what a sealed object
    #: may keep from the metaserver's check (:func:`dgf.dicom.raw.opaque_values`).
    opaque: list[tuple[int, int]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Step 1: analyze


def analyze_file(path: str, profile: Profile) -> DeidPlan:
    """:func:`analyze` of a file on disk: a memory map for large files (the header is read in
    place, the original is hashed later while streaming), the bytes otherwise.  Small files'
    descriptors are closed at once: a long-lived uploader (the DICOM gateway, the mount) must not
    keep one per file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)     # a FIFO would block the open
    except OSError as exc:
        raise errors.NotFound(f"cannot be read ({exc.strerror})") from exc
    fh = os.fdopen(fd, "rb")                     # owns fd from here: closed exactly once
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.InvalidDicom("it is not a regular file (a pipe, a device or a socket).")
        size = st.st_size
        if size > MAX_OBJECT:
            raise errors.InvalidDicom(
                f"the file is {size} bytes; an object holds at most {MAX_OBJECT} bytes "
                "(one DICOM element is limited to 2^32-2 bytes, PS3.5 7.1.1).")
        if size < STREAM_MIN:
            data = fh.read()
            fh.close()
            return analyze(data, profile)
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        plan_fd = os.dup(fd)                     # the plan's own descriptor, closed by DeidPlan.close
    except OSError as exc:
        raise errors.NotFound(f"cannot be read ({exc.strerror})") from exc
    finally:
        fh.close()
    try:
        plan = analyze(mapped, profile, fd=plan_fd)  # type: ignore[arg-type]
    except BaseException:
        mapped.close()
        os.close(plan_fd)
        raise
    mapped.madvise(mmap.MADV_DONTNEED)    # the header pages the parse touched
    return plan


def analyze(data: bytes, profile: Profile, fd: int | None = None) -> DeidPlan:
    part = raw.parse_part10(data)
    if part.truncated is not None and not profile.options.allow_truncated:
        have, want = part.truncated
        raise errors.InvalidDicom(
            f"the file is truncated: its pixel data (7FE0,0010) has {have} of {want} bytes "
            f"({want - have} missing); -O allow_truncated keeps such a file as it is, marked in its XML header.")
    top = {e.tag: e for e in part.dataset}
    plan = DeidPlan(part, {}, set(), set(), "", top, fd=fd)
    _check_burned_in(plan, profile)
    pid, issuer = plan.top_text(PATIENT_ID), plan.top_text(ISSUER_OF_PATIENT_ID)
    if pid:
        plan.patient_key = f"id:{pid}|issuer:{issuer}"
    elif plan.top_text(PATIENT_NAME):
        plan.patient_key = f"name:{plan.top_text(PATIENT_NAME)}|dob:{plan.top_text(PATIENT_BIRTH_DATE)}"
    else:
        plan.patient_key = f"study:{plan.top_text(STUDY_UID)}"
    for tag in (STUDY_UID, SERIES_UID, SOP_UID):
        if not plan.top_text(tag):
            part.warnings.append(f"the dataset has no {_KEYWORDS[tag]} {_fmt_tag(tag)}; "
                                 "it is placed by content hash")
    _walk(plan, part.dataset, profile, part.data, profile.actions_for(plan.top_text(SOP_CLASS)))
    meta_sop = next((e for e in part.meta if e.tag == 0x00020003), None)
    if meta_sop is not None:
        plan.uids.update(_uids_of(raw.text_value(part.data, meta_sop)))
    return plan


_KEYWORDS = {STUDY_UID: "Study Instance UID", SERIES_UID: "Series Instance UID",
             SOP_UID: "SOP Instance UID"}


def _fmt_tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _check_burned_in(plan: DeidPlan, profile: Profile) -> None:
    if profile.options.allow_burned_in:
        return
    value = plan.top_text(BURNED_IN).upper()
    modality = plan.top_text(MODALITY).upper()
    if value == "YES" or (not value and modality in BURNED_IN_MODALITIES):
        why = "Burned In Annotation is YES" if value == "YES" else \
            f"modality {modality} often has burned-in text and Burned In Annotation is not NO"
        raise errors.PolicyRefused(
            f"refused: {why}, so pixel data may show identity; "
            "use -O allow_burned_in once the pixels are clean.",
            group="burned-in annotation risk", detail=modality or "no modality",
            hint="use -O allow_burned_in once the pixels are clean")


def _uids_of(value: str) -> list[str]:
    return [u for u in value.split("\\") if u and not u.startswith(WELL_KNOWN_UID_ROOT)]


@lru_cache(maxsize=64)
def _actions_by_vr(opts: Options) -> dict[str, str]:
    """PN, DA, DT and TM are handled by VR even when the table does not list the tag."""
    dates = "S" if opts.retain_long_modified_dates else ("K" if opts.retain_long_full_dates else "Z")
    times = "K" if (opts.retain_long_modified_dates or opts.retain_long_full_dates) else "Z"
    return {"PN": "Z", "DA": dates, "DT": dates, "TM": times}


def _walk(plan: DeidPlan, elems: list[Elem], profile: Profile, data: bytes,
          actions: dict[int, str] | None = None) -> bool:
    """Decide actions for ``elems``; return True if any byte under them changes.  ``actions``:
    the top level's, resolved by the SOP class's IOD; nested elements use the Type-agnostic ones."""
    actions = profile.actions if actions is None else actions
    derived = profile.options.derived
    by_vr = _actions_by_vr(profile.options)
    decided, dirty = plan.actions, plan.dirty
    changed = False
    creators = raw.private_creators(elems, data)
    safe = _safe_private(elems, creators) if creators and profile.options.retain_safe_private else set()
    for e in elems:
        tag = e.tag
        group = tag >> 16
        if group & 1:
            # Private elements (and their creators) go, but for dgf's own blocks and, with Retain
            # Safe Private, the elements known to be safe (and their blocks' creators).
            el = tag & 0xFFFF
            block = group << 8 | (el if el <= 0xFF else el >> 8)     # raw.private_block, inline
            if creators.get(block) in SAFE_PRIVATE_CREATORS or e.start in safe:
                act: str | None = None
            else:  # the common case, whole private groups
                decided[e.start] = "X"
                dirty.add(e.start)
                changed = True
                continue
        elif 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
            act = "X"  # curves and whole overlay groups
        elif e.vr == "UN" and e.items is None and raw.dictionary_vr(tag) == "SQ" and e.length:
            act = "X"  # a sequence we could not parse may hide identity anywhere inside
        else:
            act = actions.get(tag)
            if act is None:
                vr = raw.dictionary_vr(tag) if e.vr == "UN" else e.vr
                act = by_vr.get(vr)
        if act == "U" and profile.options.retain_uids or derived and (
                act in ("U", "S") or tag in (PATIENT_ID, PATIENT_NAME)):
            act = "K"
        if act is None or act == "K":
            if e.items is not None and _walk_items(plan, e, profile, data):
                decided[e.start] = "K"
                dirty.add(e.start)
                changed = True
            continue
        if act == "U":
            vr = raw.dictionary_vr(tag) if e.vr == "UN" else e.vr
            if vr == "UI":
                plan.uids.update(_uids_of(raw.text_value(data, e)))
            elif e.items is None:
                act = "D"
        if e.items is not None and act not in ("X", "Z"):
            _walk_items(plan, e, profile, data)
            act = "K"  # recurse: the sequence itself stays, its items are de-identified
        decided[e.start] = act
        dirty.add(e.start)
        changed = True
    return changed


def _safe_private(elems: list[Elem], creators: dict[int, str]) -> set[int]:
    """Start offsets of the private elements that Retain Safe Private keeps: the safe ones and
    the creator elements of their blocks."""
    out: set[int] = set()
    blocks: set[int] = set()
    for e in elems:
        if (e.tag >> 16) & 1 and e.tag & 0xFFFF >= 0x1000 and \
                safe_private.is_safe(creators.get(raw.private_block(e.tag)), e.tag):
            out.add(e.start)
            blocks.add(raw.private_block(e.tag))
    out.update(e.start for e in elems if e.tag & 0x1FF00 == 0x10000 and raw.private_block(e.tag) in blocks)
    return out


def _walk_items(plan: DeidPlan, e: Elem, profile: Profile, data: bytes) -> bool:
    changed = False
    for item in e.items or ():
        if _walk(plan, item.elems, profile, data):
            plan.dirty.add(item.start)
            changed = True
    return changed


# --------------------------------------------------------------------------------------------
# Step 2: apply


class _Segments:
    """Collects output segments: spans of the original (copied) or new bytes."""

    def __init__(self) -> None:
        self.segs: list[Seg] = []
        self.size = 0

    def copy(self, a: int, b: int) -> None:
        if b <= a:
            return
        last = self.segs[-1] if self.segs else None
        if isinstance(last, tuple) and last[1] == a:
            self.segs[-1] = (last[0], b)
        else:
            self.segs.append((a, b))
        self.size += b - a

    def new(self, data: bytes) -> None:
        if data:
            self.segs.append(data)
            self.size += len(data)

    def extend(self, other: _Segments) -> None:
        for s in other.segs:
            if isinstance(s, tuple):
                self.copy(*s)
            else:
                self.new(s)


def _header(tag: int, vr: str, length: int, enc: Encoding) -> bytes:
    tag_bytes = raw._TAG[enc.little].pack(tag >> 16, tag & 0xFFFF)
    if enc.implicit:
        return tag_bytes + enc.u32.pack(length)
    if vr in raw.LONG_VRS:
        return tag_bytes + vr.encode() + b"\0\0" + enc.u32.pack(length)
    if length > 0xFFFF:
        raise errors.InvalidDicom(f"a replacement value for {_fmt_tag(tag)} is too long for VR {vr}.")
    return tag_bytes + vr.encode() + enc.u16.pack(length)


def _pad(value: bytes, vr: str) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "UN") else b" "
    return value


def _encode_element(tag: int, vr: str, value: bytes, enc: Encoding) -> bytes:
    value = _pad(value, vr)
    return _header(tag, vr, len(value), enc) + value


@lru_cache(maxsize=4096)
def _shift_date(text: str, days: int) -> str | None:
    """Shift a DA value (or the date part of a DT value) by whole days; None if unparseable.
    Remembered: a file holds the same date several times (study, series, acquisition, content)
    and a series repeats them (~3 us each, ~8 a CT header)."""
    digits = text.replace(".", "") if len(text) == 10 and text[4] == "." else text
    if len(digits) < 8 or not digits[:8].isdigit():
        return None
    try:
        day = dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
        shifted = day + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return shifted.strftime("%Y%m%d") + digits[8:]


#: Above every tag: no marker left to insert.
_NO_TAG = 1 << 32


class _Applier:
    def __init__(self, plan: DeidPlan, pseudo: Pseudonyms, profile: Profile) -> None:
        self.plan = plan
        self.data = plan.part.data
        self.pseudo = pseudo
        self.profile = profile
        self.removed: list[list[object]] = []
        self.removed_runs: list[list[object]] = []

    def value(self, e: Elem) -> bytes:
        return bytes(self.data[e.vstart:e.value_end])

    def new_value(self, e: Elem, act: str, path: str) -> bytes | None:
        """The replacement value for a changed non-sequence element, None to remove it."""
        vr = raw.dictionary_vr(e.tag) if e.vr == "UN" else e.vr
        text = self.value(e).decode("latin-1").rstrip(" \0") if vr in TEXT_VRS else ""
        if act == "X":
            return None
        if e.tag in (PATIENT_ID, PATIENT_NAME) and path == "":
            return self.pseudo.patient.encode()
        if act == "Z":
            return b""
        if act == "U":
            return "\\".join(self.pseudo.uids.get(u, u) for u in text.split("\\")).encode()
        if act == "S":
            if vr in ("DA", "DT"):
                parts = [_shift_date(v, self.pseudo.date_offset_days) if v else "" for v in text.split("\\")]
                if any(p is None for p in parts):
                    return b""
                return "\\".join(p or "" for p in parts).encode()
            return self.value(e)
        if act == "C":
            return self.value(e) if self._clean(text) else None
        # D: a dummy valid for the VR; dates keep their shape.
        if vr in ("DA", "DT") and self.profile.options.retain_long_modified_dates:
            shifted = _shift_date(text, self.pseudo.date_offset_days)
            if shifted is not None:
                return shifted.encode()
        if vr in DUMMY:
            return DUMMY[vr].encode()
        if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"):
            return b"\0" * e.length
        return b""

    def _clean(self, text: str) -> bool:
        """Clean Descriptors: keep a descriptor only if it contains no identifying token of the
        patient (name parts, IDs, birth date); anything else is removed."""
        low = text.lower()
        tokens = set()
        for tag in (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE):
            for part in self.plan.top_text(tag).replace("^", " ").replace("=", " ").split():
                if len(part) >= 2:
                    tokens.add(part.lower())
        return not any(t in low for t in tokens)

    def record(self, e: Elem, act: str, path: str, creator: str | None) -> None:
        """Note a removed or replaced element: [path of its sequence item, tag, VR, action,
        private creator, start, end] with start/end the value's byte range in the original
        (parsed) file, so the record carries no second copy of the value;
        :func:`dgf.dicom.identity.summary` reads it back."""
        self.removed.append([path, e.tag, e.vr, act, creator, e.vstart, e.value_end])

    def elems(self, elems: list[Elem], enc: Encoding, path: str,
              inserts: dict[int, bytes] | None = None) -> _Segments:
        w = _Segments()
        dirty, actions, runs = self.plan.dirty, self.plan.actions, self.removed_runs
        pending = sorted(inserts.items()) if inserts else []
        next_insert = pending[0][0] if pending else _NO_TAG
        # Unchanged elements are copied as one span until something changes (most of a header).
        span_start = span_end = -1
        for e in elems:
            tag, start = e.tag, e.start
            if tag >= next_insert:
                w.copy(span_start, span_end)
                span_start = span_end = -1
                while pending and pending[0][0] < tag:
                    w.new(pending.pop(0)[1])
                replaces = bool(pending) and pending[0][0] == tag
                if replaces:
                    # A marker replaces an element already present (e.g. Patient Identity Removed NO).
                    self.record(e, "D", path, None)
                    w.new(pending.pop(0)[1])
                next_insert = pending[0][0] if pending else _NO_TAG
                if replaces:
                    continue
            if start not in dirty:
                if start != span_end:
                    w.copy(span_start, span_end)
                    span_start = start
                span_end = e.end
                continue
            act = actions[start]
            if act == "X":
                # The common case (whole private groups): contiguous removed elements are noted
                # as one run of the original's bytes, which :func:`identity.summary` lists
                # element by element.  Nothing is written, so the copied span just ends.
                if runs and runs[-1][2] == start and runs[-1][0] == path:
                    runs[-1][2] = e.end
                else:
                    runs.append([path, start, e.end])
                continue
            w.copy(span_start, span_end)
            span_start = span_end = -1
            if e.items is not None and act == "K":
                w.extend(self.sequence(e, enc, path))
                continue
            if act != "K":
                creator = None
                if tag >> 16 & 1 and tag & 0xFFFF > 0xFF:   # never so far: private data goes whole
                    creator = raw.private_creators(elems, self.data).get(raw.private_block(tag))
                self.record(e, act, path, creator)
            if e.items is not None:  # X or Z on a sequence
                if act == "Z":
                    w.new(_header(tag, e.vr, 0, enc))
                continue
            value = self.new_value(e, act, path)
            if value is not None:
                # Padding follows the element's real VR: a PN written as UN still pads with a space.
                pad_vr = raw.dictionary_vr(tag) if e.vr == "UN" else e.vr
                w.new(_encode_element(tag, e.vr, _pad(value, pad_vr), enc))
        w.copy(span_start, span_end)
        for _, encoded in pending:
            w.new(encoded)
        return w

    def sequence(self, e: Elem, enc: Encoding, path: str) -> _Segments:
        item_enc = raw.IMPLICIT if e.implicit_items else enc
        body = _Segments()
        for i, item in enumerate(e.items or ()):
            body.extend(self.item(item, item_enc, f"{path}{_fmt_tag(e.tag)}[{i}]/"))
        return _container(e.start, e.vstart, e.end, e.length, body,
                          lambda n: _header(e.tag, e.vr, n, enc))

    def item(self, item: Item, enc: Encoding, path: str) -> _Segments:
        if item.start not in self.plan.dirty:
            w = _Segments()
            w.copy(item.start, item.end)
            return w
        return _container(item.start, item.vstart, item.end, item.length,
                          self.elems(item.elems, enc, path),
                          lambda n: raw._TAG[enc.little].pack(0xFFFE, 0xE000) + enc.u32.pack(n))


def _container(start: int, vstart: int, end: int, length: int, body: _Segments,
               header: Callable[[int], bytes]) -> _Segments:
    """A sequence or item around new contents: undefined length keeps its original header and
    delimiter (copied), a defined length gets a new header with the new length."""
    w = _Segments()
    if length == UNDEFINED:
        w.copy(start, vstart)
        w.extend(body)
        w.copy(end - 8, end)
    else:
        w.new(header(body.size))
        w.extend(body)
    return w


def _markers(profile: Profile, enc: Encoding) -> dict[int, bytes]:
    """PS3.15 E.1.1 markers: identity removed, the method, the CID 7050 codes applied (the same
    bytes for every file of one profile and encoding)."""
    return _encoded_markers(profile.options, profile.edition, enc)


@lru_cache(maxsize=64)
def _encoded_markers(options: Options, edition: str, enc: Encoding) -> dict[int, bytes]:
    codes = options.codes()
    items = b""
    for value, meaning in codes:
        body = (_encode_element(0x00080100, "SH", value.encode(), enc)
                + _encode_element(0x00080102, "SH", b"DCM", enc)
                + _encode_element(0x00080104, "LO", meaning.encode(), enc))
        items += raw._TAG[enc.little].pack(0xFFFE, 0xE000) + enc.u32.pack(len(body)) + body
    method = f"dgf PS3.15 Annex E {edition}: Basic Profile" + "".join(
        f"\\{n.replace('_', ' ')}" for n in options.enabled())
    out = {
        PATIENT_IDENTITY_REMOVED: _encode_element(PATIENT_IDENTITY_REMOVED, "CS", b"YES", enc),
        DEID_METHOD: _encode_element(DEID_METHOD, "LO", method[:64 * 10].encode(), enc),
        DEID_METHOD_CODES: _header(DEID_METHOD_CODES, "SQ", len(items), enc) + items,
    }
    if options.retain_long_modified_dates:
        out[LONGITUDINAL_MODIFIED] = _encode_element(LONGITUDINAL_MODIFIED, "CS", b"MODIFIED", enc)
    return out


def _file_meta(plan: DeidPlan, pseudo: Pseudonyms) -> bytes:
    """New file meta (PS3.10 7.1): the originals' class and transfer syntax, pseudonymous
    instance UID, dgf as implementation; no source AE title or private meta."""
    part = plan.part
    meta = {e.tag: e for e in part.meta}
    sop_class = raw.text_value(part.data, meta[0x00020002]) if 0x00020002 in meta else plan.top_text(SOP_CLASS)
    # A dataset without SOP Instance UID (a DICOMDIR) keeps its meta's instance UID, pseudonymised.
    sop_uid = plan.top_text(SOP_UID) or (raw.text_value(part.data, meta[0x00020003]) if 0x00020003 in meta else "")
    return file_meta(sop_class, pseudo.uids.get(sop_uid, sop_uid), part.transfer_syntax)


def file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> bytes:
    """A Part 10 file's preamble and meta (PS3.10 7.1) for a dataset encoded in
    ``transfer_syntax``, dgf as the implementation."""
    enc = raw.EXPLICIT
    body = (_encode_element(0x00020001, "OB", b"\x00\x01", enc)
            + _encode_element(0x00020002, "UI", sop_class.encode(), enc)
            + _encode_element(0x00020003, "UI", sop_uid.encode(), enc)
            + _encode_element(0x00020010, "UI", transfer_syntax.encode(), enc)
            + _encode_element(0x00020012, "UI", IMPLEMENTATION_UID.encode(), enc)
            + _encode_element(0x00020013, "SH", IMPLEMENTATION_VERSION.encode(), enc))
    group_length = _encode_element(0x00020000, "UL", struct.pack("<I", len(body)), enc)
    return b"\0" * 128 + b"DICM" + group_length + body


def apply(plan: DeidPlan, pseudo: Pseudonyms, profile: Profile) -> Result:
    """The de-identified object and its identity record; for a memory-mapped plan, a streamed
    result: its layout, key and hash list computed in one pass over the source."""
    part = plan.part
    applier = _Applier(plan, pseudo, profile)
    head = _file_meta(plan, pseudo)
    body = applier.elems(part.dataset, part.encoding, "", _markers(profile, part.encoding))
    data = part.data
    layout: list[Seg] | None = None
    blocks = b""
    opaque: list[tuple[int, int]] = []
    # The original's digest (identity record v3): every byte but what the output copies of it,
    # of which only identity.covered's parts (the output's own digest covers the rest).
    rest = hashlib.sha256()
    bounds = identity_record.SHARED_MIN, identity_record.SHARED_EDGE      # as the record says
    if part.deflated:
        import zlib
        inflated = b"".join(data[s[0]:s[1]] if isinstance(s, tuple) else s for s in body.segs)
        comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        out = head + comp.compress(inflated) + comp.flush()
        # Spans of the inflated stream do not exist in the deflated original: keep it all.
        original = plan_original(plan)
        delta: list[object] = [base64.b64encode(original).decode()]
        rest.update(original)
        size = len(out)
    else:
        streamed = plan.fd is not None
        layout = [head]
        delta = [base64.b64encode(data[:part.meta_end]).decode()]
        if not streamed:
            rest.update(data[:part.meta_end])
        out_pos, orig_pos = len(head), part.meta_end
        for s in body.segs:
            if isinstance(s, tuple):
                a, b = s
                if a > orig_pos:
                    delta.append(base64.b64encode(data[orig_pos:a]).decode())
                    if not streamed:
                        rest.update(data[orig_pos:a])
                for x, y in identity_record.covered(a, b, *bounds) if not streamed else ():
                    rest.update(data[x:y])
                delta.append([out_pos, b - a])
                orig_pos = b
                out_pos += b - a
            else:
                out_pos += len(s)
            layout.append(s)
        if orig_pos < len(data):
            delta.append(base64.b64encode(data[orig_pos:]).decode())
            if not streamed:
                rest.update(data[orig_pos:])
        size = out_pos
        opaque = _output_ranges(layout, raw.opaque_values(data, part.dataset, part.encoding.little))
    if layout is not None and plan.fd is not None:
        if size > MAX_OBJECT:
            raise errors.InvalidDicom(f"the de-identified object would be {size} bytes; an object "
                                      f"holds at most {MAX_OBJECT} bytes (PS3.5 7.1.1).")
        key, blocks, rest_hex = _stream_digests(plan.fd, layout, len(data), bounds)
        out = b""
    else:
        rest_hex = rest.hexdigest()
        if layout is not None:
            view = memoryview(data)
            out = b"".join(s if isinstance(s, bytes) else view[s[0]:s[1]] for s in layout)
            layout = None
        key = hashlib.sha256(out).hexdigest()
    identity = {
        "v": 3,
        "rest_sha256": rest_hex,
        "shared_min": bounds[0],
        "shared_edge": bounds[1],
        "original_size": len(data) if not part.deflated else len(plan_original(plan)),
        "deid_sha256": key,
        "profile": f"PS3.15 E {profile.edition}",
        "options": profile.options.enabled(),
        "delta": delta,
        "removed": applier.removed,
        "removed_runs": applier.removed_runs,
    }
    return Result(out, key, pseudo.patient,
                  pseudo.uids.get(plan.top_text(STUDY_UID), plan.top_text(STUDY_UID)),
                  pseudo.uids.get(plan.top_text(SERIES_UID), plan.top_text(SERIES_UID)),
                  pseudo.uids.get(plan.top_text(SOP_UID), plan.top_text(SOP_UID)),
                  identity, list(part.warnings), layout=layout, size=size, blocks=blocks, opaque=opaque)


def _output_ranges(layout: list[Seg], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` of the source, where the output copies them whole or in part (output offsets)."""
    out: list[tuple[int, int]] = []
    pos = 0
    for s in layout:
        if isinstance(s, bytes):
            pos += len(s)
            continue
        a, b = s
        for lo, hi in ranges:
            lo, hi = max(lo, a), min(hi, b)
            if lo < hi:
                out.append((pos + lo - a, pos + hi - a))
        pos += b - a
    return out


def pread_span(fd: int, start: int, end: int, chunk: int = _READ) -> Iterator[bytes]:
    """The bytes of ``fd`` from ``start`` to ``end`` in pieces; a file that shrank is an error."""
    pos = start
    while pos < end:
        piece = os.pread(fd, min(chunk, end - pos), pos)
        if not piece:
            raise errors.InvalidDicom("the file changed while it was being read; upload it again.")
        yield piece
        pos += len(piece)


def _stream_digests(fd: int, layout: list[Seg], source_size: int, bounds: tuple[int, int]
                    ) -> tuple[str, bytes, str]:
    """One pass over the source: (key, hash list) of the output and the original's digest of
    identity record v3 (of the copied spans, only :func:`identity.covered`'s parts), as
    :func:`apply` builds the record's delta."""
    out = integrity.Hasher()
    rest = hashlib.sha256()
    pos = 0
    for s in layout:
        if isinstance(s, bytes):
            out.update(s)
            continue
        a, b = s
        for piece in pread_span(fd, pos, a):
            rest.update(piece)
        for piece in pread_span(fd, a, b, 4 * _READ):
            out.update(piece)
        for x, y in identity_record.covered(a, b, *bounds):   # under SHARED_MIN: read again
            for piece in pread_span(fd, x, y):
                rest.update(piece)
        pos = b
    for piece in pread_span(fd, pos, source_size):
        rest.update(piece)
    return out.whole.hexdigest(), out.digests(), rest.hexdigest()


def skeleton(plan: DeidPlan, result: Result) -> mmap.mmap:
    """The streamed output with the interior of its top-level bulk values left as zeros, in an
    anonymous map (untouched pages cost no memory): what the XML header is built from, since
    bulk values never enter it.  Encapsulated fragments keep their item headers so the output
    still parses."""
    from dgf.dicom.xmlheader import is_bulk, reading_vr

    assert result.layout is not None and plan.fd is not None
    holes: list[tuple[int, int, list[int]]] = []        # (start, end, fragment header offsets)
    for e in plan.part.dataset:
        if e.items is not None or e.end - e.vstart < _READ or \
                not is_bulk(e.tag, reading_vr(e, plan.part.encoding.implicit), e.length):
            continue
        if e.length != UNDEFINED:
            holes.append((e.vstart, e.value_end, []))
            continue
        heads, p = [], e.vstart
        while p < e.end:
            heads.append(p)
            n = e.end if p + 8 > e.end else struct.unpack(
                "<I" if plan.part.encoding.little else ">I", os.pread(plan.fd, 8, p)[4:8])[0]
            p += 8 + n
        holes.append((e.vstart, e.end, heads))
    sk = mmap.mmap(-1, max(1, result.size))
    pos = 0
    for s in result.layout:
        if isinstance(s, bytes):
            sk[pos:pos + len(s)] = s
            pos += len(s)
            continue
        a, b = s
        cursor = a
        for lo, hi, heads in holes:
            if hi <= cursor or lo >= b:
                continue
            _copy(plan.fd, sk, pos + cursor - a, cursor, min(lo, b) if lo > cursor else cursor)
            for h in heads:
                if cursor <= h and h + 8 <= b:
                    _copy(plan.fd, sk, pos + h - a, h, h + 8)
            cursor = min(hi, b)
        _copy(plan.fd, sk, pos + cursor - a, cursor, b)
        pos += b - a
    return sk


def _copy(fd: int, sk: mmap.mmap, at: int, start: int, end: int) -> None:
    for piece in pread_span(fd, start, end):
        sk[at:at + len(piece)] = piece
        at += len(piece)


def plan_original(plan: DeidPlan) -> bytes:
    """The original file bytes (for deflated files the parse works on an inflated copy)."""
    return plan.part.original if plan.part.deflated else plan.part.data
