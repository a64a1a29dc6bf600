"""The header index: what the query planner can look up instead of parsing every XML header.

Each element of a header becomes one row (key, text, num, first, item): ``key`` is the element's path
of names from the root (``/DicomHeader/ProcedureCodeSequence/Item/CodeValue``), ``text`` its
XPath string-value, ``num`` that value converted as XPath's ``number()`` does (None for NaN), and
``first`` whether it is the first element with that key in document order (XPath's ``string()``
of a node-set reads only that one), ``item`` the number (in document order, from 1) of the
sequence item the element is or sits directly in, 0 at the top level: two rows with the same
``item`` are in the same item, which lets ``Item[A='x' and B='y']`` be answered in SQL.  Sequences and items get rows too, with no text: they answer
existence tests.  The rows are written in the transaction that writes the XML, so the index can
never disagree with the header it describes.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from lxml import etree
from pydicom.datadict import DicomDictionary
from sqlalchemy.dialects import postgresql

HEADER_XATTR = "user.dgf.dicom"
ROOT_KEY = "/DicomHeader"
#: Values longer than this are indexed by a prefix ending in U+FFFF (which XML cannot carry, so
#: a stored prefix never equals a real value); the planner treats such keys conservatively.
MAX_TEXT = 256
LONG_MARK = "\uffff"

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)
#: What XPath's number() reads as a number, as libxml2 parses it (xmlXPathStringEvalNumber):
#: blanks, an optional '-', ASCII digits with an optional fraction, an optional exponent whose
#: digits libxml2 does not even require ('1e' is 1), blanks.  ASCII digits only: Python's \\d
#: and float() would read U+0663 as 3, where XPath gives NaN.
_NUMBER = re.compile(r"[ \t\r\n]*(-?)([0-9]*)(?:\.([0-9]*))?(?:[eE]([+-]?)([0-9]*))?[ \t\r\n]*")
#: libxml2 reads at most this many fraction digits after the leading zeros.
_MAX_FRAC = 20
_NON_SQ_KEYWORDS = frozenset(entry[4] for entry in DicomDictionary.values() if entry[4] and entry[0] != "SQ")


def xpath_number(text: str) -> float | None:
    """XPath 1.0 ``number()`` of a string as lxml computes it; None for NaN.

    A plain decimal converts as float() does, correctly rounded, as the index has always stored
    it (libxml2's own sum of digits can be one unit in the last place away: '2.704' is
    2.7039999999999997 to it; both sides of a comparison are converted the same way in each
    world, so results agree).  A decimal with an exponent is computed as libxml2 computes it
    (it used to be asked).  Nothing else is a number: names, codes, UIDs, '000Y', and digits
    other than ASCII ones, which float() would read.  tests/test_query checks this against lxml.
    """
    m = _NUMBER.fullmatch(text)
    if m is None:
        return None
    sign, whole, frac, exp_sign, exp = m.groups()
    if not whole and not frac:
        return None                    # no digit before the exponent: '', '-', '.', 'e5'
    if exp is None:
        return float(text)
    ret = _digits(whole)
    if frac:
        zeros = len(frac) - len(frac.lstrip("0"))
        read = frac[zeros:zeros + _MAX_FRAC]
        ret = ret + _digits(read) / _pow10(zeros + len(read))
    if sign:
        ret = -ret
    exponent = 0
    for c in exp:
        if exponent < 1000000:
            exponent = exponent * 10 + (ord(c) - 48)
    ret *= _pow10(-exponent if exp_sign == "-" else exponent)
    return None if math.isnan(ret) else ret       # 0E400: zero times infinity


def _digits(digits: str) -> float:
    """libxml2's sum of decimal digits (value * 10 + digit, in doubles); exact, and so equal to
    int(), up to 15 digits."""
    if len(digits) <= 15:
        return float(int(digits or "0"))
    value = 0.0
    for c in digits:
        value = value * 10 + (ord(c) - 48)
    return value


def _pow10(n: int) -> float:
    """C's pow(10.0, n), which overflows to infinity where Python raises."""
    try:
        return math.pow(10.0, n)
    except OverflowError:
        return math.inf


