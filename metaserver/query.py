"""XPath cohort queries over the XML headers.

Full XPath 1.0 semantics, as lxml evaluates them: a file matches when the expression is true or
selects a non-empty node-set, its context node being the ``DicomHeader`` element.  The planner
(``planner.py``) turns what it can into SQL over the header index; lxml checks the candidates of
any part it could not, so results always equal a brute-force evaluation of every header.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable

from lxml import etree

from dgf import errors
from metaserver import xpath
from metaserver.index import HEADER_XATTR
from metaserver.planner import Plan, Planner

__all__ = ["HEADER_XATTR", "LEVELS", "Query", "prepare", "run"]

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)
#: --level: the header keyword that names a group, and its position in the index's level tuple.
LEVELS = {"patient": ("PatientID", 0), "study": ("StudyInstanceUID", 1), "series": ("SeriesInstanceUID", 2)}


@dataclass(frozen=True)
class Query:
    expr: str
    compiled: etree.XPath
    plan: Plan
    sql: Any                                     # the plan as SQL (None: every indexed file)
    notes: list[tuple[str, str]]

    def explain(self) -> dict[str, Any]:
        how = ("index only" if self.plan.exact else
               "scan of every header" if self.sql is None and not self.plan.empty else
               "index, then XPath on each candidate")
        return {"strategy": "nothing can match" if self.plan.empty else how,
                "predicates": [{"expression": e, "how": h} for e, h in self.notes]}


def compile_xpath(expr: str) -> tuple[etree.XPath, xpath.Node | None]:
    """lxml's compiled expression and our syntax tree, or a one-line error with the position."""
    if not expr.strip():
        raise errors.UsageError("the XPath expression is empty; try /DicomHeader[Modality='CT'].")
    tree: xpath.Node | None = None
    try:
        tree = xpath.parse(expr)
    except errors.UsageError as ours:
        try:
            etree.XPath(expr)
        except etree.XPathSyntaxError:
            raise ours from None                 # both agree: ours says where
        # lxml accepts more (its extensions): no plan, every header is evaluated
    try:
        return etree.XPath(expr, smart_strings=False), tree
    except etree.XPathSyntaxError as exc:
        raise errors.UsageError(f"invalid XPath {expr!r}: {exc}.") from exc


def prepare(expr: str, catalogue: Any, dialect: str, estimate: Callable[[Any], int] | None = None) -> Query:
    """Compile and plan ``expr``; ``estimate`` counts a candidate select's rows (capped) so the
    most selective predicate drives the SQL."""
    compiled, tree = compile_xpath(expr)
    planner = Planner(expr, catalogue, dialect, estimate)
    plan = planner.plan(tree) if tree is not None else Plan(exact=False)
    sql = None if plan.empty else planner.render(plan)
    return Query(expr, compiled, plan, sql, planner.notes)


def matches(compiled: etree.XPath, doc: etree._Element) -> bool:
    try:
        return bool(compiled(doc))
    except etree.XPathEvalError as exc:
        raise errors.UsageError(f"the XPath cannot be evaluated: {exc}.") from exc


def show_values(doc: etree._Element, keywords: Iterable[str]) -> dict[str, str]:
    """Top-level values by keyword; multi-valued attributes joined with a backslash, as in DICOM."""
    return {kw: "\\".join((e.text or "") for e in doc.findall(kw)) for kw in keywords}


def run(engine: Any, q: Query, root: str, show: list[str], limit: int = 0,
        deadline: float | None = None, level: str = "instance") -> Generator[dict[str, Any], None, None]:
    """Stream the matches: {"path", "values"} per file, or per group with ``level``."""
    if q.plan.empty:
        return
    need_xml = not q.plan.exact or bool(show)
    grouping = LEVELS.get(level)
    groups: dict[str, dict[str, Any]] = {}
    n = 0
    for path, levels, xml in engine.query_candidates(root, q.sql, need_xml, deadline):
        if deadline is not None and time.monotonic() > deadline:
            raise errors.QueryTimeout("the query ran past its time limit; narrow the expression or the path.")
        doc = etree.fromstring(xml, _PARSER) if xml is not None else None
        if doc is not None and not q.plan.exact and not matches(q.compiled, doc):
            continue
        values = show_values(doc, show) if show and doc is not None else {}
        if grouping is None:
            yield {"path": path, "values": values}
            n += 1
            if limit and n >= limit:
                return
            continue
        key = levels[grouping[1]]
        group = groups.get(key)
        if group is None:
            if limit and len(groups) >= limit:
                continue
            groups[key] = {grouping[0]: key, "files": 1, "path": path.rsplit("/", 1)[0] or "/",
                           "values": values}
        else:
            group["files"] += 1
    yield from groups.values()


def count(engine: Any, q: Query, root: str, deadline: float | None = None) -> int:
    if q.plan.empty:
        return 0
    if q.plan.exact and root == "/":
        return int(engine.query_count(q.sql))
    return sum(1 for _ in run(engine, q, root, [], 0, deadline))
