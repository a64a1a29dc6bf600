"""``dgf dicom serve``: the archive as a DICOM node (DIMSE, through pynetdicom).

Modalities and viewers speak DICOM networking, not dgf's SSH verbs.  This gateway is a DICOM
application entity that acts, for each calling AE title, as the dgf principal the configuration
binds it to (a client config and its key); unknown AE titles are refused at association.

- **C-ECHO**.
- **C-STORE**: each instance is written to a local spool and fsynced before the success status
  goes back (a modality deletes its copy once a C-STORE succeeds); an uploader thread per
  principal sends the spool through the same de-identification and upload pipeline as
  ``dgf_up``, in batches, once instances stop arriving or the oldest has waited
  ``defer_upload_s`` (Uploader.hold).  Instances the archive refuses move to ``spool/failed`` beside a
  ``.reason`` file; while the archive is away the spool keeps them and the uploader tries again.
  A gateway restarted finds what it had not sent yet.
- **C-FIND** at patient, study, series and image level (Patient Root and Study Root), answered
  from the header index: single values, ``*``/``?`` wildcards, ranges of dates and times, lists
  of UIDs, sequence matching, recursive (PS3.4 C.2.2.2); keys with exact values, top-level or in
  a sequence's item, become the XPath the metaserver runs, the rest are matched here (items in
  each candidate's XML header, at most ``find_limit`` reads).
- **C-GET** and **C-MOVE** (destinations from the configuration) of what a C-FIND at the same
  level matches: de-identified, or identified for the AE titles listed in ``identified`` when
  their principal may see identity (the metaserver refuses otherwise, and audits every release).
  A compressed instance goes as stored where the receiver accepted that transfer syntax, else
  decompressed to Explicit VR Little Endian (``dgf.pixels``).

TLS (PS3.15 B.1) when ``certificate`` and ``private_key`` are set; with ``client_ca``, callers
must present a certificate it signed (the AE title check still applies).

Bounds: associations (``max_associations``), of which ``associations_per_address`` (half, by
default) may come from one address, and a quarter may be connections from one address whose
association is not yet accepted (idle sockets from one host would otherwise take every slot),
the spool's size (``max_spool_mb``; beyond it C-STORE answers Out of Resources, and an instance
that outgrows it while arriving has its association aborted), memory per incoming instance
(past ``IN_MEMORY_MAX`` it is written on into the spool as it arrives),
matches per query (``find_limit``), and pynetdicom's ACSE, DIMSE and network timeouts.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fnmatch
import io
import itertools
import logging
import os
import queue
import select
import shutil
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset

from dgf import config as dgf_config
from dgf import errors, pixels
from dgf.client import Client
from dgf.dicom.deid import file_meta
from dgf.limits import ACCEPT_RETRY_S, RefusalLog, count_down
from dgf.types import HEADER_XATTR, IDENTITY_ROLES

log = logging.getLogger("dgf.dicom")

#: Instances per upload batch (the uploader sends what the spool holds, up to this many).
BATCH = 200
#: Seconds the uploader waits after the archive failed before trying again.
RETRY_S = 2.0
#: The spool is quiet when no instance arrived for this long: the uploader lets a batch gather
#: until then (a modality sends one instance at a time, and one upload of many costs far less
#: than many of one), up to ``defer_upload_s``.
GATHER_S = 0.25
#: Empty files the spool keeps made ahead (see Spool).
BLANKS = 32
#: Bytes of one incoming C-STORE dataset held in memory; past them the rest goes straight to a
#: file in the spool, counted against max_spool_mb as it comes: pynetdicom would otherwise hold
#: a whole instance in memory, gigabytes from any sender that knows a caller's AE title.
IN_MEMORY_MAX = 16 * 1024 * 1024
#: Bytes of the dataset of any message but a C-STORE (a query's identifier: a list of 4000 UIDs
#: takes 260 KB).  pydicom decodes one at 3 us an element: 4 MiB of empty elements in one
#: C-FIND cost the node 25 s of CPU, with its keys read.
QUERY_DATASET_MAX = 256 * 1024
#: Keys one identifier (or one item of a sequence key) may hold: reading one costs ~18 us.
KEYS_MAX = 1024
#: Bytes of one DIMSE command set (a few hundred in practice).
COMMAND_MAX = 64 * 1024
#: The PDU length the node asks peers to keep to.  pynetdicom handles each PDU in Python, so a
#: 40 KB instance in one PDU costs a third of what it does in 16 KB ones.
MAX_PDU = 4 * 1024 * 1024
#: The longest PDU the node reads (MAX_PDU, and room for a peer that counts its headers in it):
#: pynetdicom reads whatever length a PDU's header claims into memory, up to 4 GiB, before any
#: association is accepted.
PDU_READ_MAX = MAX_PDU + 64 * 1024
#: A PDU must arrive within PDU_GRACE_S plus a second per PDU_RATE_MIN bytes: pynetdicom waits
#: network_timeout for each piece of it, so a peer sending a byte a minute held a slot for ever.
PDU_GRACE_S = 10.0
PDU_RATE_MIN = 16 * 1024
#: The longest PDU other than P-DATA the node reads: an A-ASSOCIATE-RQ of 128 presentation
#: contexts with 64 transfer syntaxes each takes about 220 KB.
ASSOCIATE_MAX = 256 * 1024
#: Items and sub-items one A-ASSOCIATE-RQ may hold (the most that 128 contexts of 62 transfer
#: syntaxes need): pynetdicom spends some 15 us of CPU on each before any association is
#: accepted, so 3.6 MB of one-character transfer syntaxes cost the node 11 s.
ASSOCIATE_ITEMS_MAX = 8192
#: Presentation data values one P-DATA PDU may hold (peers send one or two): 4 MiB of empty
#: ones cost the node 1.1 s of CPU, associated or not.
PDVS_MAX = 64
#: A message may come in at most MESSAGE_FRAGMENTS fragments plus one per FRAGMENT_MIN bytes
#: of it: each fragment costs pynetdicom a PDU's work (50 us), so 16 MB of a dataset in 16-byte
#: fragments would cost the node 50 s of CPU.
MESSAGE_FRAGMENTS = 64
FRAGMENT_MIN = 512
#: Statuses (PS3.4 Annex B, C).
SUCCESS, PENDING = 0x0000, 0xFF00
#: The Command Field of a C-STORE request (PS3.7 E.1).
C_STORE_RQ_FIELD = 0x0001
OUT_OF_RESOURCES = 0xA700
NOT_AUTHORIZED = 0x0124
UNABLE = 0xC000
#: Query levels: the attribute whose value identifies one entity at each level.
LEVEL_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}
#: Attributes counted, not stored: (level it counts at, what it counts).
COUNTED = {"NumberOfPatientRelatedStudies": "StudyInstanceUID",
           "NumberOfPatientRelatedSeries": "SeriesInstanceUID",
           "NumberOfPatientRelatedInstances": "SOPInstanceUID",
           "NumberOfStudyRelatedSeries": "SeriesInstanceUID",
           "NumberOfStudyRelatedInstances": "SOPInstanceUID",
           "NumberOfSeriesRelatedInstances": "SOPInstanceUID"}
RANGE_VRS = frozenset({"DA", "TM", "DT"})
#: Sequence keys nest at most this deep (in C-FIND identifiers and QIDO-RS attribute paths).
MAX_SEQUENCE_DEPTH = 4


@dataclass(frozen=True)
class DicomConfig:
    """The ``[dicom]`` section of a gateway config."""

    path: Path
    ae_title: str
    listen: tuple[str, int]
    spool: Path
    callers: dict[str, Path]                 # calling AE title -> client config of its principal
    identified: frozenset[str] = frozenset()
    destinations: dict[str, tuple[str, int]] = field(default_factory=dict)
    max_spool_mb: int = 10_240
    #: Bytes of arriving instances held in memory, all associations together; past them an
    #: instance goes on into the spool as it arrives (0: every one does).
    max_memory_mb: int = 256
    find_limit: int = 10_000
    max_associations: int = 32
    #: Associations open at once from one address; 0: any number (callers behind one NAT or
    #: router).  Default: half of max_associations.
    associations_per_address: int | None = None
    #: While associations keep sending, an instance waits up to this long in the spool before
    #: it is de-identified and uploaded (0: as soon as a batch gathers).
    defer_upload_s: float = 30.0
    #: TLS (PS3.15 B.1): the port speaks TLS with this certificate; with ``client_ca`` callers
    #: must also present a certificate it signed.
    certificate: Path | None = None
    private_key: Path | None = None
    client_ca: Path | None = None

    @property
    def per_address(self) -> int:
        if self.associations_per_address is not None:
            return self.associations_per_address
        return max(1, self.max_associations // 2)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DicomConfig:
        p = Path(path).resolve()
        v = dgf_config.read_section(p, "dicom")
        base = p.parent

        def pairs(key: str) -> dict[str, str]:
            out: dict[str, str] = {}
            for item in filter(None, (x.strip() for x in v.get(key, "").split(","))):
                name, sep, value = item.partition("=")
                if not sep or not name.strip() or not value.strip():
                    raise errors.ConfigError(f"config file {p}: '{key}' takes AE=VALUE pairs separated by commas, "
                                             f"not {item!r}.")
                out[name.strip()] = value.strip()
            return out

        callers = {ae: dgf_config._rel(base, conf) for ae, conf in pairs("callers").items()}
        if not callers:
            raise errors.ConfigError(f"config file {p}: [dicom] names no 'callers' (AE=client.conf, ...); "
                                     "the gateway would refuse everyone.")
        try:
            numbers: dict[str, Any] = {k: int(v[k]) for k in ("max_spool_mb", "max_memory_mb", "find_limit",
                                                              "max_associations", "associations_per_address")
                                    if k in v}
        except ValueError as exc:
            raise errors.ConfigError(f"config file {p}: a [dicom] limit is not a whole number.") from exc
        if any(n < 0 for n in numbers.values()):
            raise errors.ConfigError(f"config file {p}: a [dicom] limit is negative.")
        if "defer_upload_s" in v:
            try:
                numbers["defer_upload_s"] = float(v["defer_upload_s"])
            except ValueError:
                numbers["defer_upload_s"] = -1.0
            if not 0 <= numbers["defer_upload_s"] <= 3600:
                raise errors.ConfigError(f"config file {p}: 'defer_upload_s' takes seconds from 0 to 3600, "
                                         f"not {v['defer_upload_s']!r}.")
        tls = {k: dgf_config._rel(base, v[k]) for k in ("certificate", "private_key", "client_ca") if v.get(k)}
        if ("certificate" in tls) != ("private_key" in tls) or ("client_ca" in tls and "certificate" not in tls):
            raise errors.ConfigError(f"config file {p}: TLS needs 'certificate' and 'private_key' "
                                     "('client_ca' only with them).")
        return cls(
            path=p, ae_title=v.get("ae_title", "DGF")[:16],
            listen=dgf_config.parse_address(v.get("listen", "127.0.0.1:11112"), "listen"),
            spool=dgf_config._rel(base, v.get("spool", "dicom-spool")), callers=callers,
            identified=frozenset(x.strip() for x in v.get("identified", "").split(",") if x.strip()),
            destinations={ae: dgf_config.parse_address(a, f"destination {ae}")
                          for ae, a in pairs("destinations").items()},
            certificate=tls.get("certificate"), private_key=tls.get("private_key"), client_ca=tls.get("client_ca"),
            **numbers)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context (TLS 1.2 at least), or None for plain DICOM."""
        if self.certificate is None or self.private_key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.certificate, self.private_key)
            if self.client_ca is not None:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(self.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise errors.ConfigError(f"config file {self.path}: the TLS certificate, key or client CA cannot "
                                     f"be loaded ({exc}).") from exc
        return ctx


# --------------------------------------------------------------------------------------------
# Matching (PS3.4 C.2.2.2)


@dataclass(frozen=True)
class Key:
    keyword: str
    vr: str
    value: str            # "" : a return key (universal match)
    #: A sequence key's item keys (sequence matching, PS3.4 C.2.2.2.6): the sequence matches
    #: when one of its items matches every item key with a value.
    items: tuple[Key, ...] = ()


def keys_of(identifier: Dataset, depth: int = 0) -> list[Key]:
    if depth > MAX_SEQUENCE_DEPTH:
        raise errors.UsageError(f"sequence keys nest more than {MAX_SEQUENCE_DEPTH} deep.")
    if len(identifier) > KEYS_MAX:
        raise errors.UsageError(f"the identifier holds more than {KEYS_MAX} keys.")
    out = []
    for elem in identifier:
        if elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet", "") or elem.tag.group == 0x0002:
            continue
        if elem.VR == "SQ":
            out.append(Key(elem.keyword, "SQ", "", tuple(keys_of(elem.value[0], depth + 1)) if elem.value else ()))
            continue
        if elem.value is None:
            value = ""
        elif elem.VM > 1:
            value = "\\".join(str(v) for v in elem.value)       # a list of UIDs, a multi-valued key
        else:
            value = str(elem.value)
        out.append(Key(elem.keyword, elem.VR, value.strip()))
    return out


def _exact(key: Key) -> bool:
    return bool(key.value) and not any(c in key.value for c in "*?\\") and \
        not (key.vr in RANGE_VRS and "-" in key.value) and "'" not in key.value and key.vr != "SQ"


def _valued(key: Key) -> bool:
    """Does ``key`` constrain the match (a value, or a sequence with an item key that does)?"""
    return any(_valued(i) for i in key.items) if key.vr == "SQ" else bool(key.value)


def _item_conditions(k: Key) -> str:
    """The part of a sequence key's item matching the header index answers: item keys with
    exact values.  The rest (wildcards, ranges, lists, nested sequences) the gateway matches."""
    return " and ".join(f"{i.keyword}='{i.value}'" for i in k.items if i.vr != "SQ" and _exact(i))


def _indexed(k: Key) -> bool:
    """Does the index answer all of sequence key ``k``'s matching?"""
    return all(not _valued(i) or (i.vr != "SQ" and _exact(i)) for i in k.items)


def match_item(item: Any, keys: tuple[Key, ...] | list[Key]) -> dict[str, Any] | None:
    """The values of ``keys`` in the XML header element ``item`` when it matches all of them, else
    None.  A sequence key matches when one of its items does, recursively (PS3.4 C.2.2.2.6); its
    value is that item's values, or None for a key that asks nothing of an absent sequence."""
    values: dict[str, Any] = {}
    for k in keys:
        if k.vr == "SQ":
            found = None
            for sub in item.findall(f"{k.keyword}/Item"):
                found = match_item(sub, k.items)
                if found is not None:
                    break
            if found is None and _valued(k):
                return None
            values[k.keyword] = found
        else:
            value = "\\".join(e.text or "" for e in item.findall(k.keyword))
            if not matches(k, value):
                return None
            values[k.keyword] = value
    return values


def xpath_for(keys: list[Key]) -> str:
    """The part of the match the header index answers: exact values, lists of UIDs, date
    ranges, and sequence items with exact values.  It may select more than the keys match
    (:func:`matches` has the last word), never less."""
    conds = []
    for k in keys:
        if k.vr == "SQ" and (inner := _item_conditions(k)):
            conds.append(f"[{k.keyword}/Item[{inner}]]")
        elif _exact(k):
            conds.append(f"[{k.keyword}='{k.value}']")
        elif k.vr == "UI" and "\\" in k.value and "'" not in k.value:
            conds.append("[" + " or ".join(f"{k.keyword}='{u}'" for u in k.value.split("\\") if u) + "]")
        elif k.vr == "DA" and "-" in k.value:
            # A date (YYYYMMDD, 8 digits) compares as a number the way it compares as text:
            # the index's numeric range, not a header read per candidate.  (A header holding
            # another form, such as ACR-NEMA's YYYY.MM.DD, is not in any range.)
            lo, _, hi = k.value.partition("-")
            conds += [f"[{k.keyword} {op} {bound}]" for op, bound in ((">=", lo), ("<=", hi))
                      if len(bound) == 8 and bound.isascii() and bound.isdigit()]
        elif (text := _wildcard_text(k)) is not None:
            # 'ABC*' starts with ABC, '*ABC*' and '*ABC' contain it: the index's text, read
            # for one attribute, instead of every header.
            how = "starts-with" if not k.value.startswith("*") else "contains"
            conds.append(f"[{how}({k.keyword}, '{text}')]")
    return "/DicomHeader" + "".join(conds)


def _wildcard_text(key: Key) -> str | None:
    """The text of a wildcard value the index can narrow by ('ABC*', '*ABC*', '*ABC'), for a
    single-valued attribute (XPath's starts-with and contains read an attribute's first value,
    the wildcard matches all of them joined)."""
    from pydicom.datadict import dictionary_VM, tag_for_keyword

    value = key.value
    if key.vr in ("SQ", "UI") or key.vr in RANGE_VRS or "*" not in value or any(c in value for c in "?\\'"):
        return None
    text = value[1:] if value.startswith("*") else value
    text = text[:-1] if text.endswith("*") else text
    if not text or "*" in text or not value.endswith("*") and not value.startswith("*"):
        return None
    tag = tag_for_keyword(key.keyword)
    return text if tag is not None and dictionary_VM(tag) == "1" else None


def matches(key: Key, value: str) -> bool:
    """Does a stored ``value`` match the request's ``key`` (what the index did not answer)?"""
    if not key.value or key.vr == "SQ":
        return True
    want = key.value
    if key.vr == "UI" and "\\" in want:
        return value in want.split("\\")
    if key.vr in RANGE_VRS and "-" in want:
        lo, _, hi = want.partition("-")
        return (not lo or value >= lo) and (not hi or value[:len(hi)] <= hi)
    if "*" in want or "?" in want:
        return fnmatch.fnmatchcase(value, want.replace("[", "[[]"))
    if key.vr == "PN":
        return value.upper() == want.upper()
    return value == want


@dataclass
class Entity:
    """One matched entity at the query level: its first file's values and what it holds."""

    values: dict[str, str]
    paths: list[str] = field(default_factory=list)
    members: dict[str, set[str]] = field(default_factory=dict)
    #: For sequence keys with item keys: the matching item's values (match_item), by sequence
    #: (None when the matching file has no such item).
    items: dict[str, Any] = field(default_factory=dict)


def _header_items(client: Client, path: str, sequences: list[Key]) -> dict[str, Any] | None:
    """The matching items of ``sequences`` in ``path``'s XML header (None: they do not match)."""
    from lxml import etree

    return match_item(etree.fromstring(client.getxattr(path, HEADER_XATTR)), sequences)


#: Entities per query when the files of truncated entities are counted (:func:`find`): their
#: UIDs OR-ed into one XPath stay within the default limits (16 KB, 512 operators); fewer at a
#: time where a server refuses that many.
GROUP_CHUNK = 128
#: Rows of a truncated scan's first page at least (the server doubles each next page); as
#: many as the entities asked for when more, since each has a file at least.
FIRST_PAGE = 16


def _literal(value: str) -> str | None:
    """``value`` as an XPath 1.0 string literal (None: it holds both kinds of quote, or nothing)."""
    if not value or ("'" in value and '"' in value):
        return None
    return f'"{value}"' if "'" in value else f"'{value}'"


def _modalities(key: Key | None) -> list[str]:
    """The modalities a ModalitiesInStudy key asks for: any of its values (PS3.4 C.6.1.1.3 lists
    them with backslashes; QIDO-RS clients send commas too)."""
    if key is None:
        return []
    return [m for m in key.value.replace(",", "\\").split("\\") if m]


def _has_modality(wanted: list[str], modalities: Iterable[str]) -> bool:
    return any(matches(Key("Modality", "CS", w), m) for w in wanted for m in modalities)


def find(client: Client, level: str, keys: list[Key], limit: int, truncate: bool = False,
         skip: int = 0) -> dict[str, Entity]:
    """The entities at ``level`` whose files match every key, from the header index: at most
    ``limit`` (beyond it LimitExceeded, or with ``truncate`` the first ``limit``, complete),
    after the first ``skip`` (a page further down a list; with ``truncate`` only).

    With ``truncate`` the scan stops at the first file of an entity past ``limit``: a study
    list of 101 entries (what a viewer asks first) reads the files of about 101 studies, not
    the archive.  The files of those entities that come later in the archive are then counted
    by a scan restricted to their UIDs, from where the first stopped.  The entities skipped
    are told apart by the index's levels alone, no header read, when no key constrains them."""
    if level not in LEVEL_KEYS:
        raise errors.UsageError(f"query level {level!r} is not PATIENT, STUDY, SERIES or IMAGE.")
    if skip and not truncate:
        raise ValueError("find: skip needs truncate")
    unique = LEVEL_KEYS[level]
    stored = [k for k in keys if k.keyword not in COUNTED and k.keyword != "ModalitiesInStudy"]
    show = _shown(stored)
    sequences = [k for k in stored if k.vr == "SQ" and k.items]
    wanted = _modalities(next((k for k in keys if k.keyword == "ModalitiesInStudy" and k.value), None))
    # Item keys the index cannot answer are matched here, in each candidate file's XML header:
    # one read per file until its entity matched, at most ``limit`` reads.
    read_items = any(not _indexed(k) for k in sequences)
    reads = 0
    base = xpath_for(stored)
    xpath = base
    modality = ""
    if wanted and all(_exact(Key("Modality", "CS", m)) for m in wanted):
        # Entities are picked by a file of a wanted modality (from the index), so the first
        # ``limit`` are the first that qualify; their other files are counted below.
        modality = " or ".join(f"Modality='{m}'" for m in wanted)
        xpath += f"[{modality}]"
    found: dict[str, Entity] = {}
    stopped = False
    last = 0                                  # the inode of the last file looked at
    skipped: set[str] = set()
    dropped = 0                               # entities gathered, then dropped: skipped by value
    if skip:
        leading = None if wanted or any(_valued(k) for k in stored) else _leading(client, base, level, skip)
        if leading is None:
            limit, dropped = limit + skip, skip
        elif leading[1] is None:
            return {}                         # no entity after the skipped ones
        else:
            skipped, last = leading[0], leading[1]
    index = LEVEL_INDEX.get(level)
    # Small first pages when the scan may stop early, so the server reads little past the end.
    rows = client.find_iter(xpath, "/", show=show, page=max(FIRST_PAGE, limit + 1) if truncate else 0,
                            after=last)
    try:
        for row in rows:
            last = int(row.get("ino") or 0)   # (an entity that stops the scan is not counted)
            if skipped and index is not None and str((row.get("levels") or [""] * 3)[index]) in skipped:
                continue
            values = _values(row)
            if not all(matches(k, values.get(k.keyword, "")) for k in stored):
                continue
            ident = values.get(unique, "")
            entity = found.get(ident)
            if entity is None:
                if (truncate or modality) and wanted and \
                        not _has_modality(wanted, values.get("Modality", "").split("\\")):
                    continue
                if len(found) >= limit:
                    if truncate:
                        stopped = True
                        break
                    raise errors.LimitExceeded(f"the query matches more than {limit} entities (find_limit).")
                items = None
                if read_items:
                    reads += 1
                    if reads > limit:
                        raise errors.LimitExceeded(
                            f"matching sequence items with wildcards, ranges or nested sequences reads each "
                            f"candidate's header, and more than {limit} (find_limit) are candidates; give exact "
                            f"values too.")
                    items = _header_items(client, row["path"], sequences)
                    if items is None:
                        continue
                entity = found[ident] = Entity(values, items=items or {})
            _count(entity, row["path"], values)
    finally:
        rows.close()                          # stopped early: the server's cursor is freed
    if found and modality and not stopped:
        # Every file of a wanted modality was counted: the entities' files of others are not.
        _count_all(client, f"{base}[not({modality})]", unique, stored, found)
    elif found and truncate and wanted:
        # Picked by a file of a wanted modality: count each entity's files again, all of them.
        _count_all(client, base, unique, stored, found, reset=True)
    elif found and stopped:
        _count_all(client, base, unique, stored, found, last)
    if sequences and not read_items:
        for entity in found.values():       # the index matched them: show the matching items
            entity.items = _header_items(client, entity.paths[0], sequences) or {}
    if wanted and not truncate and not modality:    # any of the study's modalities matches
        found = {u: e for u, e in found.items() if _has_modality(wanted, e.members.get("Modality", ()))}
    if dropped:
        found = dict(list(found.items())[dropped:])
    return found


#: Where each level's UID is in a row's ``levels`` (patient, study, series).
LEVEL_INDEX = {"PATIENT": 0, "STUDY": 1, "SERIES": 2}


def _leading(client: Client, xpath: str, level: str, skip: int) -> tuple[set[str], int | None] | None:
    """The UIDs of the first ``skip`` entities matching ``xpath`` (which the index answers
    whole: no key is matched here) and the inode to resume after to meet the next entity's
    first file (None: there is no next one), from the index's levels: no header is read.  None
    where the levels do not tell (IMAGE level; a metaserver that does not send them)."""
    index = LEVEL_INDEX.get(level)
    if index is None:
        return None
    seen: set[str] = set()
    previous = 0
    rows = client.find_iter(xpath, "/", page=max(FIRST_PAGE, skip + 1))
    try:
        for row in rows:
            levels = row.get("levels")
            if not isinstance(levels, list) or len(levels) != 3 or "ino" not in row:
                return None
            ident = str(levels[index])
            if ident not in seen:
                if len(seen) >= skip:
                    return seen, previous
                seen.add(ident)
            previous = int(row["ino"])
        return seen, None
    finally:
        rows.close()


def _shown(stored: list[Key]) -> list[str]:
    """The keywords a scan for ``stored`` keys asks each file's value of."""
    return sorted({k.keyword for k in stored} | set(LEVEL_KEYS.values()) | {"Modality"})


def _values(row: dict[str, Any]) -> dict[str, str]:
    """A scanned row's shown values, as strings."""
    return {k: str(v) for k, v in (row.get("values") or {}).items()}


def _count(entity: Entity, path: str, values: dict[str, str]) -> None:
    entity.paths.append(path)
    for counted in set(COUNTED.values()) | {"Modality"}:
        entity.members.setdefault(counted, set()).add(values.get(counted, ""))


def _count_all(client: Client, xpath: str, unique: str, stored: list[Key], found: dict[str, Entity],
               after: int = 0, reset: bool = False) -> None:
    """Count the files of the ``found`` entities that match ``xpath`` and the keys, after inode
    ``after`` (with ``reset``, all of them again): by the entities' UIDs, GROUP_CHUNK at a
    time (one scan of every match when a UID cannot be written as an XPath literal)."""
    if reset:
        for entity in found.values():
            entity.paths, entity.members = [], {}
    show = _shown(stored)
    seen = 0

    def scan(query: str) -> None:
        nonlocal seen
        for row in client.find_iter(query, "/", show=show, after=after):
            seen += 1
            values = _values(row)
            of = found.get(values.get(unique, ""))
            if of is not None and all(matches(k, values.get(k.keyword, "")) for k in stored):
                _count(of, row["path"], values)

    literals = [_literal(ident) for ident in found]
    if None in literals:
        scan(xpath)
    else:
        i, chunk = 0, GROUP_CHUNK
        while i < len(literals):
            part = literals[i:i + chunk]
            try:
                scan(xpath + "[" + " or ".join(f"{unique}={lit}" for lit in part) + "]")
            except errors.LimitExceeded:
                if chunk == 1 or seen:
                    raise
                chunk //= 2         # refused as too long by a server with lower xpath limits
                continue
            i += len(part)
    for ident in [i for i, e in found.items() if not e.paths]:
        del found[ident]                      # its files went meanwhile


def answer(level: str, keys: list[Key], entity: Entity, charset: str | None) -> Dataset:
    """The C-FIND response identifier for one matched entity."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for k in keys:
        if k.keyword in COUNTED:
            value: Any = str(len(entity.members.get(COUNTED[k.keyword], set()) - {""}))
        elif k.keyword == "ModalitiesInStudy":
            value = "\\".join(sorted(entity.members.get("Modality", set()) - {""}))
        elif k.vr == "SQ":
            found = entity.items.get(k.keyword)
            ds.add_new(k.keyword, "SQ", [_item_dataset(k.items, found)] if found is not None else [])
            continue
        else:
            value = entity.values.get(k.keyword, "")
        ds.add_new(k.keyword, k.vr, value)
    unique = LEVEL_KEYS[level]
    if unique not in ds:
        setattr(ds, unique, entity.values.get(unique, ""))
    return ds


def _item_dataset(keys: tuple[Key, ...], found: dict[str, Any]) -> Dataset:
    item = Dataset()
    for i in keys:
        if i.vr == "SQ":
            sub = found.get(i.keyword)
            item.add_new(i.keyword, "SQ", [_item_dataset(i.items, sub)] if sub is not None else [])
        else:
            item.add_new(i.keyword, i.vr, found.get(i.keyword, ""))
    return item


# --------------------------------------------------------------------------------------------
# The spool: received instances, durable before they are acknowledged


class Spool:
    """``incoming/AE/`` holds instances not yet in the archive, ``failed/AE/`` those it refused
    (each beside a ``.reason``).  Files appear whole (written, fsynced, renamed).

    Creating a file costs 0.25 ms of kernel CPU and up to 1.1 ms of wall time on this machine's
    ext4, more than writing and fsyncing 40 KB, and a C-STORE waited for it.  So ``blank/`` keeps a few empty files, made ahead by a thread
    while associations wait on the network; an instance is written into one and renamed into
    ``incoming/AE/``.  A blank holds nothing acknowledged: a restart empties ``blank/``.
    """

    def __init__(self, root: Path, max_bytes: int, blanks: int = BLANKS) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._bytes = sum(p.stat().st_size for p in root.glob("incoming/*/*.dcm")) if root.exists() else 0
        self._dirs: dict[str, tuple[Path, int]] = {}          # AE -> its incoming/ and an open fd of it
        self._names = itertools.count()
        self._tag = uuid.uuid4().hex[:6]                      # names stay unique across restarts
        self._blank_dir = root / "blank"
        self._receiving = root / "receiving"             # instances still arriving (see _Spilled)
        for d in (self._blank_dir, self._receiving):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True, exist_ok=True)
        self._blanks: collections.deque[tuple[int, Path]] = collections.deque()
        self._want = blanks
        self._low = threading.Event()
        self._closed = False
        self.last_put = 0.0                     # time.monotonic() of the last instance kept
        if blanks:
            self._low.set()
            threading.Thread(target=self._make_blanks, daemon=True, name="dgf-dicom-blanks").start()

    def close(self) -> None:
        self._closed = True
        self._low.set()
        with self._lock:
            for _, fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()

    def _name(self) -> str:
        return f"{time.time_ns():020d}-{self._tag}{next(self._names):x}"

    def _make_blanks(self) -> None:
        while True:
            self._low.wait()
            if self._closed:
                while self._blanks:
                    os.close(self._blanks.popleft()[0])
                return
            self._low.clear()
            while len(self._blanks) < self._want and not self._closed:
                p = self._blank_dir / self._name()
                try:
                    self._blanks.append((os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), p))
                except OSError as exc:
                    log.warning("spool %s: cannot make a blank file (%s)", self.root, exc.strerror)
                    break

    def _blank(self, d: Path, name: str) -> tuple[int, Path]:
        """An open, empty file to write an instance into: a blank made ahead when one is left."""
        try:
            return self._blanks.popleft()
        except IndexError:
            path = d / f".{name}.part"
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), path
        finally:
            if len(self._blanks) < self._want // 2:
                self._low.set()

    def incoming(self, ae: str) -> Path:
        return self._dir(ae)[0]

    def _dir(self, ae: str) -> tuple[Path, int]:
        known = self._dirs.get(ae)
        if known is None:
            d = self.root / "incoming" / ae
            d.mkdir(parents=True, exist_ok=True)
            with self._lock:
                known = self._dirs.get(ae)
                if known is None:
                    known = self._dirs[ae] = (d, os.open(d, os.O_RDONLY | os.O_DIRECTORY))
        return known

    def reserve(self, size: int) -> bool:
        """Count ``size`` more bytes as spooled; False when the spool cannot take them."""
        with self._lock:
            if self._bytes + size > self.max_bytes:
                return False
            self._bytes += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self._bytes -= size

    def receiving(self) -> tuple[int, Path]:
        """A new file for an instance still arriving (``receiving/`` is emptied at start)."""
        path = self._receiving / self._name()
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), path

    def keep(self, ae: str, fd: int, path: Path) -> None:
        """Make the arrived file ``path`` (open as ``fd``, which this closes) durable in
        ``incoming/AE/``; its bytes were reserved as they came."""
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        d, dfd = self._dir(ae)
        os.replace(path, d / f"{path.name}.dcm")
        os.fsync(dfd)
        self.last_put = time.monotonic()

    def put(self, ae: str, *parts: bytes) -> bool:
        """Keep the file ``parts`` make durably; False when the spool is full."""
        size = sum(map(len, parts))
        if not self.reserve(size):
            return False
        d, dfd = self._dir(ae)
        name = self._name()
        tmp: Path | None = None
        try:
            fd, tmp = self._blank(d, name)
            try:
                if os.writev(fd, parts) != size:
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, d / f"{name}.dcm")
            tmp = None
            os.fsync(dfd)
        except OSError:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            self.release(size)
            raise
        self.last_put = time.monotonic()
        return True

    def pending(self, ae: str, n: int) -> list[Path]:
        return sorted(self.incoming(ae).glob("*.dcm"))[:n]

    @staticmethod
    def arrived(path: Path) -> float:
        """When ``path`` was kept (time.time(); its name starts with that in nanoseconds)."""
        try:
            return int(path.name[:20]) / 1e9
        except ValueError:
            return 0.0

    def crowded(self) -> bool:
        """More than half full: time to send, whatever is still arriving."""
        return self._bytes > self.max_bytes // 2

    def done(self, path: Path) -> None:
        size = path.stat().st_size
        path.unlink()
        with self._lock:
            self._bytes -= size

    def refuse(self, ae: str, path: Path, reason: str) -> None:
        d = self.root / "failed" / ae
        d.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size
        (d / (path.stem + ".reason")).write_text(reason + "\n")
        os.replace(path, d / path.name)
        with self._lock:
            self._bytes -= size


class SpoolFull(Exception):
    """The spool cannot take the rest of an instance that is arriving."""


class _Spilled(io.BytesIO):
    """A C-STORE dataset past IN_MEMORY_MAX.  pynetdicom writes each further fragment into the
    message's dataset, which must be a BytesIO: this one sends them to a file in the spool's
    ``receiving/`` (the file meta first), reserving their bytes in the spool as they come."""

    def __init__(self, spool: Spool, meta: bytes, head: memoryview) -> None:
        super().__init__()
        self.spool = spool
        self.size = 0
        self.fd, self.path = spool.receiving()
        try:
            self.write(meta)
            self.write(head)
        except BaseException:
            self.discard()
            raise

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if not self.spool.reserve(len(view)):
            raise SpoolFull
        self.size += len(view)
        n = len(view)
        while view:
            view = view[os.write(self.fd, view):]
        return n

    def keep(self, ae: str) -> None:
        fd, self.fd = self.fd, -1
        try:
            self.spool.keep(ae, fd, self.path)
        except BaseException:
            self.path.unlink(missing_ok=True)
            self.spool.release(self.size)
            raise

    def discard(self) -> None:
        """Forget what arrived (an association that ended early, a refused caller)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.path.unlink(missing_ok=True)
            self.spool.release(self.size)


class Uploader(threading.Thread):
    """Sends one AE's spool to the archive as its principal, in batches, until stopped."""

    def __init__(self, ae: str, client: Client, spool: Spool, defer_s: float = 0.0) -> None:
        super().__init__(daemon=True, name=f"dgf-dicom-up-{ae}")
        self.ae, self.client, self.spool, self.defer_s = ae, client, spool, defer_s
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.idle = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            batch = self.spool.pending(self.ae, BATCH)
            if not batch:
                self.idle.set()
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            self.idle.clear()
            if self.hold(batch) > 0:
                # Wait on the batch in hand (a busy spool is not listed again every quarter
                # second), then take what gathered meanwhile.
                while (hold := self.hold(batch)) > 0 and not self.stopping.is_set():
                    self.stopping.wait(hold)
                batch = self.spool.pending(self.ae, BATCH)
                if not batch or self.stopping.is_set():
                    continue
            try:
                report = self.client.upload(batch)
            except errors.DgfError as exc:
                log.warning("AE %s: the archive did not take %d instance(s) (%s); they stay spooled and are "
                            "sent again", self.ae, len(batch), exc.message)
                self.stopping.wait(RETRY_S)
                continue
            failed = {f.item: f for f in report.failed}
            for path in batch:
                problem = failed.get(str(path))
                if problem is None:
                    self.spool.done(path)
                elif problem.code in (errors.TransportError.exit_code, errors.ServerError.exit_code):
                    continue                                  # the archive's trouble: sent again later
                else:
                    log.error("AE %s: instance %s refused: %s", self.ae, path.name, problem.reason)
                    self.spool.refuse(self.ae, path, problem.reason)
            if any(f.code in (errors.TransportError.exit_code, errors.ServerError.exit_code)
                   for f in report.failed):
                self.stopping.wait(RETRY_S)

    def hold(self, batch: list[Path]) -> float:
        """Seconds to wait before sending ``batch``: none once the spool is quiet.

        While associations are still sending, de-identifying and uploading beside them would
        take the CPU their acknowledgements wait for (on two cores: 0.6x Orthanc's C-STORE rate
        instead of 1.2x), so the batch waits until no instance arrived for GATHER_S, or until its
        oldest instance has waited ``defer_s`` (at least GATHER_S, and none for a full batch
        when ``defer_s`` is 0), or until the spool is half full.
        """
        quiet = time.monotonic() - self.spool.last_put
        if quiet >= GATHER_S or self.spool.crowded() or (len(batch) >= BATCH and self.defer_s <= 0):
            return 0.0
        waited = time.time() - Spool.arrived(batch[0])
        limit = max(self.defer_s, GATHER_S)
        return 0.0 if waited >= limit else min(GATHER_S - quiet, limit - waited)


def _too_many_items(pdu_type: int, body: bytes | bytearray) -> int | None:
    """The limit that an A-ASSOCIATE-RQ (its items, and its contexts' and user information's
    sub-items) or a P-DATA PDU (its values) of ``body``, the PDU past its 6-byte header, goes
    past; None for any other PDU, or one within it.  pynetdicom's work on a PDU grows with its
    items; a malformed one is left for pynetdicom to refuse."""
    count, end = 0, len(body)
    if pdu_type == 0x04:                                   # P-DATA-TF: 4-byte length, value
        at = 0
        while at + 4 <= end:
            count += 1
            if count > PDVS_MAX:
                return PDVS_MAX
            at += 4 + int.from_bytes(body[at:at + 4], "big")
        return None
    if pdu_type != 0x01:
        return None
    at = 68                                                # past version, AE titles, reserved
    while at + 4 <= end and count <= ASSOCIATE_ITEMS_MAX:
        kind, length = body[at], int.from_bytes(body[at + 2:at + 4], "big")
        count += 1
        nested = {0x20: at + 8, 0x50: at + 4}.get(kind)   # a context: past its id and reserved
        at += 4 + length
        while nested is not None and nested + 4 <= min(at, end) and count <= ASSOCIATE_ITEMS_MAX:
            count += 1
            nested += 4 + int.from_bytes(body[nested + 2:nested + 4], "big")
    return ASSOCIATE_ITEMS_MAX if count > ASSOCIATE_ITEMS_MAX else None


def _command_field(command: bytes) -> int | None:
    """The Command Field (0000,0100) of an encoded command set (Implicit VR Little Endian), or
    None where it does not hold one."""
    at = 0
    while at + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, at)
        if (group, element, length) == (0x0000, 0x0100, 2):
            return int.from_bytes(command[at + 8:at + 10], "little")
        at += 8 + length
    return None