def comparable(name: str) -> bool:
    """Whether elements with this name hold a value the index can compare: a DICOM keyword whose
    dictionary VR is not SQ.  Sequences, items and private or unknown elements are indexed for
    existence only."""
    return name in _NON_SQ_KEYWORDS


Row = tuple[str, str, float | None, bool, int]     # key, text, num, first, item


@dataclass(frozen=True)
class HeaderIndex:
    rows: list[Row]
    keys: AbstractSet[str]      # every key of the rows
    long_keys: set[str]
    multi_keys: set[str]        # keys with more than one distinct value (node) in this header
    patient: str
    study: str
    series: str


#: number() of short values seen before: most of a header repeats across a series ("CT",
#: "0.5", "MONOCHROME2"), and a hit costs a tenth of the conversion.  Cleared when full.
_NUMBERS: dict[str, float | None] = {}
_MISS = math.nan                 # not in the memo (xpath_number gives None, never NaN)
_TAG_OF = operator.attrgetter("tag")
_TEXT_OF = operator.attrgetter("text")
_TAIL_OF = operator.attrgetter("tail")


def _numbers(texts: list[str]) -> list[float | None]:
    """number() of each text, from the memo where it can."""
    numbers = _NUMBERS
    nums = list(map(numbers.get, texts, itertools.repeat(_MISS)))
    if _MISS in nums:
        for i in itertools.compress(range(len(nums)), map(operator.is_, nums, itertools.repeat(_MISS))):
            text = texts[i]
            if text.count(".") > 1:
                # Never a number (number() reads one '.' at most): a UID, new in every header,
                # which would only churn the memo.
                nums[i] = None
                continue
            num = xpath_number(text)
            if len(text) <= 64:
                if len(numbers) >= 50_000:
                    numbers.clear()
                numbers[text] = num
            nums[i] = num
    return nums


@dataclass(frozen=True)
class _Shape:
    """What a header's element tree alone determines (:func:`_shape`)."""
    keys: list[str]
    items: list[int]
    blank: list[int]                  # elements whose text is not indexed (no comparable keyword)
    joined: list[tuple[int, int]]     # comparable elements with children: (index, end of subtree)
    firsts: list[bool]                # the first element of its key in document order
    repeated: list[int]               # elements whose key others have too
    keyset: frozenset[str]


#: Element shapes seen before: a header's tags and child counts in document order (which
#: determine its tree) -> each element's key, item and what its text is (:func:`_shape`).  The
#: headers of a series, and most of a modality's, share one.  Bounded; cleared when full.
_SHAPES: dict[tuple[str | int, ...], _Shape] = {}


def _shape(tags: list[str], lens: list[int]) -> _Shape:
    """The shape of a tree given in document order by its tags and child counts, every child an
    element."""
    n = len(tags)
    keys, items, blank = [ROOT_KEY], [0], [0]
    ends = [n] * n
    keywords = _NON_SQ_KEYWORDS
    count = 0
    open_: list[list[Any]] = [[ROOT_KEY, 0, lens[0], 0]]    # key, item, children still to come, index
    for i in range(1, n):
        while not open_[-1][2]:
            ends[open_.pop()[3]] = i
        parent = open_[-1]
        parent[2] -= 1
        name = tags[i]
        at = parent[1]
        if name == "Item":
            count += 1
            at = count
        key = parent[0] + "/" + name
        keys.append(key)
        items.append(at)
        if name not in keywords:
            blank.append(i)
        if lens[i]:
            open_.append([key, at, lens[i], i])
    joined = [(i, ends[i]) for i in range(1, n) if lens[i] and tags[i] in keywords]
    seen: dict[str, int] = {}
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
    firsts, met = [], set()
    for key in keys:
        firsts.append(key not in met)
        met.add(key)
    return _Shape(keys, items, blank, joined, firsts, [i for i, k in enumerate(keys) if seen[k] > 1],
                  frozenset(keys))


