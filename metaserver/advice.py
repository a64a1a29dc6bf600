"""What a query means before it runs: mistakes researchers make, caught or corrected.

XPath 1.0 answers a typo with zero rows and no word: a step naming no DICOM keyword
(``Modalty``, ``modality``) selects nothing; ``StudyDate >= '2010-01-01'`` compares a number
with NaN; ``date()`` is not an XPath 1.0 function.  :func:`review` looks at the syntax tree
first and

- refuses a call of a function XPath 1.0 does not have, naming it;
- reads an ISO date literal (``'2010-01-01'``) compared with an element as the DICOM date it
  means (``20100101``), and says so;
- refuses an ordering comparison (``<``, ``<=``, ``>``, ``>=``) with any other text that is
  not a number, which could match nothing, with a hint (for ages: ``030Y``);
- warns of each element name that is neither a DICOM keyword (pydicom's dictionary) nor stored
  in the archive, suggesting the nearest keyword.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from pydicom.datadict import DicomDictionary, dictionary_VR, keyword_dict

from dgf import errors
from metaserver import xpath

#: The functions of XPath 1.0 (section 4), which is what the archive evaluates.
FUNCTIONS = frozenset({
    "last", "position", "count", "id", "local-name", "namespace-uri", "name", "string", "concat",
    "starts-with", "contains", "substring-before", "substring-after", "substring",
    "string-length", "normalize-space", "translate", "boolean", "not", "true", "false", "lang",
    "number", "sum", "floor", "ceiling", "round"})
#: Element names of the XML header model that are not DICOM keywords.
MODEL_NAMES = frozenset({"DicomHeader", "Item", "PrivateElement"})
_ORDERING = frozenset({"<", "<=", ">", ">="})
_ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_AGE = re.compile(r"\d{3}[DWMY]")


@dataclass
class Review:
    expr: str                                   # the expression to run (ISO dates rewritten)
    warnings: list[str] = field(default_factory=list)


@lru_cache(maxsize=1)
def _keywords() -> tuple[frozenset[str], dict[str, str]]:
    names = frozenset(entry[4] for entry in DicomDictionary.values() if entry[4])
    return names, {n.lower(): n for n in names}


def _nodes(node: xpath.Node) -> Iterator[xpath.Node]:
    yield node
    if isinstance(node, xpath.Binary):
        yield from _nodes(node.left)
        yield from _nodes(node.right)
    elif isinstance(node, xpath.Neg):
        yield from _nodes(node.operand)
    elif isinstance(node, xpath.Call):
        for arg in node.args:
            yield from _nodes(arg)
    elif isinstance(node, xpath.Filter):
        yield from _nodes(node.primary)
        for pred in node.preds:
            yield from _nodes(pred)
    elif isinstance(node, xpath.Path):
        if node.start is not None:
            yield from _nodes(node.start)
        for step in node.steps:
            for pred in step.preds:
                yield from _nodes(pred)


def _last_name(node: xpath.Node) -> str | None:
    """The element a path operand ends at (``StudyDate``, ``.../Item/CodeValue``), if any."""
    if isinstance(node, xpath.Path) and node.steps and node.steps[-1].axis == "child":
        test = node.steps[-1].test
        return test if test not in ("*", "node()", "text()") else None
    return None


def review(expr: str, tree: xpath.Node, stored: frozenset[str] = frozenset()) -> Review:
    """Check ``expr`` (parsed as ``tree``) as described in the module docstring; ``stored``:
    the element names the archive's headers hold (private and unusual ones included)."""
    out = Review(expr)
    edits: list[tuple[tuple[int, int], str]] = []
    for node in _nodes(tree):
        if isinstance(node, xpath.Call) and node.name not in FUNCTIONS and ":" not in node.name:
            raise errors.UsageError(
                f"{node.name}() is not an XPath 1.0 function; the archive evaluates XPath 1.0 "
                "(compare dates as numbers: StudyDate >= 20100101).")
        if isinstance(node, xpath.Binary) and node.op in (*_ORDERING, "=", "!="):
            for lit, other in ((node.right, node.left), (node.left, node.right)):
                if isinstance(lit, xpath.Literal):
                    edits.extend(_literal(out, node, lit, other, expr))
    for span, text in sorted(edits, reverse=True):
        out.expr = out.expr[:span[0]] + text + out.expr[span[1]:]
    out.warnings.extend(_unknown_names(tree, stored))
    return out


def _literal(out: Review, node: xpath.Binary, lit: xpath.Literal, other: xpath.Node,
             expr: str) -> list[tuple[tuple[int, int], str]]:
    name = _last_name(other)
    vr = _vr(name) if name else ""
    iso = _ISO_DATE.fullmatch(lit.value)
    if iso and (node.op in _ORDERING or vr in ("DA", "DT")):
        dicom = "".join(iso.groups())
        out.warnings.append(f"read '{lit.value}' as the DICOM date {dicom} in {xpath.text(expr, node)}.")
        return [(lit.span, dicom if node.op in _ORDERING else f"'{dicom}'")]
    if node.op not in _ORDERING or _is_number(lit.value):
        return []
    shown = xpath.text(expr, node)
    if vr == "AS" or _AGE.fullmatch(lit.value):
        age = name or "PatientAge"
        number, unit = (int(lit.value[:3]), lit.value[3]) if _AGE.fullmatch(lit.value) else (30, "Y")
        hint = (f"ages are text such as 030Y: compare them as text ({age} = '{lit.value}') or as "
                f"numbers: number(substring({age}, 1, 3)) {node.op} {number} and substring({age}, 4) = '{unit}'")
    else:
        hint = "compare with a number (dates as 20100101, times as 120000)"
    raise errors.UsageError(f"{shown} compares with '{lit.value}', which is not a number, and XPath's "
                            f"{node.op} compares numbers, so it would match nothing; {hint}.")


def _is_number(text: str) -> bool:
    try:
        float(text.strip())
    except ValueError:
        return False
    return text.strip() not in ("", "nan", "inf", "-inf", "NaN", "Infinity")


def _vr(name: str) -> str:
    tag = keyword_dict.get(name)
    try:
        return dictionary_VR(tag) if tag is not None else ""
    except KeyError:
        return ""


def _unknown_names(tree: xpath.Node, stored: frozenset[str]) -> list[str]:
    keywords, lowered = _keywords()
    seen: set[str] = set()
    out = []
    for node in _nodes(tree):
        if not isinstance(node, xpath.Path):
            continue
        for step in node.steps:
            name = step.test
            if step.axis not in ("child", "descendant", "descendant-or-self", "self") or name in seen \
                    or name in ("*", "node()", "text()") or ":" in name or "(" in name:
                continue
            seen.add(name)
            if name in keywords or name in MODEL_NAMES or name in stored:
                continue
            near = lowered.get(name.lower()) or next(iter(difflib.get_close_matches(name, keywords, 1, 0.8)), None)
            suggestion = f"; did you mean {near}?" if near else ""
            out.append(f"{name} is not a DICOM keyword and no header in the archive has it, so that "
                       f"step selects nothing{suggestion}")
    return out