def _bound_reads(assoc: Any, address: str) -> None:
    """Have ``assoc`` read a PDU of at most PDU_READ_MAX bytes (ASSOCIATE_MAX but for P-DATA),
    within PDU_GRACE_S and a second per PDU_RATE_MIN bytes of it, holding at most
    ASSOCIATE_ITEMS_MAX items (an A-ASSOCIATE-RQ) or PDVS_MAX values (a P-DATA, read only once
    the association is accepted: pynetdicom read and decoded one first).  A PDU cut short
    (refused, too slow, the peer gone) ends the association as pynetdicom ends one whose peer
    closed mid-PDU."""
    sock = assoc.dul.socket
    header: list[int] = []                                 # [type, length] of the PDU under way

    def recv(n: int) -> bytearray:
        pdu_type = header[0] if header and header[1] == n else None
        header.clear()
        limit = PDU_READ_MAX if pdu_type in (None, 0x04) else ASSOCIATE_MAX
        if n > limit:
            log.error("a PDU of %d bytes from %s was refused (at most %d are read)", n, address, limit)
            return bytearray()
        got = read(n)
        if pdu_type is None and len(got) == 6:
            if got[0] == 0x04 and assoc.dul.state_machine.current_state not in ("Sta6", "Sta7"):
                log.error("a P-DATA PDU from %s came before its association was accepted", address)
                return bytearray()
            header.extend((got[0], int.from_bytes(got[2:6], "big")))
        elif pdu_type is not None and len(got) == n:
            most = _too_many_items(pdu_type, got)
            if most is not None:
                log.error("a PDU from %s was refused: it holds more than %d items", address, most)
                return bytearray()
        return got

    def read(n: int) -> bytearray:
        raw = sock.socket
        before = raw.gettimeout()
        t0 = time.monotonic()
        deadline = t0 + PDU_GRACE_S + n / PDU_RATE_MIN
        got = bytearray()
        try:
            while len(got) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                raw.settimeout(left if before is None else min(left, before))
                piece = raw.recv(min(n - len(got), 1 << 16))
                if not piece:
                    break
                got += piece
        except TimeoutError:
            log.error("a PDU from %s was cut off: %d of its %d bytes came in %.0f s", address, len(got), n,
                      time.monotonic() - t0)
        except OSError:                                    # a reset: the PDU is short
            pass
        finally:
            try:
                raw.settimeout(before)
            except OSError:
                pass
        return got

    sock.recv = recv