def _by_shape(root: etree._Element) -> tuple[list[Row], AbstractSet[str], set[str], set[str]] | None:
    """:func:`_by_walk`'s answer, read in C where the header's shape was seen before: lxml lists
    the elements, tags, child counts and texts, and the keys, items and first flags come from
    the shape's memo.  None where some child is no element (a comment, processing instruction
    or entity reference) or a value is long: the general walk knows those."""
    els = list(root.iter(etree.Element))
    lens = list(map(len, els))
    if sum(lens) != len(els) - 1:
        return None
    tags = list(map(_TAG_OF, els))
    sig = (*tags, *lens)
    shape = _SHAPES.get(sig)
    if shape is None:
        shape = _shape(tags, lens)
        # At most ~200 KB a shape (keys grow with depth): a hostile header's would not be
        # met again, and the memo stays under ~100 MB whatever is sent.
        if len(els) <= 2000 and sum(map(len, shape.keys)) <= 100_000:
            if len(_SHAPES) >= 512:
                _SHAPES.clear()
            _SHAPES[sig] = shape
    texts = list(map(_TEXT_OF, els))
    if shape.joined:
        # An element with children has its descendants' texts for string-value, in document
        # order; text after an element (a tail) is left to lxml, which knows where it belongs.
        if any(map(_TAIL_OF, els)):
            values = ["".join(els[i].itertext()) for i, _ in shape.joined]  # type: ignore[arg-type]
        else:
            values = ["".join(filter(None, texts[i:end])) for i, end in shape.joined]
        for (i, _), value in zip(shape.joined, values):
            texts[i] = value
    for i in shape.blank:
        texts[i] = ""
    return _rows(shape, [t or "" for t in texts])


def _rows(shape: _Shape, texts: list[str]) -> tuple[list[Row], AbstractSet[str], set[str], set[str]] | None:
    """The rows of a header of this shape whose elements' indexed texts (string-values, "" where
    not indexed) are ``texts``; None where a value is long (the general walk cuts those)."""
    if max(map(len, texts)) > MAX_TEXT:
        return None
    keys, items = shape.keys, shape.items
    drop: list[int] = []
    multi: set[str] = set()
    if shape.repeated:
        # A repeated (key, value, item) adds no row: only keys the shape repeats can repeat one.
        seen: set[tuple[str, str, int]] = set()
        counts: dict[str, int] = {}
        for i in shape.repeated:
            node = (keys[i], texts[i], items[i])
            if node in seen:
                drop.append(i)
                continue
            seen.add(node)
            counts[node[0]] = counts.get(node[0], 0) + 1
        multi = {k for k, c in counts.items() if c > 1}
    rows = list(zip(keys, texts, _numbers(texts), shape.firsts, items))
    for i in reversed(drop):
        del rows[i]
    return rows, shape.keyset, set(), multi


# -- the token reader ------------------------------------------------------------------------
#
# Most headers are what dgf/dicom/xmlheader.py writes: elements with a few attributes and text,
# no comments, CDATA, declarations or namespaces.  For those a split of the text at its angle
# brackets lists every tag and every text in C, and the tags (a tuple, looked up in a memo) fix
# the tree; lxml's parse and a proxy object per element (two thirds of indexing a header) are
# left out.  Only what is certainly well-formed XML, read exactly as lxml reads it, is taken
# this way (the rules below, each checked once per memoised tag sequence where it can be);
# anything else goes to lxml, which parses it or names its error.

