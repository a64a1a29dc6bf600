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
- the SHA-256 of the original and of the de-identified file, so re-identification is verified.

Records travel to the metaserver compressed (:func:`encode`) and are sealed there per patient.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from typing import Any

from dgf import errors


def encode(record: dict[str, Any]) -> bytes:
    return zlib.compress(json.dumps(record, separators=(",", ":")).encode(), 1)


def decode(blob: bytes) -> dict[str, Any]:
    try:
        record = json.loads(zlib.decompress(blob))
    except (zlib.error, ValueError) as exc:
        raise errors.IntegrityError("the identity record is corrupt.") from exc
    if not isinstance(record, dict) or record.get("v") not in (1, 2):
        raise errors.IntegrityError("the identity record has an unknown format version.")
    return record


def reidentify(deid: bytes, record: dict[str, Any]) -> bytes:
    """Rebuild the original file from the de-identified bytes and the identity record."""
    if hashlib.sha256(deid).hexdigest() != record["deid_sha256"]:
        raise errors.IntegrityError("the de-identified object does not match its identity record.")
    parts: list[bytes | memoryview] = []
    view = memoryview(deid)
    for piece in record["delta"]:
        if isinstance(piece, str):
            parts.append(base64.b64decode(piece))
        else:
            offset, length = piece
            parts.append(view[offset:offset + length])
    original = b"".join(parts)
    if hashlib.sha256(original).hexdigest() != record["original_sha256"]:
        raise errors.IntegrityError("re-identification did not reproduce the original file.")
    return original


def reidentify_file(deid_path: str, record: dict[str, Any], out_path: str) -> None:
    """:func:`reidentify` from a file to a file, in pieces (objects of any size), both digests
    checked on the way."""
    import os

    check = hashlib.sha256()
    with open(deid_path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            check.update(piece)
    if check.hexdigest() != record["deid_sha256"]:
        raise errors.IntegrityError("the de-identified object does not match its identity record.")
    original = hashlib.sha256()
    fd = os.open(deid_path, os.O_RDONLY)
    try:
        with open(out_path, "xb") as out:
            for piece in record["delta"]:
                if isinstance(piece, str):
                    chunks: Any = [base64.b64decode(piece)]
                else:
                    offset, length = piece
                    chunks = _pread(fd, offset, length)
                for chunk in chunks:
                    original.update(chunk)
                    out.write(chunk)
    finally:
        os.close(fd)
    if original.hexdigest() != record["original_sha256"]:
        os.unlink(out_path)
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


def summary(record: dict[str, Any], original: bytes) -> dict[str, Any]:
    """The human part of a record: what was removed or replaced, with the original values
    (read from ``original``, the re-identified file), for people and user.dgf.identity."""
    from dgf.dicom import raw

    part = raw.parse_part10(original)
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
        creators = {(e.tag >> 16, e.tag & 0xFFFF): raw.text_value(data, e) for e in elems
                    if (e.tag >> 16) & 1 and 0x10 <= (e.tag & 0xFFFF) <= 0xFF}
        for e in elems:
            if any(a <= e.start < b for a, b in spans):
                g = e.tag >> 16
                creator = creators.get((g, (e.tag & 0xFF00) >> 8)) if g & 1 and (e.tag & 0xFFFF) > 0xFF else None
                out.append([path + _tag(e.tag), "SQ" if e.items is not None else e.vr, "X", creator,
                            e.vstart, e.value_end])
            elif e.items is not None:
                for i, item in enumerate(e.items):
                    walk(item.elems, f"{path}{_tag(e.tag)}[{i}]/")

    walk(dataset, "")
    return out