def _discard(dimse: Any) -> None:
    """Discard the _Spilled dataset of the message ``dimse`` is receiving, if it has one."""
    data = getattr(getattr(dimse, "message", None), "data_set", None)
    if isinstance(data, _Spilled):
        data.discard()


def _part10(event: Any) -> tuple[bytes, bytes]:
    """A C-STORE request's dataset as a Part 10 file: (preamble and meta, dataset).  pynetdicom's
    ``encoded_dataset(include_meta=True)`` builds the meta through pydicom: a third of the
    gateway's user CPU per instance (1.9 -> 1.2 ms)."""
    request = event.request
    return (file_meta(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                      str(event.context.transfer_syntax)),
            request.DataSet.getvalue())


# --------------------------------------------------------------------------------------------
# Waking pynetdicom's threads when there is work, instead of polling


class _Doorbell(queue.Queue[Any]):
    """One of pynetdicom's queues that also rings a bell after each put."""

    def __init__(self, ring: Callable[[], None]) -> None:
        super().__init__()
        self.ring = ring

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.ring()


class _Wakeup:
    """What an association's two threads wait on when pynetdicom has them sleep.

    pynetdicom polls: its network thread (DUL) sleeps 1 ms whenever it found nothing to do, and
    the association's own thread sleeps 1 ms between looks at its queue of DIMSE messages.  A
    modality sending one instance at a time waited for each hand-over, and lowering the sleep
    only burnt the CPU the handlers need.  Here the DUL waits in select() on its socket and on a
    socket pair rung when something is queued for it to send, and the association thread on an
    event set when a message is queued for it.  Each wait still ends after the time pynetdicom
    asked for, so its timers run as before.
    """

    def __init__(self, peer: socket.socket) -> None:
        self.peer = peer
        self.bell = threading.Event()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def ring_network(self) -> None:
        try:
            self._w.send(b"\0")
        except OSError:                           # already rung (buffer full) or closed
            pass

    def network_wait(self, seconds: float) -> None:
        try:
            ready, _, _ = select.select([self.peer, self._r], [], [], seconds)
        except (OSError, ValueError):             # the connection is gone: pynetdicom notices
            time.sleep(seconds)
            return
        if self._r in ready:
            try:
                self._r.recv(4096)
            except OSError:
                pass

    def association_wait(self, seconds: float) -> None:
        self.bell.wait(seconds)
        self.bell.clear()             # a message queued after this rings again; one before is read next

    def close(self) -> None:
        self._r.close()
        self._w.close()