#: Bytes whose presence sends a header to the careful checks: angle brackets must alternate,
#: and '&', ']' and control characters need a look (entities, ']]>', characters XML forbids).
_NOT_PLAIN = bytes(b for b in range(256) if b not in b"<>&]" and (b >= 0x20 or b in b"\t\n"))
_NOT_ANGLE = bytes(b for b in range(256) if b not in b"<>")
#: Control characters XML cannot carry, and the carriage return, which XML reads as a line feed.
_NOT_CONTROL = bytes(b for b in range(256) if b >= 0x20 or b in b"\t\n")
_NAME = r"[A-Za-z_][A-Za-z0-9_.-]*"
#: A start tag: a name, attributes in double quotes (the five named entities the only
#: references), optional blanks and an optional '/' (an empty element).
_START = re.compile(rf'({_NAME})((?:[ \t\n]+{_NAME}="(?:[^"&]|&(?:amp|lt|gt|quot|apos);)*")*)[ \t\n]*(/?)')
_ATTR = re.compile(rf'[ \t\n]+({_NAME})="(?:[^"&]|&(?:amp|lt|gt|quot|apos);)*"')
_END = re.compile(rf"/({_NAME})[ \t\n]*")
_ENTITY = re.compile(r"&(?:(amp|lt|gt|quot|apos)|#([0-9]{1,7})|#x([0-9A-Fa-f]{1,6}));")
_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}
#: The levels a header is grouped by (HeaderIndex.patient, .study, .series).
_LEVELS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
#: Deeper documents go to lxml, which has a depth limit of its own.
_MAX_DEPTH = 256


@dataclass(frozen=True)
class _Tags:
    """What a sequence of tags determines (:func:`_tags`): the tree's shape, where each element's
    text is among the texts after the tags, and the token span of each element whose
    string-value joins its descendants' texts."""
    shape: _Shape
    text_of: Any                             # operator.itemgetter over the texts
    spans: list[tuple[int, int, int]]        # (element, first token, end token)
    levels: list[list[int]]                  # the texts of the root's PatientID, ... children
    level_of: Any                            # the first of each, where none has two: itemgetter


_TAGS: dict[tuple[str, ...], _Tags] = {}


def _tags(tokens: list[str]) -> _Tags | None:
    """The tree of a document given as the tags between its angle brackets, or None where those
    are not one DicomHeader element, well-formed and nested, in the forms the reader takes."""
    n = len(tokens)
    names: list[str] = []
    lens: list[int] = []
    text_at: list[int] = []          # the token after which the element's own text is
    first: list[int] = []
    last: list[int] = []
    open_: list[int] = []
    for t, token in enumerate(tokens):
        if token[:1] == "/":
            m = _END.fullmatch(token)
            if m is None or not open_ or names[open_[-1]] != m.group(1):
                return None
            last[open_.pop()] = t
            continue
        m = _START.fullmatch(token)
        if m is None or (t and not open_):
            return None                      # not a start tag the reader takes, or a second root
        attrs = _ATTR.findall(m.group(2))
        if len(set(attrs)) != len(attrs) or any(a.startswith("xml") for a in attrs):
            return None                      # a repeated attribute, or a namespace declaration
        if open_:
            lens[open_[-1]] += 1
        names.append(m.group(1))
        lens.append(0)
        first.append(t)
        last.append(t)
        if m.group(3):
            text_at.append(n - 1)            # an empty element: the text after the root, cleared
        else:
            text_at.append(t)
            open_.append(len(names) - 1)
            if len(open_) > _MAX_DEPTH:
                return None
    if open_ or not names or names[0] != "DicomHeader":
        return None
    shape = _shape(names, lens)
    spans = [(i, first[i], last[i]) for i, _ in shape.joined]
    levels = [[text_at[i] for i in range(1, len(names)) if shape.keys[i] == ROOT_KEY + "/" + level]
              for level in _LEVELS]
    level_of = None if any(len(at) > 1 for at in levels) else \
        operator.itemgetter(*(at[0] if at else n - 1 for at in levels))
    blank = set(shape.blank)
    # Elements whose text is not indexed read "" too; one index more keeps itemgetter's answer
    # a tuple for a lone root.
    at = [n - 1 if i in blank else text_at[i] for i in range(len(names))]
    return _Tags(shape, operator.itemgetter(*at, n - 1), spans, levels, level_of)


