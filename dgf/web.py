"""``dgf web``: the archive over DICOMweb (PS3.18), and the OHIF viewer in the browser.

An ASGI application (starlette, served by uvicorn) that acts, for each request, as the dgf
principal its bearer token is bound to (``dgf web token create``): roles, grants and audit apply
exactly as on the CLI, since every call goes through that principal's own client.

- **QIDO-RS**: ``/dicomweb/studies``, ``/series``, ``/instances`` (and the nested forms), with
  attribute matching as C-FIND does it (single values, ``*``/``?``, date and time ranges, UID
  lists), ``includefield``, ``limit``/``offset``; fuzzy matching is off.  Answered from the
  header index (``dgf.dimse.find``): no bulk data is read.
- **WADO-RS**: studies, series and instances as ``multipart/related; type="application/dicom"``
  (as stored with ``transfer-syntax=*``; Explicit VR Little Endian, the standard's default, when
  the request names none), metadata as DICOM JSON (from the XML headers, no bulk data read),
  frames (``multipart/related`` of raw or compressed frames), rendered frames (JPEG or PNG
  with ``window=center,width`` and ``viewport=width,height``) and thumbnails of studies, series,
  instances and frames (Supplement 203).  Identified instances only for tokens created with
  ``--identified`` whose principal may see identity (the metaserver decides, and audits).
- **STOW-RS**: ``POST /dicomweb/studies``: the body is spooled to disk (bounded), split, and sent
  through the same de-identification and upload pipeline as ``dgf_up``.  De-identification
  coerces attributes, so stored instances come back with warning 0xB000 (status 202).
- **The viewer**: ``/`` serves OHIF (``@ohif/app``, fetched once with npm and checked against a
  pinned digest) configured against this server's own endpoints.  A browser signs in at
  ``/login`` with a token; the HttpOnly, SameSite=Strict cookie it gets is honoured for reads
  only (GET), so a cross-site form cannot store through it.

Bounds: request heads (``header_timeout_s`` to arrive whole; size, h11's), request bodies
(``max_body_mb``, checked before reading and while reading, 30 s per chunk), matches per query
(``find_limit``), connections (``max_connections``, ``connections_per_address`` of them from one
client address).  HTTPS when ``certificate`` and ``private_key`` are set.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dgf import config as dgf_config
from dgf import dicomjson, dimse, errors, pixels
from dgf.client import Client
from dgf.limits import RefusalLog, count_down
from dgf.pixels import EXPLICIT_LE, NATIVE_SYNTAXES
from dgf.types import HEADER_XATTR, IDENTITY_ROLES

log = logging.getLogger("dgf.web")

#: The viewer: the npm package, the version this server configures, and its tarball's digest
#: (npm's ``dist.integrity``): a different tarball is refused.
VIEWER_PACKAGE = "@ohif/app"
VIEWER_VERSION = "3.13.2"
VIEWER_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
COOKIE = "dgf_token"
#: Seconds a client may take to send the next piece of a request body.
BODY_CHUNK_S = 30.0
#: Instances' bytes kept for frame and rendered requests (a viewer asks for each frame apart).
INSTANCE_CACHE_S = 30.0
#: Frames of a native instance larger than this are read by range, not through the whole
#: instance (which the instance cache holds for the smaller ones).
RANGED_FRAMES_MIN = 32 * 1024 * 1024
#: The box a thumbnail fits in when the request names no viewport (it keeps the frame's aspect,
#: and is never larger than the frame), and the largest viewport a rendering is scaled to.
THUMBNAIL = (128, 128)
VIEWPORT_MAX = 4096
#: Series whose middle instance a study's thumbnail tries before it gives up (some hold no pixels);
#: the files and series it looks at to choose (the first found, by inode), and its first page.
THUMBNAIL_TRIES = 3
THUMBNAIL_FILES = 100_000
THUMBNAIL_SERIES = 64
THUMBNAIL_PAGE = 1000
#: A series whose Instance Numbers do not start at 1 is ordered by the numbers in its headers up to
#: this many files; a larger one takes its middle by path.
THUMBNAIL_NUMBERED = 2000
#: A UID as a URL may name one: a quote would end the XPath literal it is written into, and a
#: non-conformant UID (letters, a trailing space) is still someone's study.
UID = re.compile(r"[^'\\\x00-\x1f]{1,64}")
COERCED = 0xB000                         # Warning: coercion of data elements (PS3.4 Annex B)
FAILED_PROCESSING = 0x0110
STUDY_MISMATCH = 0xA900                  # the instance's study is not the one in the URL

#: Attributes each level returns by default (PS3.18 Tables 10.6.3-3 to -5, those the index holds).
STUDY_FIELDS = ["StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
SERIES_FIELDS = ["Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "SeriesDate",
                 "SeriesTime", "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
                 "PerformedProcedureStepStartTime", "StudyInstanceUID"]
INSTANCE_FIELDS = ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
                   "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID"]


@dataclass(frozen=True)
class WebConfig:
    """The ``[web]`` section of a web config."""

    path: Path
    listen: tuple[str, int]
    tokens: Path
    spool: Path
    viewer: Path | None                    # None: no viewer
    certificate: Path | None = None
    private_key: Path | None = None
    max_body_mb: int = 4096
    find_limit: int = 10_000
    max_connections: int = 64
    #: Connections one client address may hold at once; 0: no bound (behind a reverse proxy,
    #: where every connection comes from the proxy).  Default: half of max_connections, so that
    #: browsers behind one NAT (six connections each) are not cut off.
    connections_per_address: int | None = None
    header_timeout_s: int = 10              # a request head must arrive within this

    @property
    def per_address(self) -> int:
        if self.connections_per_address is not None:
            return self.connections_per_address
        return max(1, self.max_connections // 2)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WebConfig:
        p = Path(path).resolve()
        v = dgf_config.read_section(p, "web")
        base = p.parent
        try:
            numbers = {k: int(v[k]) for k in ("max_body_mb", "find_limit", "max_connections",
                                               "connections_per_address", "header_timeout_s") if k in v}
        except ValueError as exc:
            raise errors.ConfigError(f"config file {p}: a [web] limit is not a whole number.") from exc
        if any(n < 0 for n in numbers.values()):
            raise errors.ConfigError(f"config file {p}: a [web] limit is negative.")
        cert, key = v.get("certificate"), v.get("private_key")
        if bool(cert) != bool(key):
            raise errors.ConfigError(f"config file {p}: HTTPS needs both 'certificate' and 'private_key'.")
        viewer = v.get("viewer", "").strip()
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dgf" / f"ohif-{VIEWER_VERSION}"
        return cls(
            path=p, listen=dgf_config.parse_address(v.get("listen", "127.0.0.1:8042"), "listen"),
            tokens=dgf_config._rel(base, v.get("tokens", "web-tokens.json")),
            spool=dgf_config._rel(base, v.get("spool", "web-spool")),
            viewer=None if viewer == "off" else dgf_config._rel(base, viewer) if viewer else cache,
            certificate=dgf_config._rel(base, cert) if cert else None,
            private_key=dgf_config._rel(base, key) if key else None, **numbers)


# --------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class Token:
    name: str
    principal: Path                  # the client config of the principal the token acts as
    identified: bool
    created: str


class Tokens:
    """Bearer tokens, kept as SHA-256 digests in a JSON file (mode 0600) beside the config; a
    running server sees a created or revoked token at its next request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._by_digest: dict[str, Token] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _digest(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()

    def _read(self) -> list[dict[str, Any]]:
        try:
            return list(json.loads(self.path.read_text())["tokens"])
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            raise errors.ConfigError(f"token file {self.path} is not valid ({exc}).") from exc

    def _write(self, rows: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"tokens": rows}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def _token(self, row: dict[str, Any]) -> Token:
        return Token(str(row["name"]), dgf_config._rel(self.path.parent, str(row["principal"])),
                     bool(row.get("identified")), str(row.get("created", "")))

    def create(self, name: str, principal: Path, identified: bool = False) -> str:
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise errors.UsageError("a token name is 1-64 letters, digits, '-', '_' or '.'.")
        dgf_config.ClientConfig.load(principal)          # a config that loads, before a token for it
        rows = self._read()
        if any(r["name"] == name for r in rows):
            raise errors.AlreadyExists(f"a token named {name!r} exists; revoke it first.")
        token = "dgf_" + secrets.token_urlsafe(32)
        rows.append({"name": name, "sha256": self._digest(token), "principal": str(principal.resolve()),
                     "identified": identified, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self._write(rows)
        return token

    def revoke(self, name: str) -> None:
        rows = self._read()
        kept = [r for r in rows if r["name"] != name]
        if len(kept) == len(rows):
            raise errors.NotFound(f"no token is named {name!r}.")
        self._write(kept)

    def list(self) -> list[Token]:
        return [self._token(r) for r in self._read()]

    def verify(self, token: str) -> Token | None:
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._by_digest = {str(r["sha256"]): self._token(r) for r in self._read()}
                self._stamp = stamp
            return self._by_digest.get(self._digest(token))


# --------------------------------------------------------------------------------------------
# Requests: what they ask for


def _viewport(text: str | None) -> tuple[int, int] | None:
    """A ``viewport`` query parameter (PS3.18 8.3.5.1.3), width and height in pixels, each at
    most VIEWPORT_MAX (None: the request gives none)."""
    if not text:
        return None
    parts = text.split(",")
    if len(parts) == 6:
        raise HTTPProblem(400, "a viewport's source region (sx,sy,sw,sh) is not supported; give WIDTH,HEIGHT.")
    try:
        if len(parts) != 2:
            raise ValueError
        width, height = int(parts[0]), int(parts[1])
    except ValueError as exc:
        raise HTTPProblem(400, f"viewport is WIDTH,HEIGHT in whole pixels, not {text[:40]!r}.") from exc
    if not (1 <= width <= VIEWPORT_MAX and 1 <= height <= VIEWPORT_MAX):
        raise HTTPProblem(400, f"a viewport's width and height are 1 to {VIEWPORT_MAX} pixels.")
    return width, height


class HTTPProblem(Exception):
    """A request refused: the status and one sentence naming the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def status_of(exc: errors.DgfError) -> int:
    return {errors.NotFound: 404, errors.PermissionDenied: 403, errors.PolicyRefused: 403,
            errors.UsageError: 400, errors.LimitExceeded: 413, errors.AlreadyExists: 409,
            errors.TransportError: 502, errors.ServerError: 502}.get(type(exc), 500)


def _attribute(name: str) -> tuple[str, str]:
    """A query parameter's attribute (keyword or tag) as (keyword, VR)."""
    from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

    tag: int | None = None
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        tag = int(name, 16)
    else:
        tag = tag_for_keyword(name)
    keyword = keyword_for_tag(tag) if tag is not None else ""
    if tag is None or not keyword:
        raise HTTPProblem(400, f"{name[:64]!r} is not a DICOM attribute keyword or tag "
                               "(a sequence item's attribute is SEQUENCE.ATTRIBUTE).")
    return keyword, dictionary_VR(tag)


@dataclass
class QidoQuery:
    """A QIDO-RS request read by :func:`parse_query`: its C-FIND keys, the attributes to return, and
    the page (not :class:`metaserver.query.Query`, an XPath cohort query)."""
    keys: list[dimse.Key]
    fields: list[str]
    limit: int
    offset: int
    warnings: list[str]


def parse_query(params: list[tuple[str, str]], level: str, scope: dict[str, str], cap: int) -> QidoQuery:
    """QIDO-RS query parameters as C-FIND keys, the attributes to return, and the page."""
    fields = {"STUDY": STUDY_FIELDS, "SERIES": STUDY_FIELDS + SERIES_FIELDS,
              "IMAGE": STUDY_FIELDS + SERIES_FIELDS + INSTANCE_FIELDS}[level]
    if scope.get("StudyInstanceUID"):
        fields = {"STUDY": STUDY_FIELDS, "SERIES": SERIES_FIELDS, "IMAGE": INSTANCE_FIELDS}[level]
    wanted = list(dict.fromkeys(fields))
    keys: dict[str, dimse.Key] = {}
    limit, offset, warnings = cap, 0, []
    def item_key(name: str, value: str) -> None:
        """SEQUENCE[.SEQUENCE...].ATTRIBUTE: an item key of a sequence key (matching, or returned)."""
        parts = name.split(".")
        path = [_attribute(part) for part in parts] if len(parts) <= dimse.MAX_SEQUENCE_DEPTH + 1 else []
        if not path or any(vr != "SQ" for _, vr in path[:-1]) or path[-1][1] == "SQ":
            raise HTTPProblem(400, f"{name[:64]!r}: a sequence's attribute is SEQUENCE.ATTRIBUTE (sequences "
                                   f"nested at most {dimse.MAX_SEQUENCE_DEPTH} deep).")
        keyword, vr = path[-1]
        text = value.replace(",", "\\") if vr == "UI" else value
        seq = path[0][0]
        keys[seq] = _nest(keys.get(seq, dimse.Key(seq, "SQ", "")), [k for k, _ in path[1:-1]],
                          dimse.Key(keyword, vr, text.strip()))
        wanted.append(seq)

    for name, value in params:
        if name in ("limit", "offset"):
            if not (value.isascii() and value.isdigit()):      # '²' is a digit int() refuses
                raise HTTPProblem(400, f"{name} must be a whole number, not {value[:32]!r}.")
            if name == "limit":
                limit = min(int(value), cap)
            else:
                offset = int(value)
        elif name == "includefield":
            for item in filter(None, (v.strip() for v in value.split(","))):
                if "." in item:
                    item_key(item, "")
                elif item != "all":
                    wanted.append(_attribute(item)[0])
        elif name == "fuzzymatching":
            if value.lower() == "true":
                warnings.append('299 dgf: "fuzzymatching is not supported; exact matching was used"')
        elif "." in name:                        # sequence matching: SEQUENCE.ATTRIBUTE=value
            item_key(name, value)
        else:
            keyword, vr = _attribute(name)
            text = value.replace(",", "\\") if vr == "UI" or keyword == "ModalitiesInStudy" else value
            keys[keyword] = dimse.Key(keyword, vr, text.strip())
            wanted.append(keyword)
    for keyword, uid in scope.items():
        keys[keyword] = dimse.Key(keyword, "UI", uid)
    for keyword in dict.fromkeys(wanted):
        if keyword not in keys:
            keys[keyword] = dimse.Key(keyword, _attribute(keyword)[1], "")
    return QidoQuery(list(keys.values()), list(dict.fromkeys(wanted)), limit, offset, warnings)


def _nest(seq: dimse.Key, path: list[str], leaf: dimse.Key) -> dimse.Key:
    """Sequence key ``seq`` with ``leaf`` added as an item key, inside the sequences ``path`` names."""
    if not path:
        return dimse.Key(seq.keyword, "SQ", "", (*seq.items, leaf))
    inner = next((i for i in seq.items if i.keyword == path[0]), dimse.Key(path[0], "SQ", ""))
    rest = tuple(i for i in seq.items if i.keyword != path[0])
    return dimse.Key(seq.keyword, "SQ", "", (*rest, _nest(inner, path[1:], leaf)))


def _item_json(keys: tuple[dimse.Key, ...], found: dict[str, Any]) -> dict[str, Any]:
    """A matched sequence item (dimse.match_item) as DICOM JSON."""
    from pydicom.datadict import tag_for_keyword

    out = dicomjson.dataset({k: v for k, v in found.items() if isinstance(v, str)},
                            [i.keyword for i in keys if i.vr != "SQ"])
    for i in keys:
        if i.vr == "SQ":
            sub = found.get(i.keyword)
            out[f"{tag_for_keyword(i.keyword):08X}"] = {"vr": "SQ",
                                                       "Value": [_item_json(i.items, sub)] if sub is not None else []}
    return dict(sorted(out.items()))


def answer_json(level: str, fields: list[str], entity: dimse.Entity, base: str,
                sequences: Sequence[dimse.Key] = ()) -> dict[str, Any]:
    """One QIDO-RS result as DICOM JSON, with its RetrieveURL (and, for sequence keys, the item
    that matched)."""
    values = dict(entity.values)
    for keyword in fields:
        if keyword in dimse.COUNTED:
            values[keyword] = str(len(entity.members.get(dimse.COUNTED[keyword], set()) - {""}))
        elif keyword == "ModalitiesInStudy":
            values[keyword] = "\\".join(sorted(entity.members.get("Modality", set()) - {""}))
    out = dicomjson.dataset(values, fields)
    from pydicom.datadict import tag_for_keyword

    for k in sequences:
        found = entity.items.get(k.keyword)
        out[f"{tag_for_keyword(k.keyword):08X}"] = {"vr": "SQ",
                                                   "Value": [_item_json(k.items, found)] if found is not None else []}
    url = f"{base}/studies/{values.get('StudyInstanceUID', '')}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{values.get('SeriesInstanceUID', '')}"
    if level == "IMAGE":
        url += f"/instances/{values.get('SOPInstanceUID', '')}"
    out["00081190"] = {"vr": "UR", "Value": [url]}
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Accepted:
    """What an Accept header allows for one kind of part: the media types, and the transfer
    syntaxes each allows (``*``: as stored)."""

    types: dict[str, set[str]]

    @classmethod
    def parse(cls, header: str, default_type: str) -> Accepted:
        types: dict[str, set[str]] = {}
        for item in filter(None, (x.strip() for x in (header or "").split(","))):
            media, *params = [p.strip() for p in item.split(";")]
            args = {}
            for p in params:
                k, _, v = p.partition("=")
                args[k.strip().lower()] = v.strip().strip('"')
            if media.lower() == "multipart/related":
                media = args.get("type", default_type).lower()
            else:
                media = media.lower()
            if media in ("*/*", "*"):
                media = default_type
            types.setdefault(media, set()).add(args.get("transfer-syntax", ""))
        if not types:
            types[default_type] = {""}
        return cls(types)

    def syntax(self, media: str, stored: str, default: str = EXPLICIT_LE) -> str | None:
        """The transfer syntax to send ``media`` in (None: not acceptable)."""
        allowed = self.types.get(media)
        if allowed is None:
            return None
        if "*" in allowed or stored in allowed:
            return stored
        return next((s for s in sorted(allowed) if s), default)


@dataclass(frozen=True)
class _Ranged:
    """A large native instance read by range (see ``Web.ranged``)."""

    syntax: str
    head: bytes                         # the file up to its pixel data element
    count: int                          # frames
    size: int                           # bytes per frame
    pixels_at: int                      # where the pixel data's value starts
    read: Callable[[int, int], bytes]   # verified bytes of the object

    def frame(self, index: int) -> bytes:
        return self.read(self.pixels_at + index * self.size, self.size)

    def dataset(self, index: int) -> Any:
        """The header with frame ``index`` alone as its pixel data, to render."""
        import pydicom
        from pydicom.filebase import DicomBytesIO

        ds = pydicom.dcmread(DicomBytesIO(self.head))
        ds.NumberOfFrames = 1
        ds.add_new(0x7FE00010, "OW" if int(ds.BitsAllocated) > 8 else "OB", self.frame(index))
        return ds


def multipart(parts: Iterator[tuple[str, bytes]], boundary: str) -> Iterator[bytes]:
    """A multipart/related body of (content type, bytes) parts."""
    for ctype, data in parts:
        yield (f"--{boundary}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data + b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def split_multipart(body: Path, boundary: bytes, out_dir: Path, max_parts: int) -> list[tuple[Path, str]]:
    """The parts of the multipart body in the file ``body``, each written to a file of
    ``out_dir``: [(file, content type)]."""
    parts: list[tuple[Path, str]] = []
    delim = b"--" + boundary
    if body.stat().st_size == 0:
        raise HTTPProblem(400, "the request body is empty.")
    with open(body, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = m.find(delim)
        if pos < 0:
            raise HTTPProblem(400, "the multipart body holds no part (no boundary line).")
        while True:
            pos += len(delim)
            if m[pos:pos + 2] == b"--":
                return parts
            eol = m.find(b"\r\n", pos)
            head_end = m.find(b"\r\n\r\n", eol) if eol >= 0 else -1
            if head_end < 0:
                raise HTTPProblem(400, "a multipart part has no end to its headers.")
            ctype = ""
            for line in m[eol + 2:head_end].split(b"\r\n"):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-type":
                    ctype = value.strip()
            start = head_end + 4
            end = m.find(b"\r\n" + delim, start)
            if end < 0:
                raise HTTPProblem(400, "the multipart body ends inside a part (truncated upload?).")
            if len(parts) >= max_parts:
                raise HTTPProblem(413, f"the request holds more than {max_parts} parts.")
            target = out_dir / f"part-{len(parts):06d}.dcm"
            with open(target, "wb") as w:
                for i in range(start, end, 1 << 22):
                    w.write(m[i:min(end, i + (1 << 22))])
            parts.append((target, ctype))
            pos = end + 2


# --------------------------------------------------------------------------------------------
# The viewer


def ensure_viewer(target: Path) -> bool:
    """The OHIF viewer's files in ``target``, fetched once with npm and checked against the
    pinned digest; False (and why, in the log) when it cannot be had."""
    if (target / "index.html").exists():
        return True
    npm = shutil.which("npm")
    if npm is None:
        log.warning("the viewer is not installed in %s and npm is missing (apt-get install npm); "
                    "DICOMweb is served without it", target)
        return False
    log.info("fetching the OHIF viewer (%s@%s, about 50 MB, once) into %s", VIEWER_PACKAGE, VIEWER_VERSION, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            subprocess.run([npm, "pack", f"{VIEWER_PACKAGE}@{VIEWER_VERSION}", "--pack-destination", tmp],
                           cwd=tmp, check=True, capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            log.warning("npm could not fetch the viewer (%s); DICOMweb is served without it",
                        (getattr(exc, "stderr", b"") or b"").decode(errors="replace").strip()[-300:] or exc)
            return False
        tarball = next(Path(tmp).glob("*.tgz"))
        algo, _, want = VIEWER_INTEGRITY.partition("-")
        digest = hashlib.new(algo)
        with open(tarball, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if base64.b64encode(digest.digest()).decode() != want:
            log.error("the fetched viewer tarball does not match its pinned digest; it is not used")
            return False
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, members=[m for m in tar.getmembers() if m.name.startswith("package/dist/")],
                           filter="data")
        os.replace(Path(tmp) / "package" / "dist", target)
    return True


def viewer_config(base: str) -> str:
    """OHIF's app-config.js: one DICOMweb data source, this server."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb", "sourceName": "dgf",
        "configuration": {
            "friendlyName": "dgf archive", "name": "dgf", "wadoUriRoot": f"{base}/dicomweb",
            "qidoRoot": f"{base}/dicomweb", "wadoRoot": f"{base}/dicomweb", "qidoSupportsIncludeField": True,
            "imageRendering": "wadors", "thumbnailRendering": "wadors", "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False, "supportsWildcard": True, "staticWado": False,
            "singlepart": "", "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": False}}}
    config = {"routerBasename": "/", "extensions": [], "modes": [], "showStudyList": True,
              "maxNumberOfWebWorkers": 2, "showWarningMessageForCrossOrigin": False,
              "showCPUFallbackMessage": False, "showLoadingIndicator": True, "strictZSpacingForVolumeViewport": True,
              "defaultDataSourceName": "dgf", "dataSources": [source],
              "maxNumRequests": {"interaction": 100, "thumbnail": 10, "prefetch": 10}}
    return f"window.config = {json.dumps(config, indent=1)};\n"


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>dgf: sign in</title>
<style>body{font:16px sans-serif;background:#0b1a2a;color:#eee;display:flex;justify-content:center;margin-top:12vh}
form{background:#16283d;padding:2em;border-radius:8px;min-width:26em}input{width:100%;font-size:1em;margin:.6em 0;padding:.4em}
.e{color:#f88}</style></head><body><form method="post" action="/login"><h2>dgf archive</h2>
<p>Paste the token from <code>dgf web token create</code>.</p>{problem}
<input type="password" name="token" id="token" autocomplete="off" autofocus>
<input type="submit" value="Sign in" id="signin"></form></body></html>"""


# --------------------------------------------------------------------------------------------
# The application


class Web:
    def __init__(self, cfg: WebConfig) -> None:
        self.cfg = cfg
        self.tokens = Tokens(cfg.tokens)
        self._clients: dict[Path, Client] = {}
        self._roles: dict[Path, str] = {}
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._cache_bytes = 0
        #: What ``ranged`` found of an instance, per reading client and path, for as long as
        #: the instance cache keeps bytes: a viewer asks for frame after frame.
        self._geometry: OrderedDict[tuple[int, str], tuple[float, _Ranged | None]] = OrderedDict()
        self.viewer: Path | None = None
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dgf-web-meta")

    def client(self, token: Token) -> Client:
        with self._lock:
            c = self._clients.get(token.principal)
            if c is None:
                c = self._clients[token.principal] = Client(token.principal)
            return c

    def role(self, token: Token) -> str:
        with self._lock:
            known = self._roles.get(token.principal)
        if known is None:
            known = str(self.client(token).whoami()["role"])
            with self._lock:
                self._roles[token.principal] = known
        return known

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        for c in self._clients.values():
            c.close()

    # -- archive calls (blocking; run in the thread pool) ------------------------------------

    def paths(self, client: Client, study: str, series: str | None = None, instance: str | None = None) -> list[str]:
        keys = [dimse.Key("StudyInstanceUID", "UI", study)]
        if series:
            keys.append(dimse.Key("SeriesInstanceUID", "UI", series))
        if instance:
            keys.append(dimse.Key("SOPInstanceUID", "UI", instance))
        found = dimse.find(client, "IMAGE", keys, self.cfg.find_limit)
        paths = [p for e in found.values() for p in e.paths]
        if not paths:
            what = f"instance {instance}" if instance else f"series {series}" if series else f"study {study}"
            raise HTTPProblem(404, f"{what} is not in the archive (or not visible to this token).")
        return sorted(paths)

    def instance(self, client: Client, path: str) -> bytes:
        """One instance's de-identified bytes, kept a little while: a viewer asks for each frame
        of a multi-frame instance apart.  Keyed by path: the bytes are the same de-identified
        object for every principal, and a caller has found the path visible first (``paths``)."""
        key = path
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < INSTANCE_CACHE_S:
                self._cache.move_to_end(key)
                return hit[1]
        data = client.read_file(path)
        with self._lock:
            self._cache[key] = (now, data)
            self._cache_bytes += len(data)
            while self._cache_bytes > 256 << 20 and self._cache:
                _, (_, old) = self._cache.popitem(last=False)
                self._cache_bytes -= len(old)
        return data

    def metadata(self, client: Client, paths: list[str]) -> list[dict[str, Any]]:
        from dgf.dicom import xmlheader

        return [xmlheader.to_json(xml) for xml in client.getxattrs(paths, HEADER_XATTR)]

    # -- HTTP ---------------------------------------------------------------------------------

    def session(self, request: Any) -> Token:
        auth = request.headers.get("authorization", "")
        token: Token | None = None
        if auth[:7].lower() == "bearer ":
            token = self.tokens.verify(auth[7:].strip())
        elif request.method in ("GET", "HEAD") and request.cookies.get(COOKIE):
            token = self.tokens.verify(request.cookies[COOKIE])
        if token is None:
            raise HTTPProblem(401, "a valid bearer token is required (dgf web token create).",
                              {"WWW-Authenticate": 'Bearer realm="dgf"'})
        return token

    @staticmethod
    def base(request: Any) -> str:
        return f"{request.url.scheme}://{request.url.netloc}"

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(fn, *args)

    async def qido(self, request: Any) -> Any:
        from starlette.responses import Response

        token = self.session(request)
        p = request.path_params
        level = "IMAGE" if request.url.path.endswith("/instances") else \
            "SERIES" if request.url.path.endswith("/series") else "STUDY"
        scope = {k: v for k, v in (("StudyInstanceUID", p.get("study")), ("SeriesInstanceUID", p.get("series"))) if v}
        q = parse_query(list(request.query_params.multi_items()), level, scope, self.cfg.find_limit)
        client = self.client(token)
        page, truncated = await self.call(self._find, client, level, q)
        sequences = [k for k in q.keys if k.vr == "SQ" and k.items]
        body = [answer_json(level, q.fields, e, self.base(request) + "/dicomweb", sequences) for e in page]
        headers = {}
        warnings = list(q.warnings)
        if truncated:
            warnings.append(f'299 dgf: "the query matches more than {self.cfg.find_limit} entities; '
                            'narrow it to see the rest"')
        if warnings:
            headers["Warning"] = ", ".join(warnings)
        return Response(json.dumps(body), media_type="application/dicom+json", headers=headers)

    def _find(self, client: Client, level: str, q: QidoQuery) -> tuple[list[dimse.Entity], bool]:
        """The page's matching entities, and whether the query matches more than find_limit
        (a warning).  A page within find_limit reads the files of its own entities, and those
        before it only as far as telling them apart needs (dimse.find)."""
        limit = self.cfg.find_limit
        if q.offset + q.limit < limit:
            return list(dimse.find(client, level, q.keys, q.limit, truncate=True, skip=q.offset).values()), False
        found = list(dimse.find(client, level, q.keys, limit + 1, truncate=True).values())
        return found[:limit][q.offset:q.offset + q.limit], len(found) > limit

    async def retrieve(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import StreamingResponse

        from dgf.dicom.raw import stored_syntax

        token = self.session(request)
        p = request.path_params
        client = self.client(token)
        paths = await self.call(self.paths, client, p["study"], p.get("series"), p.get("instance"))
        accepted = Accepted.parse(request.headers.get("accept", ""), "application/dicom")
        if "application/dicom" not in accepted.types:
            raise HTTPProblem(406, "instances are sent as multipart/related; type=\"application/dicom\" only.")
        # The fetch (verified, failover) runs in a thread and hands each instance to the event
        # loop, which sends it: no thread hop per part, no copy of the bytes.  An instance past
        # the download's streaming threshold comes as an open (unlinked) spool file and is sent
        # a MiB at a time: a 2 GB instance costs this server disk, not memory.
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[bytes | BinaryIO | BaseException | None] = asyncio.Queue(maxsize=8)
        stop = threading.Event()

        def hand(item: bytes | BinaryIO | BaseException | None) -> None:
            fut = asyncio.run_coroutine_threadsafe(got.put(item), loop)
            while not stop.is_set():
                try:
                    fut.result(timeout=1.0)
                    return
                except TimeoutError:
                    continue
            if (fut.cancel() or fut.exception() is not None) and isinstance(item, io.IOBase):
                item.close()                        # not queued (a queued one drain() closes)
            raise errors.TransportError("the HTTP client went away.")

        def drain() -> None:
            """Close the spool files left queued when the stream ends early."""
            while not got.empty():
                item = got.get_nowait()
                if isinstance(item, io.IOBase):
                    item.close()

        def last(item: BaseException | None) -> None:
            """Hand the stream its error or its end, unless the HTTP client went away (before or
            while this waits): then nobody reads it, and the thread ends quietly."""
            if not stop.is_set():
                with contextlib.suppress(errors.TransportError):
                    hand(item)

        def fetch() -> None:
            try:
                report = client.fetch_streams(paths, lambda _path, data: hand(data), identified=token.identified,
                                              stop=stop)
                if report.failed:
                    last(errors.TransportError(f"{len(report.failed)} instance(s) could not be read: "
                                               f"{report.failed[0].reason}"))
            except BaseException as exc:                        # noqa: BLE001 - handed to the stream
                last(exc)
            finally:
                last(None)

        async def part(item: bytes | BinaryIO) -> tuple[bytes, bytes | BinaryIO]:
            payload: bytes | BinaryIO = item
            try:
                stored = stored_syntax(item if isinstance(item, bytes) else os.pread(item.fileno(), 64 * 1024, 0))
                want = accepted.syntax("application/dicom", stored)
                if want is None:
                    raise HTTPProblem(406, "no acceptable transfer syntax.")
                if want != stored:
                    data = item if isinstance(item, bytes) else await run_in_threadpool(item.read)
                    payload = await run_in_threadpool(pixels.transcode, data, want)
            except BaseException:
                if not isinstance(item, bytes):
                    item.close()
                raise
            if not isinstance(item, bytes) and payload is not item:
                item.close()
            size = len(payload) if isinstance(payload, bytes) else os.fstat(payload.fileno()).st_size
            head = f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={want}\r\n" \
                   f"Content-Length: {size}\r\n\r\n"
            return head.encode(), payload

        async def next_part() -> tuple[bytes, bytes | BinaryIO] | None:
            item = await got.get()
            if isinstance(item, BaseException):
                raise item
            return None if item is None else await part(item)

        boundary = secrets.token_hex(16)
        threading.Thread(target=fetch, daemon=True, name="dgf-web-fetch").start()
        try:
            first = await next_part()           # the first part decides the status (404, 406, 403...)
        except BaseException:
            stop.set()
            drain()
            raise

        async def body() -> Any:
            try:
                current = first
                while current is not None:
                    yield current[0]
                    payload = current[1]
                    if isinstance(payload, bytes):
                        yield payload
                    else:
                        with payload:
                            while chunk := await run_in_threadpool(payload.read, 1 << 20):
                                yield chunk
                    yield b"\r\n"
                    current = await next_part()
                yield f"--{boundary}--\r\n".encode()
            except BaseException as exc:
                log.error("WADO-RS stream for token %s ended early: %s", token.name, exc)
                raise                               # the client sees a cut multipart body
            finally:
                stop.set()
                if current is not None and not isinstance(current[1], bytes):
                    current[1].close()
                drain()

        return StreamingResponse(body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')

    async def metadata_route(self, request: Any) -> Any:
        from starlette.responses import Response

        token = self.session(request)
        p = request.path_params
        client = self.client(token)
        paths = await self.call(self.paths, client, p["study"], p.get("series"), p.get("instance"))
        body = await self.call(self.metadata, client, paths)
        return Response(json.dumps(body), media_type="application/dicom+json")

    def ranged(self, client: Client, path: str) -> _Ranged | None:
        """:meth:`_ranged`, remembered for INSTANCE_CACHE_S: one resolve and one header read per
        instance, not per frame (a small instance's None spares its frames the resolve)."""
        key, now = (id(client), path), time.monotonic()
        with self._lock:
            hit = self._geometry.get(key)
            if hit is not None and now - hit[0] < INSTANCE_CACHE_S:
                return hit[1]
        found = self._ranged(client, path)
        with self._lock:
            self._geometry[key] = (now, found)
            self._geometry.move_to_end(key)
            while len(self._geometry) > 1024:
                self._geometry.popitem(last=False)
        return found

    def _ranged(self, client: Client, path: str) -> _Ranged | None:
        """A large instance stored with native little-endian pixel data, ready to read frame by
        frame by range (the header from the object's first block, each frame from the blocks
        that hold it; every byte verified); None where the instance is small (the instance
        cache answers), compressed, big endian, 1-bit or its header does not fit the first
        block: the whole-instance path answers those.  A viewer asks for a 2000-frame
        instance frame by frame; each request read and parsed all of it."""
        from dgf.dicom import raw
        from dgf.integrity import BLOCK
        from dgf.reader import ObjectRef

        refs = ObjectRef.all_of(client.resolve([path]))
        if not refs or refs[0].size <= RANGED_FRAMES_MIN:
            return None
        ref = refs[0]

        def read(offset: int, length: int) -> bytes:
            start = offset - offset % BLOCK
            end = min(ref.size, -(-(offset + length) // BLOCK) * BLOCK)
            return client.reader.read(ref, start, end - start)[offset - start:offset - start + length]

        try:
            part = raw.parse_part10(read(0, min(ref.size, BLOCK)))
        except errors.InvalidDicom:
            return None
        if part.deflated or part.transfer_syntax not in (EXPLICIT_LE, pixels.IMPLICIT_LE):
            return None
        top = {e.tag: e for e in part.dataset}
        pixel = top.get(0x7FE00010)
        if pixel is None or pixel.length == raw.UNDEFINED or any(
                t not in top or top[t].length != 2 for t in (0x00280010, 0x00280011, 0x00280100)):
            return None

        def us(tag: int, default: int) -> int:
            e = top.get(tag)
            return default if e is None or e.length != 2 else int.from_bytes(part.data[e.vstart:e.vstart + 2], "little")

        rows, cols, bits = us(0x00280010, 0), us(0x00280011, 0), us(0x00280100, 0)
        size = rows * cols * us(0x00280002, 1) * bits // 8
        frames = top.get(0x00280008)
        try:
            count = int(raw.text_value(part.data, frames) or 1) if frames is not None else 1
        except ValueError:
            return None
        # The head cuts the pixel data short: its declared length is what the object holds.
        length = part.truncated[1] if part.truncated is not None else pixel.length
        if bits == 1 or size <= 0 or count * size > length or pixel.vstart + length > ref.size:
            return None
        return _Ranged(part.transfer_syntax, bytes(part.data[:pixel.start]), count, size, pixel.vstart, read)

    async def _instance(self, request: Any) -> tuple[Client, str]:
        """The session's client and the archive path of the instance the URL names."""
        p = request.path_params
        client = self.client(self.session(request))
        paths = await self.call(self.paths, client, p["study"], p["series"], p["instance"])
        return client, paths[0]

    async def _dataset(self, client: Client, path: str) -> Any:
        import pydicom
        from pydicom.filebase import DicomBytesIO

        data = await self.call(self.instance, client, path)
        return pydicom.dcmread(DicomBytesIO(data))

    @staticmethod
    def _frame_numbers(text: str, count: int, has_pixels: bool) -> list[int]:
        try:
            numbers = [int(x) for x in text.split(",")]
        except ValueError as exc:
            raise HTTPProblem(400, f"frame numbers are whole numbers separated by commas, not {text[:40]!r}.") from exc
        if len(numbers) > count:
            # Each frame is decoded and sent once per mention: a list longer than the instance
            # (frames/1,1,1,...) would cost a decode per item for nothing.
            raise HTTPProblem(400, f"{len(numbers)} frame numbers were asked of an instance with {count} frame(s).")
        bad = [n for n in numbers if not 1 <= n <= count]
        if bad or not has_pixels:
            raise HTTPProblem(404, f"frame {bad[0] if bad else numbers[0]} does not exist "
                                   f"(the instance has {count if has_pixels else 0}).")
        return numbers

    async def frames(self, request: Any) -> Any:
        from pydicom.encaps import generate_frames
        from starlette.responses import Response

        client, path = await self._instance(request)
        frames_asked = request.path_params["frames"]
        accepted = Accepted.parse(request.headers.get("accept", ""), "application/octet-stream")
        if "application/octet-stream" not in accepted.types:
            raise HTTPProblem(406, "frames are sent as multipart/related; type=\"application/octet-stream\" only.")
        ranged = await self.call(self.ranged, client, path)
        wanted = accepted.syntax("application/octet-stream", ranged.syntax) if ranged is not None else None
        if ranged is not None and wanted in (EXPLICIT_LE, pixels.IMPLICIT_LE):
            numbers = self._frame_numbers(frames_asked, ranged.count, True)
            data = await self.call(lambda: [ranged.frame(n - 1) for n in numbers])
            sent = wanted
        else:
            ds = await self._dataset(client, path)
            numbers = self._frame_numbers(frames_asked, int(ds.get("NumberOfFrames", 1) or 1), "PixelData" in ds)
            stored = str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_LE))
            want = accepted.syntax("application/octet-stream", stored)

            def frames() -> list[bytes]:
                if want == stored and stored not in NATIVE_SYNTAXES:
                    count = int(ds.get("NumberOfFrames", 1) or 1)
                    all_frames = list(generate_frames(ds.PixelData, number_of_frames=count))
                    return [all_frames[n - 1] for n in numbers]
                if want not in NATIVE_SYNTAXES:
                    raise HTTPProblem(406, f"frames are not transcoded to {want}; ask for transfer-syntax=* "
                                           f"or {EXPLICIT_LE}.")
                if stored not in NATIVE_SYNTAXES:
                    return pixels.decoded_frames(ds, [n - 1 for n in numbers])
                return [pixels.frame_bytes(ds, n - 1) for n in numbers]

            data = await self.call(frames)
            sent = want if want is not None else EXPLICIT_LE
        boundary = secrets.token_hex(16)
        body = b"".join(multipart(((f"application/octet-stream; transfer-syntax={sent}", f) for f in data), boundary))
        return Response(body, media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}')

    async def rendered(self, request: Any) -> Any:
        client, path = await self._instance(request)
        return await self._render(request, client, path, request.path_params.get("frame"), False)

    async def thumbnail(self, request: Any) -> Any:
        """A small rendering (THUMBNAIL, or ``viewport``) of an instance or frame, or of a series'
        or a study's representative instance: the series' middle one by Instance Number, the
        study's first series (by number) whose middle instance has pixel data; at most
        THUMBNAIL_TRIES are tried."""
        p = request.path_params
        if p.get("instance"):
            client, path = await self._instance(request)
            frames = p.get("frames")               # a frame list's thumbnail is its first frame's
            return await self._render(request, client, path, frames.split(",", 1)[0] if frames else None, True)
        client = self.client(self.session(request))
        study = p["study"]
        candidates = await self.call(self._representatives, client, study, p.get("series"))
        for n, (series, paths) in enumerate(candidates):
            path = await self.call(self._middle, client, study, series, paths)
            try:
                return await self._render(request, client, path, None, True)
            except HTTPProblem as exc:
                if exc.status != 404 or n == len(candidates) - 1:
                    raise
        raise HTTPProblem(404, "no instance to make a thumbnail of.")   # (_representatives names one at least)

    def _representatives(self, client: Client, study: str, series: str | None) -> list[tuple[str, list[str]]]:
        """The series a study's or a series' thumbnail is made of, in the order to try (by
        number), each with its files: the thumbnail is of its middle one (:meth:`_middle`).
        From the index alone (the files' paths and series), plus one header per series for its
        number: a study's thumbnail no longer reads every header of the study."""
        from dgf.dicom import xmlheader

        what = f"series {series}" if series else f"study {study}"
        if not all(UID.fullmatch(u) for u in (study, series) if u is not None):
            raise HTTPProblem(404, f"{what[:80]!r} is not in the archive (not a UID).")
        xpath = f"/DicomHeader[StudyInstanceUID='{study}']" + (f"[SeriesInstanceUID='{series}']" if series else "")
        by_series: dict[str, list[str]] = {}
        rows = client.find_iter(xpath, "/", page=THUMBNAIL_PAGE)
        try:
            for n, row in enumerate(rows):
                if n >= THUMBNAIL_FILES:
                    break
                levels = row.get("levels")
                uid = str(levels[2]) if isinstance(levels, list) and len(levels) == 3 else ""
                by_series.setdefault(uid, []).append(str(row["path"]))
        finally:
            rows.close()
        if not by_series:
            raise HTTPProblem(404, f"{what} is not in the archive (or not visible to this token).")
        firsts = {uid: min(paths) for uid, paths in list(by_series.items())[:THUMBNAIL_SERIES]}

        def number(xml: bytes) -> int:
            try:
                text = (xmlheader.top_text(xml, "SeriesNumber") or "").strip()
            except errors.DgfError:
                return 1 << 31
            return int(text) if text.lstrip("-").isdigit() else 1 << 31

        numbers = dict(zip(firsts, map(number, client.getxattrs(list(firsts.values()), HEADER_XATTR))))
        return [(uid, by_series[uid]) for uid in sorted(firsts, key=lambda u: (numbers[u], u))[:THUMBNAIL_TRIES]]

    @staticmethod
    def _middle(client: Client, study: str, series: str, paths: list[str]) -> str:
        """A series' middle instance by Instance Number (its files are named by SOP Instance
        UID, whose order says nothing).  A series of n files numbered from 1 to n, as most are,
        is answered by the index: the files numbered 1, n // 2 + 1 and n.  Otherwise the numbers
        of the series' headers are read (up to THUMBNAIL_NUMBERED files); with none, the middle
        by path."""
        paths = sorted(paths)
        middle = paths[len(paths) // 2]
        if len(paths) < 3 or not series or not UID.fullmatch(series):
            return middle
        of = set(paths)
        xpath = f"/DicomHeader[StudyInstanceUID='{study}'][SeriesInstanceUID='{series}']"

        def numbered(rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
            out = []
            for row in rows:
                text = str(row.get("values", {}).get("InstanceNumber", "")).strip()
                if str(row["path"]) in of and text.lstrip("-").isdigit():
                    out.append((int(text), str(row["path"])))
            return sorted(out)

        n, half = len(paths), len(paths) // 2 + 1
        # Three files when numbered 1..n; a series whose files share numbers may have many.
        ends = numbered(client.find(f"{xpath}[InstanceNumber=1 or InstanceNumber={half} or InstanceNumber={n}]",
                                    "/", show=["InstanceNumber"], limit=64))
        if {1, half, n} <= {k for k, _ in ends}:
            return next(p for k, p in ends if k == half)
        if n > THUMBNAIL_NUMBERED:
            return middle
        every = numbered(client.find(xpath, "/", show=["InstanceNumber"], limit=THUMBNAIL_NUMBERED + 1))
        return every[len(every) // 2][1] if every else middle

    async def _render(self, request: Any, client: Client, path: str, frame: str | None, thumbnail: bool) -> Any:
        """Frame ``frame`` (None: the first) of the instance at ``path`` as the client's accepted
        image type, scaled to the request's ``viewport``; a ``thumbnail`` without one fits in
        THUMBNAIL, never enlarged."""
        from starlette.responses import Response

        viewport = _viewport(request.query_params.get("viewport"))
        enlarge = viewport is not None or not thumbnail
        if viewport is None and thumbnail:
            viewport = THUMBNAIL
        ranged = await self.call(self.ranged, client, path)
        if ranged is not None:                        # the header and the one frame, by range
            index = self._frame_numbers(frame, ranged.count, True)[0] - 1 if frame else 0
            ds = await self.call(ranged.dataset, index)
            index = 0
        else:
            ds = await self._dataset(client, path)
            index = self._frame_numbers(frame, int(ds.get("NumberOfFrames", 1) or 1), "PixelData" in ds)[0] - 1 \
                if frame else 0
        if "PixelData" not in ds:
            raise HTTPProblem(404, "the instance has no pixel data to render.")
        window = None
        if request.query_params.get("window"):
            try:
                c, w, *_ = request.query_params["window"].split(",")
                window = (float(c), float(w))
            except ValueError as exc:
                raise HTTPProblem(400, "window is CENTER,WIDTH[,FUNCTION] in numbers.") from exc
        # The first of JPEG (the default, also for image/* and */*) or PNG the client accepts.
        accepted = Accepted.parse(request.headers.get("accept", ""), "image/jpeg")
        media = next((m if m != "image/*" else "image/jpeg" for m in accepted.types
                      if m in ("image/jpeg", "image/png", "image/*")), None)
        if media is None:
            raise HTTPProblem(406, "rendered frames are image/jpeg or image/png.")
        quality = request.query_params.get("quality", "90")
        level = max(1, min(int(quality), 100)) if quality.isascii() and quality.isdigit() else 90
        data = await self.call(pixels.render, ds, index, window, media, level, viewport, enlarge)
        return Response(data, media_type=media)

    async def stow(self, request: Any) -> Any:
        from starlette.responses import Response

        token = self.session(request)
        ctype = request.headers.get("content-type", "")
        media, *params = [x.strip() for x in ctype.split(";")]
        args = {k.strip().lower(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in params)}
        if media.lower() != "multipart/related" or args.get("type", "application/dicom").lower() != "application/dicom":
            raise HTTPProblem(415, 'STOW-RS takes multipart/related; type="application/dicom".')
        if not args.get("boundary"):
            raise HTTPProblem(400, "the multipart content type names no boundary.")
        limit = self.cfg.max_body_mb << 20
        length = request.headers.get("content-length")
        if length and length.isascii() and length.isdigit() and int(length) > limit:
            raise HTTPProblem(413, f"the body ({int(length) >> 20} MiB) is larger than max_body_mb ({self.cfg.max_body_mb}).")
        if await self.call(self.role, token) not in IDENTITY_ROLES:
            raise HTTPProblem(403, f"token {token.name!r} acts as a principal that may not upload.")
        self.cfg.spool.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="stow-", dir=self.cfg.spool))
        try:
            body = work / "body"
            size = 0
            with open(body, "wb") as fh:
                stream = request.stream().__aiter__()
                while True:
                    try:
                        chunk = await asyncio.wait_for(stream.__anext__(), BODY_CHUNK_S)
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError as exc:
                        raise HTTPProblem(408, f"the body stalled for {BODY_CHUNK_S:.0f} s.") from exc
                    size += len(chunk)
                    if size > limit:
                        raise HTTPProblem(413, f"the body is larger than max_body_mb ({self.cfg.max_body_mb}).")
                    fh.write(chunk)
            parts = await self.call(split_multipart, body, args["boundary"].encode("latin-1"), work, 100_000)
            body.unlink()
            report = await self.call(self._store, self.client(token), parts, request.path_params.get("study"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        stored, failed = report
        status = 200 if stored and not failed else 202 if stored else 409
        base = self.base(request) + "/dicomweb"
        out: dict[str, Any] = {}
        if stored:
            out["00081199"] = {"vr": "SQ", "Value": [{
                "00081150": {"vr": "UI", "Value": [cls]}, "00081155": {"vr": "UI", "Value": [sop]},
                "00081190": {"vr": "UR", "Value": [f"{base}/studies/{st}/series/{se}/instances/{new}"]},
                "00081196": {"vr": "US", "Value": [COERCED]}} for cls, sop, (st, se, new) in stored]}
            status = 202                      # de-identification coerced attributes: a warning
        if failed:
            out["00081198"] = {"vr": "SQ", "Value": [{
                "00081150": {"vr": "UI", "Value": [cls]} if cls else {"vr": "UI"},
                "00081155": {"vr": "UI", "Value": [sop]} if sop else {"vr": "UI"},
                "00081197": {"vr": "US", "Value": [code]}} for cls, sop, code, _ in failed]}
            for _, _, _, reason in failed:
                log.warning("STOW-RS by %s: an instance was refused: %s", token.name, reason)
        if stored:
            first = stored[0][2][0]
            out["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{first}"]}
        headers = {}
        if failed:
            headers["Warning"] = '299 dgf: "' + "; ".join(sorted({r for *_, r in failed}))[:400].replace('"', "'") + '"'
        return Response(json.dumps(dict(sorted(out.items()))), status_code=status,
                        media_type="application/dicom+json", headers=headers)

    def _store(self, client: Client, parts: list[tuple[Path, str]], study: str | None
               ) -> tuple[list[tuple[str, str, tuple[str, str, str]]], list[tuple[str, str, int, str]]]:
        import pydicom

        stored: list[tuple[str, str, tuple[str, str, str]]] = []
        failed: list[tuple[str, str, int, str]] = []
        sent: dict[str, tuple[str, str]] = {}
        for path, ctype in parts:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
                    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
                cls, sop = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
                uid = str(ds.get("StudyInstanceUID", ""))
            except Exception:                        # noqa: BLE001 - any unreadable part is refused
                cls = sop = uid = ""
            if ctype and ctype.split(";")[0].strip().lower() != "application/dicom":
                failed.append((cls, sop, FAILED_PROCESSING, f"a part of type {ctype[:40]!r} is not application/dicom"))
            elif study and uid != study:
                failed.append((cls, sop, STUDY_MISMATCH, "the instance belongs to another study than the URL's"))
            else:
                sent[str(path)] = (cls, sop)
        if sent:
            report = client.upload(list(sent))
            refused = {f.item: f.reason for f in report.failed}
            for src, (cls, sop) in sent.items():
                if src in report.stored:
                    _, st, se, new = report.stored[src]
                    stored.append((cls, sop, (st, se, new)))
                else:
                    failed.append((cls, sop, FAILED_PROCESSING, refused.get(src, "not stored")))
        return stored, failed

    # -- the viewer and signing in --------------------------------------------------------------

    async def login_form(self, request: Any) -> Any:
        from starlette.responses import HTMLResponse

        return HTMLResponse(LOGIN_PAGE.replace("{problem}", ""))

    async def login(self, request: Any) -> Any:
        from starlette.responses import HTMLResponse, RedirectResponse

        async def read() -> bytes:
            got = b""
            async for chunk in request.stream():
                got += chunk
                if len(got) > 4096:
                    raise HTTPProblem(413, "the sign-in form is too large.")
            return got
        try:
            form = await asyncio.wait_for(read(), BODY_CHUNK_S)
        except asyncio.TimeoutError as exc:
            raise HTTPProblem(408, f"the sign-in form did not arrive within {BODY_CHUNK_S:.0f} s.") from exc
        from urllib.parse import parse_qs

        token = (parse_qs(form.decode("latin-1")).get("token") or [""])[0].strip()
        if self.tokens.verify(token) is None:
            return HTMLResponse(LOGIN_PAGE.replace("{problem}", '<p class="e">That token is not valid.</p>'),
                                status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response

    async def app_config(self, request: Any) -> Any:
        from starlette.responses import Response

        return Response(viewer_config(self.base(request)), media_type="text/javascript",
                        headers={"Cache-Control": "no-store"})

    async def viewer_file(self, request: Any) -> Any:
        from starlette.responses import FileResponse, HTMLResponse, RedirectResponse

        if self.viewer is None:
            return HTMLResponse("<p>dgf web: DICOMweb at <code>/dicomweb</code>; the viewer is not installed "
                                "(set 'viewer' in the [web] config, or install npm).</p>")
        rel = request.path_params.get("path", "")
        root = self.viewer.resolve()
        try:
            target = (root / rel).resolve()
            found = bool(rel) and target.is_relative_to(root) and target.is_file()
        except (ValueError, OSError):      # a NUL in the path, a name too long: not a file here
            found = False
        if found:
            return FileResponse(target)
        # The viewer's pages (its router handles the path): only for a signed-in browser.
        if self.tokens.verify(request.cookies.get(COOKIE, "")) is None:
            return RedirectResponse("/login", status_code=303)
        return FileResponse(root / "index.html", headers={"Cache-Control": "no-store"})


def create_app(web: Web) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def problem(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, HTTPProblem):
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        if isinstance(exc, errors.DgfError):
            return JSONResponse({"error": exc.message}, status_code=status_of(exc))
        if isinstance(exc, pixels.NotAcceptable):
            return JSONResponse({"error": str(exc)}, status_code=406)
        log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": "the server failed to answer; see its log."}, status_code=500)

    s, se, i = "{study}", "{series}", "{instance}"
    d = "/dicomweb"
    routes = [
        Route(f"{d}/studies", web.qido, methods=["GET"]),
        Route(f"{d}/series", web.qido, methods=["GET"]),
        Route(f"{d}/instances", web.qido, methods=["GET"]),
        Route(f"{d}/studies/{s}/series", web.qido, methods=["GET"]),
        Route(f"{d}/studies/{s}/instances", web.qido, methods=["GET"]),
        Route(f"{d}/studies/{s}/series/{se}/instances", web.qido, methods=["GET"]),
        Route(f"{d}/studies", web.stow, methods=["POST"]),
        Route(f"{d}/studies/{s}", web.stow, methods=["POST"]),
        Route(f"{d}/studies/{s}", web.retrieve, methods=["GET"]),
        Route(f"{d}/studies/{s}/series/{se}", web.retrieve, methods=["GET"]),
        Route(f"{d}/studies/{s}/series/{se}/instances/{i}", web.retrieve, methods=["GET"]),
        Route(f"{d}/studies/{s}/metadata", web.metadata_route, methods=["GET"]),
        Route(f"{d}/studies/{s}/series/{se}/metadata", web.metadata_route, methods=["GET"]),
        Route(f"{d}/studies/{s}/series/{se}/instances/{i}/metadata", web.metadata_route, methods=["GET"]),
        Route(f"{d}/studies/{s}/series/{se}/instances/{i}/frames/{{frames}}", web.frames, methods=["GET"]),
        Route(f"{d}/studies/{s}/series/{se}/instances/{i}/rendered", web.rendered, methods=["GET"]),
        Route(f"{d}/studies/{s}/series/{se}/instances/{i}/frames/{{frame}}/rendered", web.rendered, methods=["GET"]),
        Route(f"{d}/studies/{s}/thumbnail", web.thumbnail, methods=["GET"]),
        Route(f"{d}/studies/{s}/series/{se}/thumbnail", web.thumbnail, methods=["GET"]),
        Route(f"{d}/studies/{s}/series/{se}/instances/{i}/thumbnail", web.thumbnail, methods=["GET"]),
        Route(f"{d}/studies/{s}/series/{se}/instances/{i}/frames/{{frames}}/thumbnail", web.thumbnail,
              methods=["GET"]),
        Route("/login", web.login_form, methods=["GET"]),
        Route("/login", web.login, methods=["POST"]),
        Route("/app-config.js", web.app_config, methods=["GET"]),
        Route("/{path:path}", web.viewer_file, methods=["GET", "HEAD"]),
    ]
    app = Starlette(routes=routes, exception_handlers={Exception: problem, HTTPProblem: problem,
                                                        errors.DgfError: problem, pixels.NotAcceptable: problem})
    return _hardened(app)


def _hardened(app: Any) -> Any:
    """Headers every response carries: no MIME sniffing, no framing (clickjacking), no referrer
    (URLs name studies)."""
    extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
             (b"referrer-policy", b"no-referrer")]

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)
        await app(scope, receive, sending)
    return wrapped


def _bounded_protocol(header_s: float, per_address: int = 0) -> type:
    """uvicorn's HTTP/1.1 protocol with a deadline for request headers: a connection that has
    not sent a whole request head within ``header_s`` of connecting (or of its last response)
    is closed.  uvicorn bounds only idle keep-alive time, and any byte resets that, so a few
    dozen clients sending one byte at a time would hold every connection slot (slowloris).

    And at most ``per_address`` connections from one client address (0: any number): one
    client keeping max_connections connections alive with requests, even refused ones, had
    every other client answered 503."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    held: dict[str, int] = {}           # connections per address (the event loop's thread only)
    refused = RefusalLog(log)

    class Bounded(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None
        _address: str | None = None

        def _arm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            self._head_deadline = self.loop.call_later(header_s, self._head_late)

        def _head_late(self) -> None:
            self._head_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()          # still no complete request head

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if peer else ""
            if per_address and held.get(address, 0) >= per_address:
                refused("refused connections from %s: it holds %d (limit connections_per_address)",
                        address, per_address)
                transport.close()
                return
            self._address = address
            held[address] = held.get(address, 0) + 1
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            if self._address is not None:
                count_down(held, self._address)
                self._address = None
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()
    return Bounded


def serve(cfg: WebConfig, ready: Callable[[str, int], None] | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C (uvicorn's handlers)."""
    import socket

    import uvicorn

    web = Web(cfg)
    if cfg.viewer is not None and ensure_viewer(cfg.viewer):
        web.viewer = cfg.viewer
    app = create_app(web)
    # IPPROTO_TCP named: asyncio turns Nagle's algorithm off only on sockets that say TCP, and
    # with it on, a keep-alive client waits out its delayed ACK (40 ms) for each body.
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.listen[0] else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(cfg.listen)
    except OSError as exc:
        sock.close()
        raise errors.ConfigError(f"cannot listen on {cfg.listen[0]}:{cfg.listen[1]} ({exc.strerror or exc}); "
                                 f"is another server using that address? (listen in {cfg.path})") from exc
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", limit_concurrency=cfg.max_connections,
                            http=_bounded_protocol(cfg.header_timeout_s, cfg.per_address),
                            timeout_keep_alive=5, ssl_certfile=str(cfg.certificate) if cfg.certificate else None,
                            ssl_keyfile=str(cfg.private_key) if cfg.private_key else None,
                            server_header=False, access_log=False)
    server = uvicorn.Server(config)
    if ready is not None:
        startup = server.startup

        async def started(sockets: Any = None) -> None:
            await startup(sockets=sockets)
            ready(host, port)
        server.startup = started  # type: ignore[method-assign]
    try:
        server.run(sockets=[sock])
    finally:
        web.close()
