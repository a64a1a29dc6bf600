"""Identity records and exact re-identification.

An identity record (built by :func:`dgf.dicom.deid.apply`) holds, for one instance:

- ``delta``: the original file as a list of pieces, each either ``[offset, length]`` (those bytes
  of the de-identified file) or a base64 string (original bytes that de-identification removed or
  replaced: PHI values, old element headers, the original file meta and preamble);
- ``removed``: each removed or replaced element as ``[item path, tag, VR, action, private
  creator, start, end]``, the item path locating it in nested sequences (``"(0008,1115)[0]/"``,
  empty at the top level) and start/end the byte range of its original value in the original
  file (so values are not stored twice); :func:`summary` turns these into readable entries given
  the original;
- ``removed_runs``: ``[item path, start, end]`` for runs of whole elements removed one after
  another (private groups, mostly): the same information, listed per element by :func:`summary`;
- the SHA-256 of the de-identified file, and of the original: whole in versions 1 and 2
  (``original_sha256``); in version 3 (``rest_sha256``) of the original's bytes outside the
  pieces the de-identified file holds in spans of at least ``shared_min`` bytes (the pixel
  data, mostly), which the de-identified file's own digest covers, and of the first and last
  ``shared_edge`` bytes of each such span, so a span taken from the wrong place is caught too;
  so re-identification is verified either way, and an upload hashes a large file's bulk once,
  not twice.  The whole
  original's SHA-256 is what :func:`summary` shows, computed from the re-identified file.

Records travel to the metaserver compressed (:func:`encode`) and are sealed there per patient.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mmap
import zlib
from collections.abc import Iterator
from typing import Any

from dgf import errors

#: Version 3 leaves copy pieces of at least this many bytes out of ``rest_sha256`` but for
#: their first and last SHARED_EDGE bytes; each record says which bounds it was built with
#: (``shared_min``, ``shared_edge``), so they may change.
SHARED_MIN = 16 * 1024
SHARED_EDGE = 64


def covered(start: int, end: int, least: int, edge: int) -> tuple[tuple[int, int], ...]:
    """The parts of a span [start, end) that the original and the de-identified file share
    which version 3's ``rest_sha256`` covers, in order: all of it, or for a span of ``least``
    bytes or more its first and last ``edge`` bytes.  The one statement of the rule: the
    de-identifier hashes these parts of the original, re-identification of the rebuilt one."""
    if end - start < least:
        return ((start, end),)
    return ((start, start + edge), (end - edge, end))


def encode(record: dict[str, Any]) -> bytes:
    return zlib.compress(json.dumps(record, separators=(",", ":")).encode(), 1)


def decode(blob: bytes) -> dict[str, Any]:
    try:
        record = json.loads(zlib.decompress(blob))
    except (zlib.error, ValueError) as exc:
        raise errors.IntegrityError("the identity record is corrupt.") from exc
    return _versioned(record)


#: What :func:`leading` reads of a record that inflates past its limit.
HEAD = 64 * 1024


def leading(blob: bytes, limit: int) -> dict[str, Any]:
    """A record from outside (an uploader's), read within ``limit`` bytes of memory: whole (and
    checked as :func:`decode` does) when it inflates to at most ``limit`` bytes, else only its
    members before the first that does not end within its first HEAD bytes (``original_size``
    comes before ``delta``).  zlib reaches ~1000:1, and a file whose profile removed a large
    element has a legitimately large record: neither is inflated whole."""
    stream = zlib.decompressobj()
    try:
        text = stream.decompress(blob, limit + 1)
    except zlib.error as exc:
        raise errors.IntegrityError("the identity record is corrupt.") from exc
    if len(text) <= limit:
        if not stream.eof:
            raise errors.IntegrityError("the identity record is corrupt (it is cut short).")
        try:
            return _versioned(json.loads(text))
        except ValueError as exc:
            raise errors.IntegrityError("the identity record is corrupt.") from exc
    head = text[:HEAD].decode("ascii", "replace")
    del text
    members: dict[str, Any] = {}
    scan, pos = json.JSONDecoder(), 1
    while head.startswith("{"):
        try:
            key, pos = scan.raw_decode(head, pos)
            if head[pos] != ":":
                break
            members[key], pos = scan.raw_decode(head, pos + 1)
        except (ValueError, IndexError):
            break
        if head[pos:pos + 1] != ",":
            break
        pos += 1
    return _versioned(members)


def _versioned(record: object) -> dict[str, Any]:
    if not isinstance(record, dict) or record.get("v") not in (1, 2, 3):
        raise errors.IntegrityError("the identity record has an unknown format version.")
    return record


def restore(deid: bytes, record: dict[str, Any]) -> bytes:
    """The identified file: the exact original (:func:`reidentify`), or for a derived file its
    source patient's identity put back (:func:`restore_derived`)."""
    if record.get("derived_from"):
        return restore_derived(deid, record)
    return reidentify(deid, record)