def _unescaped(text: str) -> str | None:
    """A text with its character and entity references replaced, as XML reads them; None where
    some '&' starts none of those or a reference names a character XML cannot carry."""
    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return _NAMED[m.group(1)]
        code = int(m.group(2), 10) if m.group(2) else int(m.group(3), 16)
        if not (code in (0x9, 0xA, 0xD) or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD
                or 0x10000 <= code <= 0x10FFFF):
            raise ValueError(code)
        return chr(code)

    if "&" in _ENTITY.sub("", text):
        return None                          # a '&' that starts no reference
    try:
        return _ENTITY.sub(one, text)
    except ValueError:
        return None


def _read(xml: bytes) -> tuple[tuple[list[Row], AbstractSet[str], set[str], set[str]], tuple[str, ...]] | None:
    """A header's rows, keys, long and multi-valued keys, and its PatientID, StudyInstanceUID and
    SeriesInstanceUID, read by the token reader (above); None where lxml must read it."""
    try:
        doc = xml.decode("utf-8")
    except UnicodeDecodeError:
        return None
    parts = doc.replace(">", "<").split("<")
    tokens = parts[1::2]
    if parts[0] or parts[-1].strip(" \t\n"):
        return None                          # text before the root, or other than blanks after
    if xml.translate(None, _NOT_PLAIN) != b"<>" * len(tokens):
        # Something to look at: the brackets must still alternate, no character may be one XML
        # cannot carry, and no text may hold ']]>'; references are replaced below.
        if xml.translate(None, _NOT_ANGLE) != b"<>" * len(tokens) or \
                xml.translate(None, _NOT_CONTROL) or "]]>" in doc:
            return None
        ampersand = "&" in doc
    else:
        ampersand = False
    if not doc.isascii() and ("\ufffe" in doc or "\uffff" in doc):
        return None                          # not characters in XML
    tags = _TAGS.get(tuple(tokens))
    if tags is None:
        tags = _tags(tokens)
        if tags is None:
            return None
        # At most ~300 KB a memo (the tags and the shape's keys): a hostile header's would not
        # be met again, and the memo stays under ~150 MB whatever is sent.
        if sum(map(len, tokens)) <= 100_000 and sum(map(len, tags.shape.keys)) <= 100_000:
            if len(_TAGS) >= 512:
                _TAGS.clear()
            _TAGS[tuple(tokens)] = tags
    texts = parts[2::2]
    if ampersand:
        read = [_unescaped(t) if "&" in t else t for t in texts]
        if None in read:
            return None
        texts = read        # type: ignore[assignment]
    texts[-1] = ""                           # the blanks after the root: read as "" (_tags)
    values = list(tags.text_of(texts))
    values.pop()
    for i, start, end in tags.spans:
        values[i] = "".join(texts[start:end])
    shape = tags.shape
    rows = _rows(shape, values) or _node_rows(list(zip(shape.keys, values, shape.items)))
    if tags.level_of is not None:
        return rows, tags.level_of(texts)
    return rows, tuple(next((texts[i] for i in at if texts[i]), "") for at in tags.levels)


def _walk(root: etree._Element) -> list[tuple[str, str, int]]:
    """Every element's (key, string-value, item) in document order, comments, processing
    instructions and entity references skipped, with a stack of open elements (a recursive
    closure would make a reference cycle per header, left to the cycle collector)."""
    nodes: list[tuple[str, str, int]] = [(ROOT_KEY, "", 0)]
    append = nodes.append
    keywords = _NON_SQ_KEYWORDS
    items = 0
    open_: list[tuple[Iterator[Any], str, int]] = [(iter(root), ROOT_KEY, 0)]
    while open_:
        children, key, item = open_[-1]
        for child in children:
            name = child.tag
            if not isinstance(name, str):
                continue                     # a comment, processing instruction or entity
            at = item
            if name == "Item":
                items += 1
                at = items
            sub = key + "/" + name
            if not len(child):
                append((sub, (child.text or "") if name in keywords else "", at))
            else:
                append((sub, "".join(child.itertext()) if name in keywords else "", at))   # in C
                open_.append((iter(child), sub, at))
                break
        else:
            open_.pop()
    return nodes


