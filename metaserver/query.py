"""XPath cohort queries over the XML headers.

Full XPath 1.0 semantics, evaluated by lxml per file: a file matches when the expression is true
or selects a non-empty node-set.  This module compiles, validates and evaluates; the engine supplies
candidates (today a streamed scan of the subtree).
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

from lxml import etree

from dgf import errors

HEADER_XATTR = "user.dgf.dicom"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)


def compile_xpath(expr: str) -> etree.XPath:
    """Compile ``expr`` or raise a one-line :class:`UsageError` naming the problem."""
    if not expr.strip():
        raise errors.UsageError("the XPath expression is empty; try /DicomHeader[Modality='CT'].")
    try:
        return etree.XPath(expr, smart_strings=False)
    except etree.XPathSyntaxError as exc:
        raise errors.UsageError(f"invalid XPath {expr!r}: {exc}.") from exc


def matches(xpath: etree.XPath, doc: etree._Element) -> bool:
    try:
        result = xpath(doc)
    except etree.XPathEvalError as exc:
        raise errors.UsageError(f"the XPath cannot be evaluated: {exc}.") from exc
    if isinstance(result, list):
        return bool(result)
    return bool(result)


def parse(xml: bytes) -> etree._Element:
    return etree.fromstring(xml, _PARSER)


def show_values(doc: etree._Element, keywords: Iterable[str]) -> dict[str, str]:
    """Top-level values by keyword; multi-valued attributes joined with a backslash, as in DICOM."""
    out = {}
    for kw in keywords:
        els = doc.findall(kw)
        out[kw] = "\\".join((e.text or "") for e in els)
    return out


def evaluate(candidates: Iterable[tuple[str, bytes]], xpath: etree.XPath, show: list[str],
             limit: int = 0, timeout: float = 0.0) -> Iterator[dict[str, object]]:
    """Yield {"path", "values"} for each candidate matching the compiled ``xpath``, in order."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    n = 0
    for path, xml in candidates:
        if deadline is not None and time.monotonic() > deadline:
            raise errors.QueryTimeout(f"the query ran past its {timeout:g} s limit; narrow the path or the expression.")
        doc = parse(xml)
        if matches(xpath, doc):
            yield {"path": path, "values": show_values(doc, show) if show else {}}
            n += 1
            if limit and n >= limit:
                return
