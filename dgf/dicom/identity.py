"""Identity records and exact re-identification.

An identity record (built by :func:`dgf.dicom.deid.apply`) holds, for one instance:

- ``delta``: the original file as a list of pieces, each either ``[offset, length]`` (those bytes
  of the de-identified file) or a base64 string (original bytes that de-identification removed or
  replaced: PHI values, old element headers, the original file meta and preamble);
- ``removed``: each removed or replaced element as ``[path, VR, action, private creator, start,
  end]``, its path in nested sequences ending in its tag and start/end the byte range of its
  original value in the original file (so values are not stored twice); :func:`summary` turns
  these into readable entries given the original;
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
    if not isinstance(record, dict) or record.get("v") != 1:
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


def summary(record: dict[str, Any], original: bytes) -> dict[str, Any]:
    """The human part of a record: what was removed or replaced, with the original values
    (read from ``original``, the re-identified file), for people and user.dgf.identity."""
    from dgf.dicom import raw

    data = raw.parse_part10(original).data  # inflated, for deflated files: the offsets' frame
    removed = []
    for path, vr, action, creator, start, end in record.get("removed", []):
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