def _by_walk(root: etree._Element) -> tuple[list[Row], AbstractSet[str], set[str], set[str]]:
    """Rows, keys, long keys and multi-valued keys of any header: every node's (key,
    string-value, item) in document order (:func:`_walk`), then :func:`_node_rows`."""
    return _node_rows(_walk(root))


def _node_rows(nodes: list[tuple[str, str, int]]) -> tuple[list[Row], AbstractSet[str], set[str], set[str]]:
    """Rows, keys, long keys and multi-valued keys of a header's nodes, (key, string-value, item)
    in document order: one row per distinct triple (repeated values of multi-valued attributes
    and items add nothing), the row of the first node of its key flagged, long values cut."""
    rows: list[Row] = []
    per_key: dict[str, int] = {}
    long_keys: set[str] = set()
    cut: set[tuple[str, str, int]] = set()
    nodes = list(dict.fromkeys(nodes))
    kept = []
    for key, full, item in nodes:
        text = full
        if len(full) > MAX_TEXT:
            text = full[:MAX_TEXT] + LONG_MARK
            long_keys.add(key)
            if (key, text, item) in cut:     # two long values alike in their first MAX_TEXT
                continue
            cut.add((key, text, item))
        count = per_key.get(key, 0)
        per_key[key] = count + 1
        kept.append(full)
        rows.append((key, text, None, not count, item))
    rows = [(k, t, num, f, i) for (k, t, _, f, i), num in zip(rows, _numbers(kept))]
    return rows, set(per_key), long_keys, {k for k, n in per_key.items() if n > 1}


def _by_lxml(xml: bytes) -> tuple[tuple[list[Row], AbstractSet[str], set[str], set[str]], tuple[str, ...]]:
    """What :func:`_read` answers, from lxml's parse: any header XML can carry."""
    root = etree.fromstring(xml, _PARSER)
    if root.tag != "DicomHeader":
        raise ValueError("the header's root element is not DicomHeader.")
    rows = _by_shape(root) or _by_walk(root)
    levels = dict.fromkeys(_LEVELS, "")
    for child in root.iterchildren(*levels):      # lxml picks them out in C
        if not levels[child.tag]:
            levels[child.tag] = child.text or ""
    return rows, tuple(levels.values())


def index_header(xml: bytes) -> HeaderIndex:
    """The index rows and the patient/study/series keys of one XML header."""
    (rows, keys, long_keys, multi_keys), (patient, study, series) = _read(xml) or _by_lxml(xml)
    return HeaderIndex(rows, keys, long_keys, multi_keys, patient, study, series)


#: A series set is made only where its headers have at least this many rows in common.
SHARE_LEAST = 4
@dataclass(frozen=True)
class SeriesSet:
    series: str
    rows: list[Row]             # the rows every member has, as HeaderIndex.rows
    inos: list[int]             # its members