def reidentify(deid: bytes, record: dict[str, Any]) -> bytes:
    """Rebuild the original file from the de-identified bytes and the identity record."""
    if hashlib.sha256(deid).hexdigest() != record.get("deid_sha256"):
        raise errors.IntegrityError("the de-identified object does not match its identity record.")
    parts: list[bytes | memoryview] = []
    view = memoryview(deid)
    check = _OriginalCheck(record)
    for piece in _delta(record):
        if isinstance(piece, bytes):
            part: bytes | memoryview = piece
            check.digest.update(piece)
        else:
            offset, length = piece
            part = view[offset:offset + length]
            if len(part) != length:
                raise errors.IntegrityError("the identity record names bytes the de-identified object "
                                            "does not have.")
            for a, b in check.covered(offset, length):
                check.digest.update(view[a:b])
        parts.append(part)
    original = b"".join(parts)
    check.verify(len(original))
    return original


def reidentify_file(deid_path: str, record: dict[str, Any], out_path: str, whole: bool = False) -> str:
    """:func:`restore` from a file to a file, in pieces (objects of any size), both digests
    checked on the way.  With ``whole``, the original's SHA-256 (for :func:`summary`, which
    then need not read the original again), else an empty string."""
    import os

    if record.get("derived_from"):
        with open(deid_path, "rb") as fh, open(out_path, "xb") as out:
            out.write(restore_derived(fh.read(), record))
        return ""

    digest = hashlib.sha256()
    with open(deid_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != record.get("deid_sha256"):
        raise errors.IntegrityError("the de-identified object does not match its identity record.")
    check = _OriginalCheck(record)
    original = hashlib.sha256()
    fd = os.open(deid_path, os.O_RDONLY)
    size = 0
    made = False
    try:
        with open(out_path, "xb") as out:
            made = True
            for piece in _delta(record):
                if isinstance(piece, bytes):
                    chunks: Any = [piece]
                    parts: tuple[tuple[int, int], ...] = ()
                    hashed = True                  # the original's own bytes: all of them
                else:
                    offset, length = piece
                    chunks = _pread(fd, offset, length)
                    parts = check.covered(offset, length)
                    hashed = parts == ((offset, offset + length),)     # all of it, as it streams
                for chunk in chunks:
                    if hashed:
                        check.digest.update(chunk)
                    if whole:
                        original.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                for a, b in parts if not hashed else ():               # a shared span's edges
                    for chunk in _pread(fd, a, b - a):
                        check.digest.update(chunk)
        check.verify(size)
    except BaseException:
        if made:                               # never a file that was there before
            os.unlink(out_path)
        raise
    finally:
        os.close(fd)
    return original.hexdigest() if whole else ""


def _delta(record: dict[str, Any]) -> Iterator[bytes | list[int]]:
    """The record's delta, piece by piece: the original's own bytes, or ``[offset, length]`` of
    the de-identified file; anything else is a corrupt record, said so."""
    delta = record.get("delta")
    if not isinstance(delta, list):
        raise errors.IntegrityError("the identity record is corrupt (it has no delta).")
    for piece in delta:
        if isinstance(piece, str):
            try:
                yield base64.b64decode(piece)
            except ValueError:
                raise errors.IntegrityError("the identity record is corrupt (a piece is not base64).") from None
        elif isinstance(piece, list) and len(piece) == 2 and all(type(v) is int and v >= 0 for v in piece):
            yield piece
        else:
            raise errors.IntegrityError("the identity record is corrupt (a piece of its delta is malformed).")


class _OriginalCheck:
    """The digest a record keeps of its original (see the module's docstring), fed in order as
    the original is rebuilt: its own bytes whole, the spans it shares with the de-identified
    file as far as :meth:`covered` says."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.rest = record.get("v") == 3
        least, edge = record.get("shared_min"), record.get("shared_edge")
        if self.rest and (not isinstance(least, int) or not isinstance(edge, int) or not 0 <= 2 * edge <= least
                          or least < 1):
            raise errors.IntegrityError("the identity record has no valid shared_min and shared_edge.")
        self.least, self.edge = (int(least or 0), int(edge or 0)) if self.rest else (0, 0)
        self.digest = hashlib.sha256()

    def covered(self, offset: int, length: int) -> tuple[tuple[int, int], ...]:
        """The parts of the de-identified file's [offset, offset + length) that the digest
        covers: all of it before version 3."""
        if not self.rest:
            return ((offset, offset + length),)
        return covered(offset, offset + length, self.least, self.edge)

    def verify(self, size: int) -> None:
        want = self.record.get("rest_sha256" if self.rest else "original_sha256")
        if size != self.record.get("original_size", size) or self.digest.hexdigest() != want:
            raise errors.IntegrityError("re-identification did not reproduce the original file.")


def _pread(fd: int, offset: int, length: int) -> Any:
    import os

    end = offset + length
    while offset < end:
        chunk = os.pread(fd, min(1 << 20, end - offset), offset)
        if not chunk:
            raise errors.IntegrityError("the de-identified object is shorter than its identity record says.")
        yield chunk
        offset += len(chunk)


#: What a derived series (a reconstruction) shares with the instance it was computed from: the
#: Patient module (group 0010), the General Study module's identifying attributes and the frame
#: of reference.  An identified read of a derived file gets these from its source's record.
STUDY_TAGS = frozenset({0x00080020, 0x00080030, 0x00080050, 0x00080090, 0x00081030, 0x0020000D,
                        0x00200010, 0x00200052})


def shared_with_derived(tag: int) -> bool:
    return (tag >> 16 == 0x0010 and not tag & 0x10000) or tag in STUDY_TAGS


def _original_ranges(record: dict[str, Any], ranges: list[tuple[int, int]]) -> list[bytes | None]:
    """The original's bytes in each range, read from the record alone (the values
    de-identification removed or replaced are its base64 pieces); None where a range reaches
    bytes the de-identified file kept."""
    pieces: list[tuple[int, int, bytes | None]] = []   # (start, end, bytes or None for kept)
    pos = 0
    for piece in record["delta"]:
        if isinstance(piece, str):
            data = base64.b64decode(piece)
            pieces.append((pos, pos + len(data), data))
            pos += len(data)
        else:
            pieces.append((pos, pos + piece[1], None))
            pos += piece[1]
    out: list[bytes | None] = []
    for start, end in ranges:
        parts: list[bytes] = []
        for a, b, held in pieces:
            if b <= start or a >= end:
                continue
            if held is None:
                parts = []
                break
            parts.append(held[max(start - a, 0):end - a])
        joined = b"".join(parts)
        out.append(joined if len(joined) == end - start else None)
    return out


def restore_derived(derived: bytes, record: dict[str, Any]) -> bytes:
    """A derived file (computed from de-identified data) with its source patient's identity put
    back: each attribute of :func:`shared_with_derived` that de-identification removed or
    replaced in the source (``record``, the source's identity record) takes its original value,
    added where the derived file lacks it.  Sequences are not carried over."""
    from dgf.dicom import raw

    wanted = [(tag, vr, start, end) for parent, tag, vr, _action, _creator, start, end in record.get("removed", [])
              if record.get("v") in (2, 3) and parent == "" and vr != "SQ" and shared_with_derived(tag)]
    values = _original_ranges(record, [(start, end) for _, _, start, end in wanted])
    if any(v is None for v in values):
        raise errors.IntegrityError("the source's identity record does not hold the values a derived "
                                    "file needs.")
    part = raw.parse_part10(derived)
    if part.transfer_syntax != raw.EXPLICIT_LE:
        raise errors.InvalidDicom("a derived file is expected in Explicit VR Little Endian.")
    new: dict[int, tuple[str, bytes]] = {tag: (vr, value) for (tag, vr, _, _), value in zip(wanted, values)
                                         if value is not None}
    out = bytearray(derived[:part.meta_end])

    def emit(tag: int) -> None:
        vr, value = new.pop(tag)
        if len(value) % 2:
            value += b"\0" if vr == "UI" else b" "
        head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little") + vr.encode()
        size = len(value).to_bytes(4, "little")
        out.extend(head + (b"\0\0" + size if vr in raw.LONG_VRS else size[:2]) + value)

    for elem in part.dataset:
        replaced = False
        for tag in sorted(t for t in new if t <= elem.tag):
            replaced = replaced or tag == elem.tag
            emit(tag)
        if not replaced:
            out.extend(derived[elem.start:elem.end])
    for tag in sorted(new):
        emit(tag)
    return bytes(out)


def summary(record: dict[str, Any], original: bytes | mmap.mmap, original_sha256: str = "") -> dict[str, Any]:
    """The human part of a record: what was removed or replaced, with the original values
    (read from ``original``, the re-identified file, in memory or mapped), for people and
    user.dgf.identity.  The original's SHA-256 is the record's (versions 1 and 2), else
    ``original_sha256`` when the caller has it, else computed here."""
    from dgf.dicom import raw

    part = raw.parse_part10(original)  # type: ignore[arg-type]  # a map reads as bytes do
    data = part.data  # inflated, for deflated files: the offsets' frame
    rows = []
    for row in record.get("removed", []):
        if record["v"] == 1:  # [path with tag, VR, action, creator, start, end]
            rows.append(row)
        else:  # [path of the item, tag, VR, ...]
            parent, tag, vr, action, creator, start, end = row
            rows.append([f"{parent}{_tag(tag)}", vr, action, creator, start, end])
    if record.get("removed_runs"):
        rows.extend(_runs(record["removed_runs"], part.dataset, data))
    rows.sort(key=lambda r: r[4])
    removed = []
    for path, vr, action, creator, start, end in rows:
        entry: dict[str, Any] = {"path": path, "vr": vr, "action": action}
        if creator:
            entry["creator"] = creator
        value = bytes(data[start:end])
        if vr == "SQ" or len(value) > 65536:
            entry["length"] = len(value)
        elif vr in ("AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                    "UI", "UR", "UT"):
            entry["value"] = value.decode("utf-8", "replace").rstrip(" \0")
        else:
            entry["value_base64"] = base64.b64encode(value).decode()
        removed.append(entry)
    out: dict[str, Any] = {k: record[k] for k in ("original_sha256", "original_size", "profile", "options")
                           if k in record}
    out.setdefault("original_sha256", original_sha256 or hashlib.sha256(original).hexdigest())
    out["removed"] = removed
    return out


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _runs(runs: list[list[Any]], dataset: list[Any], data: bytes) -> list[list[Any]]:
    """Rows (as in ``removed``) for each element inside the runs of removed bytes, found by
    walking the original's elements (paths built as :mod:`dgf.dicom.deid` builds them)."""
    from dgf.dicom import raw

    by_path: dict[str, list[tuple[int, int]]] = {}
    for path, start, end in runs:
        by_path.setdefault(path, []).append((start, end))
    out: list[list[Any]] = []

    def walk(elems: list[raw.Elem], path: str) -> None:
        spans = by_path.get(path, ())
        creators = raw.private_creators(elems, data)
        for e in elems:
            if any(a <= e.start < b for a, b in spans):
                g = e.tag >> 16
                creator = creators.get(raw.private_block(e.tag)) if g & 1 and (e.tag & 0xFFFF) > 0xFF else None
                out.append([path + _tag(e.tag), "SQ" if e.items is not None else e.vr, "X", creator,
                            e.vstart, e.value_end])
            elif e.items is not None:
                for i, item in enumerate(e.items):
                    walk(item.elems, f"{path}{_tag(e.tag)}[{i}]/")

    walk(dataset, "")
    return out
