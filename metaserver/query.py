"""XPath cohort queries over the XML headers.

Full XPath 1.0 semantics, as lxml evaluates them: a file matches when the expression is true or
selects a non-empty node-set, its context node being the ``DicomHeader`` element.  The planner
(``planner.py``) turns what it can into SQL over the header index; lxml checks the candidates of
any part it could not, so results always equal a brute-force evaluation of every header.
"""

from __future__ import annotations

import atexit
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Iterator

from lxml import etree

from dgf import errors
from dgf.dicom.pipeline import _recv, _send
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


#: Candidates evaluated in this process before a scan fans out to one worker per core.
SERIAL_CANDIDATES = 4000
CHUNK = 500
IN_FLIGHT = 8


class _Evaluators:
    """Worker processes (``python -c``, so no main module is re-imported) that evaluate chunks
    of headers; results come back in task order.  One scan uses them at a time."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "from metaserver.query import serve; serve()"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(n)]
        self.lock = threading.Lock()
        atexit.register(self.close)

    def imap(self, tasks: Iterator[Any], slots: threading.Semaphore) -> Iterator[Any]:
        order: queue.SimpleQueue[int | BaseException | None] = queue.SimpleQueue()

        def feed() -> None:
            try:
                for i, task in enumerate(tasks):
                    w = i % len(self.procs)
                    _send(self.procs[w].stdin, task)  # type: ignore[arg-type]
                    order.put(w)
                order.put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the reading side
                order.put(exc)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        while True:
            w = order.get()
            if w is None:
                return
            if isinstance(w, BaseException):
                raise w
            result = _recv(self.procs[w].stdout)  # type: ignore[arg-type]
            slots.release()
            if isinstance(result, BaseException):
                raise result
            yield result

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


_compiled: dict[str, etree.XPath] = {}


def _check(compiled: etree.XPath, exact: bool, show: list[str], xml: bytes | None) -> dict[str, str] | None:
    """One candidate: its show values if the expression matches (or the plan was exact), else None."""
    doc = etree.fromstring(xml, _PARSER) if xml is not None else None
    if doc is not None and not exact and not matches(compiled, doc):
        return None
    return show_values(doc, show) if show and doc is not None else {}


def _evaluate_chunk(task: tuple[str, list[str], list[bytes | None], bool]) -> list[dict[str, str] | None]:
    """A chunk of candidates, in a worker process (or here when the workers are busy)."""
    expr, show, xmls, exact = task
    compiled = _compiled.get(expr)
    if compiled is None:
        compiled = _compiled[expr] = etree.XPath(expr, smart_strings=False)
    return [_check(compiled, exact, show, xml) for xml in xmls]


_evaluators: _Evaluators | None = None
_evaluators_lock = threading.Lock()


def _workers() -> _Evaluators | None:
    """The evaluator pool if no other scan holds it (then this scan runs in-process)."""
    global _evaluators
    with _evaluators_lock:
        if _evaluators is None:
            _evaluators = _Evaluators(max(2, os.cpu_count() or 2))
        return _evaluators if _evaluators.lock.acquire(blocking=False) else None


def serve() -> None:
    """Worker loop: evaluate chunks read from stdin, answer on stdout."""
    rfile, wfile = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            task = _recv(rfile)
        except EOFError:
            return
        try:
            result: object = _evaluate_chunk(task)  # type: ignore[arg-type]
        except errors.DgfError as exc:
            result = exc
        except Exception as exc:  # noqa: BLE001 - returned to the parent, which raises it
            result = errors.ServerError(f"a query worker failed ({type(exc).__name__}).")
        _send(wfile, result)


def _evaluated(engine: Any, q: Query, root: str, show: list[str], deadline: float | None
               ) -> Iterator[tuple[str, tuple[str, str, str], dict[str, str]]]:
    """(path, levels, show values) of each match, in candidate order.  The first candidates are
    checked here; a long scan continues in worker processes, chunk by chunk, in order."""
    need_xml = not q.plan.exact or bool(show)
    rows = engine.query_candidates(root, q.sql, need_xml, deadline)
    for i, (path, levels, xml) in enumerate(rows):
        values = _check(q.compiled, q.plan.exact, show, xml)
        if values is not None:
            yield path, levels, values
        if i + 1 >= SERIAL_CANDIDATES and need_xml:
            break                                # matching or not: the rest goes to the workers
    else:
        return
    meta: queue.SimpleQueue[list[tuple[str, tuple[str, str, str]]]] = queue.SimpleQueue()
    # The pool reads tasks as fast as it can: a few chunks in flight bound memory, and a stop
    # flag ends the database read when the consumer goes away (limit reached, client gone).
    slots = threading.Semaphore(IN_FLIGHT)
    stop = threading.Event()

    def chunks() -> Iterator[tuple[str, list[str], list[bytes | None], bool]]:
        batch: list[tuple[str, tuple[str, str, str], bytes | None]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= CHUNK:
                while not slots.acquire(timeout=0.5):
                    if stop.is_set():
                        return
                meta.put([(p, lv) for p, lv, _ in batch])
                yield q.expr, show, [x for _, _, x in batch], q.plan.exact
                batch = []
            if stop.is_set():
                return
        if batch:
            meta.put([(p, lv) for p, lv, _ in batch])
            yield q.expr, show, [x for _, _, x in batch], q.plan.exact

    pool = _workers()
    if pool is None:                             # another scan has the workers: go on here
        for chunk in chunks():
            slots.release()
            for (path, levels), v in zip(meta.get(), _evaluate_chunk(chunk)):
                if v is not None:
                    yield path, levels, v
        return
    try:
        for values in pool.imap(chunks(), slots):
            for (path, levels), v in zip(meta.get(), values):
                if v is not None:
                    yield path, levels, v
            if deadline is not None and time.monotonic() > deadline:
                raise errors.QueryTimeout("the query ran past its time limit; narrow the expression or the path.")
    finally:
        stop.set()
        pool.lock.release()


def run(engine: Any, q: Query, root: str, show: list[str], limit: int = 0,
        deadline: float | None = None, level: str = "instance") -> Generator[dict[str, Any], None, None]:
    """Stream the matches: {"path", "values"} per file, or per group with ``level``."""
    if q.plan.empty:
        return
    grouping = LEVELS.get(level)
    groups: dict[str, dict[str, Any]] = {}
    n = 0
    for path, levels, values in _evaluated(engine, q, root, show, deadline):
        if deadline is not None and time.monotonic() > deadline:
            raise errors.QueryTimeout("the query ran past its time limit; narrow the expression or the path.")
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