def share(indexed: list[tuple[int, HeaderIndex]], existing: Mapping[str, tuple[int, AbstractSet[Row]]] | None = None,
          siblings: Mapping[str, AbstractSet[Row]] | None = None
          ) -> tuple[list[tuple[int, Row]], list[SeriesSet], list[tuple[int, int]]]:
    """Split headers' rows into series sets and each header's own rows.

    The headers of one series have most rows in common (a CT series differs image to image in a
    handful of elements: SOP Instance UID, instance number, position), so those rows are stored
    once per set and each header keeps only the rest: a header's own rows plus its set's rows
    are exactly its rows, and the index reads the two as one (``values_t``).

    ``existing`` maps a series to its newest set already stored, (id, rows): a header that has
    all of that set's rows joins it, so a series written over many commits (one image per
    DIMSE association or STOW-RS request, or an upload whose batches interleave series) keeps
    its common rows once instead of once per commit or in every file.  The headers of a series
    that cannot join, two or more, make a new set.

    A series that arrives one header a commit (a copy into the mount, one instance per STOW-RS
    request) would never have two headers in one commit.  So a header alone in its series makes
    a set of the rows it shares with ``siblings`` (every row of a stored header of a series that
    has no set yet), or with the series' set when it cannot join it but has three quarters of
    its rows (a smaller set, which the next headers join: a value two images happened to share,
    such as a time to the second, no longer keeps the rest of the series out of it).  Returns
    the own rows, the new sets and the (set id, ino) of each header that joins an existing set.
    """
    groups: dict[str, list[tuple[int, HeaderIndex]]] = {}
    for ino, h in indexed:
        groups.setdefault(h.series, []).append((ino, h))
    own: list[tuple[int, Row]] = []
    sets: list[SeriesSet] = []
    joined: list[tuple[int, int]] = []
    for series, group in groups.items():
        old = existing.get(series) if existing else None
        common: set[Row] = set()
        if len(group) > 1:
            common = set(group[0][1].rows).intersection(*(h.rows for _, h in group[1:]))
        if old is not None and (len(common) < SHARE_LEAST or
                                _joining_costs_less(len(old[1]), len(common), len(group))):
            set_id, rows = old
            rest = []
            for ino, h in group:
                mine = set(h.rows)
                if mine.issuperset(rows):
                    joined.append((set_id, ino))
                    own.extend((ino, row) for row in mine.difference(rows))
                else:
                    rest.append((ino, h))
            if len(rest) != len(group):
                group = rest
                common = set(group[0][1].rows).intersection(*(h.rows for _, h in group[1:])) \
                    if len(group) > 1 else set()
            if len(group) == 1:
                common = set(group[0][1].rows).intersection(old[1])
                if len(common) * 4 < len(old[1]) * 3:
                    common = set()      # another kind of image (a localizer): the set stays
        elif old is None and len(group) == 1 and siblings and series in siblings:
            common = set(group[0][1].rows).intersection(siblings[series])
        if len(common) < SHARE_LEAST:
            own.extend((ino, row) for ino, h in group for row in h.rows)
            continue
        sets.append(SeriesSet(series, list(common), [ino for ino, _ in group]))
        # Set differences, in C: a header's rows are distinct, and their order does not matter.
        own.extend((ino, row) for ino, h in group for row in set(h.rows).difference(common))
    return own, sets, joined


def _joining_costs_less(old: int, common: int, members: int) -> bool:
    """Whether ``members`` headers joining a stored set of ``old`` rows store fewer rows than
    their own new set of the ``common`` rows they share (its rows once, plus a member row each;
    one member row each either way)."""
    return members * (common - old) <= common


# -- tables ------------------------------------------------------------------------------------

metadata = sa.MetaData()
_TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")

#: The catalogue of element paths ever indexed (small: one row per distinct path).
keys_t = sa.Table(
    "hkeys", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("path", _TEXT, nullable=False, unique=True),
    sa.Column("has_long", sa.Boolean, nullable=False, default=False),
    # Some header has two or more values at this path: conjunctions on it cannot be merged.
    sa.Column("multi", sa.Boolean, nullable=False, default=False),
)
#: One row per element of every header that is not in its series set (below); the primary key
#: is the equality/prefix index.
own_t = sa.Table(
    "hvalues", metadata,
    sa.Column("key", sa.Integer, primary_key=True),
    sa.Column("text", _TEXT, primary_key=True),
    sa.Column("ino", sa.Integer, primary_key=True),
    sa.Column("item", sa.Integer, primary_key=True),
    sa.Column("num", sa.Float, nullable=True),
    sa.Column("first", sa.Boolean, nullable=False),
    sqlite_with_rowid=False,
)
# Per-file probes (ino, key) and deletes; numeric ranges (key, num) where a value is a number.
sa.Index("ix_hvalues_ino", own_t.c.ino, own_t.c.key, own_t.c.item, own_t.c.num)
sa.Index("ix_hvalues_num", own_t.c.key, own_t.c.num, own_t.c.ino,
         sqlite_where=own_t.c.num.isnot(None), postgresql_where=own_t.c.num.isnot(None))