class _Clock:
    """Stands in for ``time`` inside ``pynetdicom.dul`` and ``pynetdicom.association``: a sleep
    in a thread given a wait (see _Wakeup) waits on it; everything else is ``time``'s."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        wait = getattr(threading.current_thread(), "_dgf_wait", None)
        if wait is None:
            time.sleep(seconds)
        else:
            wait(seconds)


_CLOCK = _Clock()


def _wake_on_work(assoc: Any) -> _Wakeup | None:
    """Have ``assoc``'s threads wait on a _Wakeup instead of polling; None (they poll, as
    before) where pynetdicom is not shaped as this expects."""
    import pynetdicom.association as pa
    import pynetdicom.dul as pd

    dul, dimse = getattr(assoc, "dul", None), getattr(assoc, "dimse", None)
    peer = getattr(getattr(dul, "socket", None), "socket", None)
    if not (isinstance(peer, socket.socket) and isinstance(getattr(dul, "to_provider_queue", None), queue.Queue)
            and isinstance(getattr(dimse, "msg_queue", None), queue.Queue)
            and all(getattr(m, "time", None) in (time, _CLOCK) for m in (pa, pd))):
        return None
    try:
        wakeup = _Wakeup(peer)
    except OSError:                  # no descriptors for its socket pair: this one polls
        return None
    for owner, name, ring in ((dul, "to_provider_queue", wakeup.ring_network), (dimse, "msg_queue", wakeup.bell.set)):
        old, new = getattr(owner, name), _Doorbell(ring)
        while not old.empty():
            new.put(old.get_nowait())
        setattr(owner, name, new)
    dul._dgf_wait = wakeup.network_wait                 # type: ignore[union-attr]
    assoc._dgf_wait = wakeup.association_wait
    for m in (pa, pd):
        setattr(m, "time", _CLOCK)  # noqa: B010 (pynetdicom does not export its ``time``)
    return wakeup


# --------------------------------------------------------------------------------------------
# The application entity


class Gateway:
    def __init__(self, cfg: DicomConfig) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool, cfg.max_spool_mb * 1024 * 1024)
        self._clients: dict[Path, Client] = {}
        self._roles: dict[str, str] = {}
        self._lock = threading.Lock()
        self.uploaders: dict[str, Uploader] = {}
        self._wakeups: dict[int, _Wakeup] = {}
        #: Connections admitted but not yet associated, per peer address, and which those are;
        #: and every connection admitted and not yet closed, per peer address.
        self._negotiating: dict[str, int] = {}
        self._unsettled: dict[int, str] = {}
        self._open: dict[str, int] = {}
        self._opened: dict[int, str] = {}
        self._refused = RefusalLog(log)
        #: Bytes of arriving C-STORE datasets held in memory, per association and in all.
        self._held: dict[int, int] = {}
        self._held_total = 0
        self.server: Any = None

    def client(self, ae: str) -> Client:
        conf = self.cfg.callers[ae]
        with self._lock:
            c = self._clients.get(conf)
            if c is None:
                c = self._clients[conf] = Client(conf)
            return c

    def _uploader(self, ae: str) -> Uploader:
        with self._lock:
            up = self.uploaders.get(ae)
            if up is None:
                up = self.uploaders[ae] = Uploader(ae, Client(self.cfg.callers[ae]), self.spool,
                                                   self.cfg.defer_upload_s)
                up.start()
            return up

    @staticmethod
    def _caller(event: Any) -> str:
        return Gateway._caller_of(event.assoc)

    @staticmethod
    def _caller_of(assoc: Any) -> str:
        return str(assoc.requestor.ae_title).strip()

    # -- handlers ---------------------------------------------------------------------------

    def on_echo(self, event: Any) -> int:
        return SUCCESS

    def admit(self, request: Any, client_address: Any) -> bool:
        """socketserver's verify_request: a connection is served unless its address already
        has a quarter of the association slots in negotiation (an A-ASSOCIATE-RQ not yet
        accepted), counted until its association is established or it closes, or holds
        associations_per_address connections, counted until they close."""
        address = str(client_address[0])
        cap, most = max(1, self.cfg.max_associations // 4), self.cfg.per_address
        with self._lock:
            negotiating, held = self._negotiating.get(address, 0), self._open.get(address, 0)
            if negotiating < cap and (not most or held < most):
                self._negotiating[address] = negotiating + 1
                self._open[address] = held + 1
                return True
        if negotiating >= cap:
            self._refused("refused connections from %s: %d from there have no association yet", address, cap)
        else:
            self._refused("refused connections from %s: %d from there are open (limit associations_per_address)",
                          address, most)
        return False

    def _settled(self, event: Any) -> None:
        """The association of ``event`` was established or closed: its address's slot is free."""
        with self._lock:
            address = self._unsettled.pop(id(event.assoc), None)
            if address is not None:
                count_down(self._negotiating, address)

    def on_open(self, event: Any) -> None:
        with self._lock:
            self._unsettled[id(event.assoc)] = self._opened[id(event.assoc)] = str(event.address[0])
        wakeup = _wake_on_work(event.assoc)
        if wakeup is not None:
            with self._lock:
                self._wakeups[id(event.assoc)] = wakeup
        _bound_reads(event.assoc, str(event.address[0]))
        self._spill_large(event.assoc)

    def _hold(self, assoc: Any, size: int) -> int:
        """``assoc`` now holds ``size`` bytes of an arriving dataset in memory: what all do."""
        with self._lock:
            self._held_total += size - self._held.pop(id(assoc), 0)
            if size:
                self._held[id(assoc)] = size
            return self._held_total

    def _spill_large(self, assoc: Any) -> None:
        """Have ``assoc`` hold at most IN_MEMORY_MAX bytes of an arriving C-STORE dataset, and
        all associations together at most max_memory_mb: past them the dataset goes on into a
        _Spilled file.  A caller that may not store, a spool that cannot take the rest, a
        command set past COMMAND_MAX, another message's dataset past QUERY_DATASET_MAX or a
        message in too many fragments abort the association (A-ABORT) at once."""
        from pynetdicom.dimse_messages import C_STORE_RQ

        dimse = assoc.dimse
        inner = dimse.receive_primitive
        fragments = [0]                                    # of the message under way
        budget = self.cfg.max_memory_mb * 1024 * 1024

        def abort(why: str) -> None:
            _discard(dimse)
            dimse.message = None
            fragments[0] = 0
            self._hold(assoc, 0)
            log.error("a message arriving from %s was dropped: %s", self._caller_of(assoc), why)
            dimse.dul.event_queue.put("Evt19")              # pynetdicom's A-ABORT

        def receive(primitive: Any) -> None:
            # Before pynetdicom takes the PDU, which may hold a whole message: its dataset, with
            # what arrived of it before, is within QUERY_DATASET_MAX unless it is a C-STORE's.
            values, msg = primitive.presentation_data_value_list, dimse.message
            held = msg.data_set.tell() if msg is not None and type(msg.data_set) is io.BytesIO else 0
            if held + sum(len(v) - 1 for _, v in values if not v[0] & 1) > QUERY_DATASET_MAX and \
                    not isinstance(msg, C_STORE_RQ):
                command = msg.encoded_command_set.getvalue() if msg is not None else b""
                if _command_field(command + b"".join(v[1:] for _, v in values if v[0] & 1)) != C_STORE_RQ_FIELD:
                    return abort(f"a dataset larger than {QUERY_DATASET_MAX} bytes came with no C-STORE request")
            try:
                inner(primitive)
            except SpoolFull:
                return abort(f"spool {self.cfg.spool} is full (max_spool_mb)")
            except OSError as exc:
                return abort(f"it could not be spooled ({exc.strerror})")
            msg = dimse.message
            if msg is None:
                fragments[0] = 0
                self._hold(assoc, 0)
                return None
            if msg.encoded_command_set.tell() > COMMAND_MAX:
                return abort(f"its command set is larger than {COMMAND_MAX} bytes")
            data = msg.data_set
            fragments[0] += 1
            size = msg.encoded_command_set.tell() + (data.size if isinstance(data, _Spilled) else data.tell())
            if fragments[0] > MESSAGE_FRAGMENTS + size // FRAGMENT_MIN:
                return abort(f"it came in {fragments[0]} fragments of {size // fragments[0]} bytes on average")
            if type(data) is not io.BytesIO or not isinstance(msg, C_STORE_RQ):
                return None
            if self._hold(assoc, data.tell()) <= budget and data.tell() <= IN_MEMORY_MAX:
                return None
            self._hold(assoc, 0)
            ae = self._caller_of(assoc)
            try:
                if self.role(ae) not in IDENTITY_ROLES:
                    return abort("its principal may not upload")
                cs = msg.command_set
                meta = file_meta(str(cs.AffectedSOPClassUID), str(cs.AffectedSOPInstanceUID),
                                 str(assoc._accepted_cx[msg.context_id].transfer_syntax[0]))
                msg.data_set = _Spilled(self.spool, meta, data.getbuffer())
            except SpoolFull:
                return abort(f"spool {self.cfg.spool} is full (max_spool_mb)")
            except (OSError, errors.DgfError, KeyError, AttributeError, IndexError) as exc:
                return abort(f"it could not be spooled ({exc})")
            return None

        dimse.receive_primitive = receive

    def on_close(self, event: Any) -> None:
        _discard(getattr(event.assoc, "dimse", None))      # an instance cut off while arriving
        self._hold(event.assoc, 0)
        self._settled(event)
        with self._lock:
            address = self._opened.pop(id(event.assoc), None)
            if address is not None:
                count_down(self._open, address)
            wakeup = self._wakeups.pop(id(event.assoc), None)
        if wakeup is not None:
            wakeup.close()

    def role(self, ae: str) -> str:
        """The role of the principal ``ae`` acts as (asked once)."""
        with self._lock:
            known = self._roles.get(ae)
        if known is None:
            known = str(self.client(ae).whoami()["role"])
            with self._lock:
                self._roles[ae] = known
        return known

    def on_store(self, event: Any) -> int:
        ae = self._caller(event)
        data = event.request.DataSet
        spilled = data if isinstance(data, _Spilled) else None
        try:
            return self._store(ae, event, spilled)
        finally:
            if spilled is not None:
                spilled.discard()                          # nothing, once kept

    def _store(self, ae: str, event: Any, spilled: _Spilled | None) -> int:
        try:
            if self.role(ae) not in IDENTITY_ROLES:
                log.warning("C-STORE from %s refused: its principal may not upload", ae)
                return NOT_AUTHORIZED
        except errors.DgfError as exc:
            log.error("C-STORE from %s: the archive cannot say who it is (%s)", ae, exc.message)
            return OUT_OF_RESOURCES
        try:
            if spilled is not None:
                spilled.keep(ae)
            elif not self.spool.put(ae, *_part10(event)):
                log.error("spool %s is full (max_spool_mb); an instance from %s was refused", self.cfg.spool, ae)
                return OUT_OF_RESOURCES
        except OSError as exc:
            log.error("could not spool an instance from %s (%s)", ae, exc.strerror)
            return OUT_OF_RESOURCES
        self._uploader(ae).wake.set()
        return SUCCESS

    @staticmethod
    def _identifier(event: Any, ae: str, what: str) -> Dataset | None:
        """The identifier of a query or retrieve, or None (logged in a line) where pydicom
        cannot decode it: one nesting 3000 sequences deep raised RecursionError in pynetdicom's
        handler call, which logged a 180 KB traceback for a 96 KB request."""
        try:
            identifier: Dataset = event.identifier
        except Exception as exc:                             # noqa: BLE001 - any decoding failure
            log.warning("%s from %s failed: its identifier could not be decoded (%s)", what, ae,
                        type(exc).__name__)
            return None
        return identifier

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        ae = self._caller(event)
        identifier = self._identifier(event, ae, "C-FIND")
        if identifier is None:
            yield UNABLE, None
            return
        level = str(getattr(identifier, "QueryRetrieveLevel", "") or "")
        try:
            keys = keys_of(identifier)
            found = find(self.client(ae), level, keys, self.cfg.find_limit)
        except errors.DgfError as exc:
            log.warning("C-FIND from %s failed: %s", ae, exc.message)
            yield (OUT_OF_RESOURCES if isinstance(exc, errors.LimitExceeded) else UNABLE), None
            return
        charset = getattr(identifier, "SpecificCharacterSet", None)
        for entity in found.values():
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield PENDING, answer(level, keys, entity, charset)

    def _retrieve(self, event: Any) -> tuple[list[str], Callable[[], Iterator[Dataset | None]]] | int:
        """The files a C-GET/C-MOVE asks for, and a generator of their datasets (None for a
        file that could not be read); or a failure status."""
        ae = self._caller(event)
        identifier = self._identifier(event, ae, "retrieve")
        if identifier is None:
            return UNABLE
        level = str(getattr(identifier, "QueryRetrieveLevel", "") or "")
        try:
            found = find(self.client(ae), level, keys_of(identifier), self.cfg.find_limit)
        except errors.DgfError as exc:
            log.warning("retrieve for %s failed: %s", ae, exc.message)
            return UNABLE
        paths = [p for e in found.values() for p in e.paths]
        identified = ae in self.cfg.identified
        client = self.client(ae)
        # What the receiving end takes: a C-GET's own association (the contexts the requestor
        # accepted as storage SCP); a C-MOVE's sub-association offers uncompressed syntaxes only.
        takes = None if getattr(event, "move_destination", None) is not None else {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in event.assoc.accepted_contexts
            if cx.transfer_syntax}

        def datasets() -> Iterator[Dataset | None]:
            import pydicom
            from pydicom.filebase import DicomBytesIO

            # Instances past the download's streaming threshold wait here as open, unlinked
            # spool files, not in memory; each is read when its turn comes.
            got: queue.Queue[tuple[str, bytes | BinaryIO] | None] = queue.Queue(maxsize=64)
            stop = threading.Event()

            def put(item: tuple[str, bytes | BinaryIO] | None) -> None:
                """Queue ``item`` unless the retrieve ended (cancelled, or its association gone):
                then the fetch stops instead of waiting on a full queue for ever."""
                while not stop.is_set():
                    try:
                        got.put(item, timeout=1.0)
                        return
                    except queue.Full:
                        continue
                if item is not None and not isinstance(item[1], bytes):
                    item[1].close()
                raise errors.TransportError("the retrieve ended before every instance was sent.")

            def fetch() -> None:
                try:
                    report = client.fetch_streams(paths, lambda p, data: put((p, data)), identified=identified,
                                                  stop=stop)
                    for f in report.failed if not stop.is_set() else ():
                        log.warning("retrieve for %s: %s: %s", ae, f.item, f.reason)
                except errors.DgfError as exc:
                    if not stop.is_set():
                        log.warning("retrieve for %s failed: %s", ae, exc.message)
                finally:
                    with contextlib.suppress(errors.TransportError):
                        put(None)

            threading.Thread(target=fetch, daemon=True, name="dgf-dicom-fetch").start()
            sent = 0
            try:
                while (item := got.get()) is not None:
                    sent += 1
                    data = item[1]
                    ds = pydicom.dcmread(DicomBytesIO(data) if isinstance(data, bytes) else data)
                    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
                    if syntax not in pixels.NATIVE_SYNTAXES and (
                            takes is None or (str(ds.get("SOPClassUID", "")), syntax) not in takes):
                        try:                 # the peer cannot take it compressed: decompressed
                            if not isinstance(data, bytes):
                                data.seek(0)
                                data = data.read()
                            ds = pydicom.dcmread(DicomBytesIO(pixels.transcode(data, pixels.EXPLICIT_LE)))
                        except Exception as exc:                 # noqa: BLE001 - one failed sub-operation
                            log.warning("retrieve for %s: an instance in %s could not be decompressed (%s)",
                                        ae, syntax, exc)
                            yield None
                            continue
                        finally:
                            if not isinstance(item[1], bytes):
                                item[1].close()
                    elif not isinstance(data, bytes):
                        data.close()
                    del data, item
                    yield ds
                for _ in range(len(paths) - sent):
                    yield None                           # not delivered: counted as failed
            finally:
                stop.set()
                while True:                              # close what waits; the fetch thread ends
                    try:
                        left = got.get_nowait()
                    except queue.Empty:
                        break
                    if left is not None and not isinstance(left[1], bytes):
                        left[1].close()
        return paths, datasets

    def _sub_operations(self, event: Any) -> Iterator[Any]:
        """What C-GET and C-MOVE yield after any destination: the number of sub-operations,
        then a status and dataset for each."""
        plan = self._retrieve(event)
        if isinstance(plan, int):
            yield 0
            yield plan, None
            return
        paths, datasets = plan
        yield len(paths)
        for ds in datasets():
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield (PENDING, ds) if ds is not None else (UNABLE, None)

    def on_get(self, event: Any) -> Iterator[Any]:
        yield from self._sub_operations(event)

    def on_move(self, event: Any) -> Iterator[Any]:
        destination = self.cfg.destinations.get(str(event.move_destination).strip())
        if destination is None:
            yield None, None                      # pynetdicom answers Move Destination Unknown
            return
        from pynetdicom import evt

        def bound(opened: Any) -> None:                  # the destination's PDUs, as a caller's
            _bound_reads(opened.assoc, f"move destination {destination[0]}")

        yield destination[0], destination[1], {"evt_handlers": [(evt.EVT_CONN_OPEN, bound)]}
        yield from self._sub_operations(event)

    # -- serving ----------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, _config, evt
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            PatientRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelGet,
            PatientRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
            Verification,
        )

        # pynetdicom decodes and formats every request's identifier, and every PDU and message,
        # for INFO and DEBUG lines the node does not log: the CPU of decoding each identifier
        # twice, and identifiers hold patients' values, which no log line may.
        _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = self.cfg.max_associations
        ae.acse_timeout = ae.dimse_timeout = 30
        ae.network_timeout = 60
        ae.require_calling_aet = sorted(self.cfg.callers)
        ae.maximum_pdu_size = MAX_PDU                 # the peer still sends at most what it can
        # Storage: as SCP for C-STORE, and as SCU inside a C-GET (the role the requestor offers).
        for cx in StoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES, scp_role=True, scu_role=False)
        for sop in (Verification, PatientRootQueryRetrieveInformationModelFind,
                    StudyRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelGet,
                    StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelMove,
                    StudyRootQueryRetrieveInformationModelMove):
            ae.add_supported_context(sop)
        for cx in StoragePresentationContexts:
            ae.add_requested_context(str(cx.abstract_syntax))     # C-MOVE's sub-associations
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, self.on_open), (evt.EVT_CONN_CLOSE, self.on_close),
                               (evt.EVT_ESTABLISHED, self._settled),
                               (evt.EVT_C_ECHO, self.on_echo),
                               (evt.EVT_C_STORE, self.on_store),
                    (evt.EVT_C_FIND, self.on_find), (evt.EVT_C_GET, self.on_get), (evt.EVT_C_MOVE, self.on_move)]
        tls = self.cfg.ssl_context()
        try:
            self.server = ae.start_server(self.cfg.listen, block=False, evt_handlers=handlers, ssl_context=tls)
        except OSError as exc:
            raise errors.ConfigError(f"cannot listen on {self.cfg.listen[0]}:{self.cfg.listen[1]} "
                                     f"({exc.strerror or exc}); is another server using that address?") from exc
        listener = self.server.socket

        def get_request() -> Any:
            try:
                conn, addr = listener.accept()
            except OSError as exc:
                # socketserver skips a failed accept and selects again at once: out of
                # descriptors, the node would spin on the waiting connection until one is freed.
                self._refused("cannot accept connections for now (%s); retrying", exc.strerror or exc)
                time.sleep(ACCEPT_RETRY_S)
                raise
            # Replies go out at once (no Nagle delay against the peer's delayed ACKs).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                # The TLS handshake happens at the association's first read, in its own thread
                # (pynetdicom's wrap does it here, where one silent peer held up every accept
                # for network_timeout); a failed handshake ends that association alone.
                conn = tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            return conn, addr
        self.server.get_request = get_request
        self.server.verify_request = self.admit
        for ae_title in sorted(p.name for p in (self.cfg.spool / "incoming").glob("*") if p.is_dir()) \
                if (self.cfg.spool / "incoming").exists() else []:
            if ae_title in self.cfg.callers and self.spool.pending(ae_title, 1):
                self._uploader(ae_title)                  # left from before a restart
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        for up in self.uploaders.values():
            up.stopping.set()
            up.wake.set()
        for up in self.uploaders.values():
            up.join(timeout=10)
        for c in [*self._clients.values(), *(u.client for u in self.uploaders.values())]:
            c.close()
        self.spool.close()