#: Series sets: the rows that every header of a series committed together has in common (most of
#: a header: the patient's, the study's and the series' elements), stored once per set.
sets_t = sa.Table(
    "hsets", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series", sa.String, nullable=False),
    sqlite_autoincrement=True,                # a removed set's id is never given to a new one
)
# A commit finds the newest set of each of its series (headers join it: index.share).
sa.Index("ix_hsets_series", sets_t.c.series, sets_t.c.id)
shared_t = sa.Table(
    "hshared", metadata,
    sa.Column("key", sa.Integer, primary_key=True),
    sa.Column("text", _TEXT, primary_key=True),
    sa.Column("set_id", sa.Integer, primary_key=True),
    sa.Column("item", sa.Integer, primary_key=True),
    sa.Column("num", sa.Float, nullable=True),
    sa.Column("first", sa.Boolean, nullable=False),
    sqlite_with_rowid=False,
)
sa.Index("ix_hshared_set", shared_t.c.set_id, shared_t.c.key, shared_t.c.item, shared_t.c.num)
sa.Index("ix_hshared_num", shared_t.c.key, shared_t.c.num, shared_t.c.set_id,
         sqlite_where=shared_t.c.num.isnot(None), postgresql_where=shared_t.c.num.isnot(None))
#: The headers of each set.  A header is in one set at most: the unique index on ``ino`` alone
#: also tells SQLite's planner that a probe by file meets one set, so it looks the file up first.
members_t = sa.Table(
    "hmembers", metadata,
    sa.Column("set_id", sa.Integer, primary_key=True),
    sa.Column("ino", sa.Integer, primary_key=True),
    sqlite_with_rowid=False,
)
sa.Index("ix_hmembers_ino", members_t.c.ino, unique=True)
#: The patient, study and series of every indexed header (for --level grouping).
levels_t = sa.Table(
    "hlevels", metadata,
    sa.Column("ino", sa.Integer, primary_key=True),
    sa.Column("patient", sa.String, nullable=False),
    sa.Column("study", sa.String, nullable=False),
    sa.Column("series", sa.String, nullable=False),
)

#: What the planner reads: every header's rows, its own and its set's, as one relation.  A view
#: (made by revision 0004, as is sample_t), declared in its own MetaData so that create_all and Alembic's
#: comparison leave it alone; SQLite and PostgreSQL push a query's conditions, a probe's file
#: included, into each branch.
views = sa.MetaData()
values_t = sa.Table(
    "hindex", views,
    sa.Column("key", sa.Integer),
    sa.Column("text", _TEXT),
    sa.Column("ino", sa.Integer),
    sa.Column("item", sa.Integer),
    sa.Column("num", sa.Float),
    sa.Column("first", sa.Boolean),
)
#: The same rows with their series set (0 for a file's own rows), for the planner's sampled
#: estimates (sqlindex.query_estimate), which bound the sets they read as well as the files.  A
#: view apart: a computed column stops SQLite pushing a probe's file into the branches.
sample_t = sa.Table(
    "hsample", views,
    *(sa.Column(c.name, c.type) for c in values_t.c),
    sa.Column("set_id", sa.Integer),
)
#: The last series set of an estimate's sample: estimates read sample_t's rows up to it.
LAST_SET = sa.bindparam("b_last_set", type_=sa.Integer)
