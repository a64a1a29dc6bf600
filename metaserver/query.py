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
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from lxml import etree

from dgf import errors, workers
from dgf.limits import DEFAULT as DEFAULT_LIMITS
from dgf.limits import Limits
from metaserver import advice, xpath
from metaserver.index import HEADER_XATTR
from metaserver.planner import Planner, QueryPlan

__all__ = ["HEADER_XATTR", "LEVELS", "Page", "Query", "page", "prepare", "run"]

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)
#: --level: the header keyword that names a group, and its position in the index's level tuple.
LEVELS = {"patient": ("PatientID", 0), "study": ("StudyInstanceUID", 1), "series": ("SeriesInstanceUID", 2)}


@dataclass(frozen=True)
class Query:
    expr: str
    compiled: etree.XPath
    plan: QueryPlan
    sql: Any                                     # the plan as SQL (None: every indexed file)
    notes: list[tuple[str, str]]
    #: What the user should hear about the expression (metaserver/advice.py), one sentence each.
    warnings: tuple[str, ...] = ()

    def explain(self) -> dict[str, Any]:
        how = ("index only" if self.plan.exact else
               "scan of every header" if self.sql is None and not self.plan.empty else
               "index, then XPath on each candidate")
        return {"strategy": "nothing can match" if self.plan.empty else how,
                "predicates": [{"expression": e, "how": h} for e, h in self.notes]}


def check_bounds(expr: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse an expression past the size, nesting or operator limits before anything parses it
    (5000 nested parentheses or an 8000-way 'or' would exhaust the recursive descent)."""
    if len(expr) > limits.xpath_chars:
        raise limits.refuse("xpath_chars", f"an XPath of {len(expr)} characters")
    depth = deepest = operators = 0
    quote = ""
    for ch in expr:                       # a plain scan: brackets inside literals do not count
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]":
            depth -= 1
    if deepest > limits.xpath_depth:
        raise limits.refuse("xpath_depth", f"an XPath nested {deepest} brackets deep")
    if len(expr) > 64:
        operators = sum(1 for t in xpath.tokens(expr) if t.kind == "operator" or t.text in _COMPARISONS)
    if operators > limits.xpath_operators:
        raise limits.refuse("xpath_operators", f"an XPath with {operators} operators")


_COMPARISONS = frozenset({"=", "!=", "<", "<=", ">", ">=", "|"})


#: What lxml refuses in an expression (ValueError, not a syntax error): control characters
#: other than tab, CR and LF, and U+FFFE/U+FFFF.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def compile_xpath(expr: str, limits: Limits = DEFAULT_LIMITS) -> tuple[etree.XPath, xpath.Node | None]:
    """lxml's compiled expression and our syntax tree, or a one-line error with the position."""
    if not expr.strip():
        raise errors.UsageError("the XPath expression is empty; try /DicomHeader[Modality='CT'].")
    unfit = _NOT_XML.search(expr)
    if unfit is not None:
        raise errors.UsageError(f"the XPath expression holds U+{ord(unfit.group()):04X} at position "
                                f"{unfit.start() + 1}, a character XML cannot carry.")
    check_bounds(expr, limits)
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


def prepare(expr: str, catalogue: Any, dialect: str, estimate: Callable[[Any], int] | None = None,
            limits: Limits = DEFAULT_LIMITS, review: bool = True) -> Query:
    """Compile and plan ``expr``; ``estimate`` counts a candidate select's rows (capped) so the
    most selective predicate drives the SQL.  ``review`` (metaserver/advice.py) refuses or
    corrects what a user cannot have meant; without it the expression is pure XPath 1.0."""
    compiled, tree = compile_xpath(expr, limits)
    warnings: tuple[str, ...] = ()
    if tree is not None and review:
        reviewed = advice.review(expr, tree, frozenset(k.rsplit("/", 1)[-1] for k in catalogue.keys))
        warnings = tuple(reviewed.warnings)
        if reviewed.expr != expr:
            expr = reviewed.expr
            compiled, tree = compile_xpath(expr, limits)
    planner = Planner(expr, catalogue, dialect, estimate)
    plan = planner.plan(tree) if tree is not None else QueryPlan(exact=False)
    sql = None if plan.empty else planner.render(plan)
    return Query(expr, compiled, plan, sql, planner.notes, warnings)


def matches(compiled: etree.XPath, doc: etree._Element) -> bool:
    try:
        return bool(compiled(doc))
    except etree.XPathEvalError as exc:
        raise errors.UsageError(f"the XPath cannot be evaluated: {exc}.") from exc


def show_values(doc: etree._Element, keywords: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Top-level values by keyword, multi-valued attributes joined with a backslash as in DICOM,
    and the VR of each present one (so clients can type them: ``--format json``, DICOM JSON)."""
    values: dict[str, str] = {}
    vrs: dict[str, str] = {}
    for kw in keywords:
        found = doc.findall(kw)
        values[kw] = "\\".join((e.text or "") for e in found)
        if found:
            vrs[kw] = found[0].get("vr") or "UN"
    return values, vrs


#: Candidates evaluated in this process before a scan fans out to one worker per core.
SERIAL_CANDIDATES = 4000
CHUNK = 500
IN_FLIGHT = 4
#: Seconds an abandoned scan may take to read back its in-flight results before the workers
#: are replaced.
DRAIN_S = 30.0


class _Evaluators:
    """Worker processes (dgf/workers.py) that evaluate chunks of headers; results come back in
    task order.  One scan uses them at a time, and a scan that stops early (a limit, a page
    boundary, a closed cursor) reads back every result still in flight before it lets the next
    scan in: otherwise the next scan would read them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()
        self.procs: list[workers.Worker] = []
        self._start()
        atexit.register(self.close)

    def _start(self) -> None:
        self.procs = [workers.Worker("metaserver.query:serve") for _ in range(self.n)]

    def restart(self) -> None:
        """Fresh workers, when draining failed (a worker died or hung)."""
        self.close()
        self._start()

    def imap(self, tasks: Iterator[Any], slots: threading.Semaphore, stop: threading.Event
             ) -> Generator[Any, None, None]:
        order: queue.SimpleQueue[int | BaseException | None] = queue.SimpleQueue()

        def feed() -> None:
            try:
                for i, task in enumerate(tasks):
                    w = i % len(self.procs)
                    self.procs[w].send(task)
                    order.put(w)
                order.put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the reading side
                order.put(exc)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        finished = False
        try:
            while True:
                w = order.get()
                if w is None:
                    finished = True
                    return
                if isinstance(w, BaseException):
                    finished = True
                    raise w
                result = self.procs[w].recv()
                slots.release()
                if isinstance(result, BaseException):
                    raise result
                yield result
        finally:
            if not finished:
                stop.set()
                self._drain(order, slots, feeder)

    def _drain(self, order: queue.SimpleQueue[int | BaseException | None], slots: threading.Semaphore,
               feeder: threading.Thread) -> None:
        """Read and drop the results of every task already sent (the feeder stops at ``stop``)."""
        deadline = time.monotonic() + DRAIN_S
        try:
            while True:
                w = order.get(timeout=max(0.01, deadline - time.monotonic()))
                if w is None or isinstance(w, BaseException):
                    break
                self.procs[w].recv()
                slots.release()
            feeder.join(timeout=max(0.01, deadline - time.monotonic()))
            if feeder.is_alive():
                raise TimeoutError("the feeder did not stop")
        except (queue.Empty, EOFError, OSError, TimeoutError):
            self.restart()

    def close(self) -> None:
        for worker in self.procs:
            worker.kill()


_compiled: dict[str, etree.XPath] = {}


Found = tuple[dict[str, str], dict[str, str]]


def _check(compiled: etree.XPath, exact: bool, show: list[str], xml: bytes | None) -> Found | None:
    """One candidate: its show values and their VRs if the expression matches (or the plan was
    exact), else None."""
    doc = etree.fromstring(xml, _PARSER) if xml is not None else None
    if doc is not None and not exact and not matches(compiled, doc):
        return None
    return show_values(doc, show) if show and doc is not None else ({}, {})


def _evaluate_chunk(task: tuple[str, list[str], list[bytes | None], bool]) -> list[Found | None]:
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
    """A query worker's loop (``_Evaluators`` starts it): evaluate chunks of headers."""
    workers.serve(_evaluate_chunk,  # type: ignore[arg-type]
                  lambda exc: errors.ServerError(f"a query worker failed ({type(exc).__name__})."))


Candidate = tuple[int, str, tuple[str, str, str], "Found | None"]


def _evaluated(engine: Any, q: Query, root: str, show: list[str], deadline: float | None,
               after: int = 0, batch: int = 2000) -> Generator[Candidate, None, None]:
    """(ino, path, levels, show values or None) of every candidate after inode ``after``, in
    inode order; None means the header did not match.  The first candidates are checked here; a
    long scan continues in worker processes, chunk by chunk, in order.  Every candidate is
    reported, so a page can end after any of them and the next page start right after it."""
    need_xml = not q.plan.exact or bool(show)
    rows = engine.query_candidates(root, q.sql, need_xml, deadline, after, batch)
    try:
        for i, (ino, path, levels, xml) in enumerate(rows):
            yield ino, path, levels, _check(q.compiled, q.plan.exact, show, xml)
            if i + 1 >= SERIAL_CANDIDATES and need_xml:
                break                                # the rest goes to the workers
        else:
            return
        yield from _fanned_out(q, show, deadline, rows)
    finally:
        rows.close()


def _fanned_out(q: Query, show: list[str], deadline: float | None,
                rows: Iterator[tuple[int, str, tuple[str, str, str], bytes | None]]
                ) -> Generator[Candidate, None, None]:
    meta: queue.SimpleQueue[list[tuple[int, str, tuple[str, str, str]]]] = queue.SimpleQueue()
    # The pool reads tasks as fast as it can: a few chunks in flight bound memory, and a stop
    # flag ends the database read when the consumer goes away (limit reached, client gone).
    slots = threading.Semaphore(IN_FLIGHT)
    stop = threading.Event()

    def chunks() -> Iterator[tuple[str, list[str], list[bytes | None], bool]]:
        batch: list[tuple[int, str, tuple[str, str, str], bytes | None]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= CHUNK:
                while not slots.acquire(timeout=0.5):
                    if stop.is_set():
                        return
                if stop.is_set():
                    slots.release()
                    return
                meta.put([(i, p, lv) for i, p, lv, _ in batch])
                yield q.expr, show, [x for _, _, _, x in batch], q.plan.exact
                batch = []
            if stop.is_set():
                return
        if batch and not stop.is_set():
            meta.put([(i, p, lv) for i, p, lv, _ in batch])
            yield q.expr, show, [x for _, _, _, x in batch], q.plan.exact

    pool = _workers()
    if pool is None:                             # another scan has the workers: go on here
        for chunk in chunks():
            slots.release()
            for (ino, path, levels), v in zip(meta.get(), _evaluate_chunk(chunk)):
                yield ino, path, levels, v
        return
    results = pool.imap(chunks(), slots, stop)
    try:
        for values in results:
            for (ino, path, levels), v in zip(meta.get(), values):
                yield ino, path, levels, v
            if deadline is not None and time.monotonic() > deadline:
                raise errors.QueryTimeout("the query ran past its time limit; narrow the expression or the path.")
    finally:
        stop.set()
        results.close()                          # drains what is still in flight
        pool.lock.release()


@dataclass
class Page:
    """One page of a scan: its rows, and the inode to resume after (None: the scan is done)."""

    rows: list[dict[str, Any]]
    after: int | None


def page(engine: Any, q: Query, root: str, show: list[str], after: int, deadline: float | None,
         max_rows: int, max_seconds: float, allowed: Callable[[str], bool] | None = None,
         with_ino: bool = False) -> Page:
    """The matches after inode ``after``: up to ``max_rows`` or ``max_seconds`` of scanning;
    ``with_ino``: each row names its inode too, for a caller that resumes a scan after it, and
    its file's (patient, study, series) as the index holds them (``levels``: read with no header).

    Keyset pagination: nothing is held between pages (no database connection, no worker), the
    next page starts from the last inode this one examined."""
    rows: list[dict[str, Any]] = []
    if q.plan.empty:
        return Page(rows, None)
    started = time.monotonic()
    # A short page (the first of a study list) fetches about what it needs, not 2000 rows.
    scan = _evaluated(engine, q, root, show, deadline, after, min(2000, max(64, max_rows + 1)))
    last = after
    try:
        for ino, path, levels, found in scan:
            last = ino
            if found is not None and (allowed is None or allowed(path)):
                row: dict[str, Any] = {"path": path, "values": found[0], "vr": found[1]}
                if with_ino:
                    row.update(ino=ino, levels=list(levels))
                rows.append(row)
            if deadline is not None and time.monotonic() > deadline:
                raise errors.QueryTimeout("the query ran past its time limit; narrow the expression or the path.")
            if len(rows) >= max_rows or time.monotonic() - started > max_seconds:
                return Page(rows, last)
        return Page(rows, None)
    finally:
        scan.close()


#: Attributes computed over a group's files, as C-FIND (PS3.4 C.3.4) and Orthanc give them:
#: name -> (the levels it is offered at, its VR).
COMPUTED = {
    "ModalitiesInStudy": (("study",), "CS"),
    "NumberOfStudyRelatedSeries": (("study",), "IS"),
    "NumberOfStudyRelatedInstances": (("study",), "IS"),
    "NumberOfSeriesRelatedInstances": (("series",), "IS"),
    "NumberOfPatientRelatedStudies": (("patient",), "IS"),
    "NumberOfPatientRelatedSeries": (("patient",), "IS"),
    "NumberOfPatientRelatedInstances": (("patient",), "IS"),
}


def check_show(show: list[str], level: str) -> None:
    for name in show:
        if name in COMPUTED and level not in COMPUTED[name][0]:
            raise errors.UsageError(f"{name} is computed per {COMPUTED[name][0][0]}; "
                                    f"add --level {COMPUTED[name][0][0]}.")


def run(engine: Any, q: Query, root: str, show: list[str], limit: int = 0,
        deadline: float | None = None, level: str = "instance",
        allowed: Callable[[str], bool] | None = None) -> Generator[dict[str, Any], None, None]:
    """Stream the matches: {"path", "values", "vr"} per file, or per group with ``level``
    (with the computed attributes of :data:`COMPUTED` that ``show`` names).  The counts are of
    the matching files, as C-FIND counts what matched; ``allowed`` (a principal's cohort
    grants) leaves out the files it refuses before anything is counted."""
    if q.plan.empty:
        return
    check_show(show, level)
    grouping = LEVELS.get(level)
    computed = [name for name in show if name in COMPUTED]
    wanted = [name for name in show if name not in COMPUTED]
    if "ModalitiesInStudy" in computed and "Modality" not in wanted:
        wanted.append("Modality")
    groups: dict[str, dict[str, Any]] = {}
    tallies: dict[str, tuple[set[str], set[str], set[str]]] = {}   # studies, series, modalities
    n = 0
    scan = _evaluated(engine, q, root, wanted if grouping else show, deadline)
    try:
        for _, path, levels, found in scan:
            if found is None or (allowed is not None and not allowed(path)):
                continue
            values, vrs = found
            if deadline is not None and time.monotonic() > deadline:
                raise errors.QueryTimeout("the query ran past its time limit; narrow the expression or the path.")
            if grouping is None:
                yield {"path": path, "values": values, "vr": vrs}
                n += 1
                if limit and n >= limit:
                    return
                continue
            key = levels[grouping[1]]
            group = groups.get(key)
            if group is None:
                if limit and len(groups) >= limit:
                    continue
                group = groups[key] = {grouping[0]: key, "files": 0, "path": path.rsplit("/", 1)[0] or "/",
                                       "values": {k: values.get(k, "") for k in show if k not in COMPUTED},
                                       "vr": {k: v for k, v in vrs.items() if k in show}}
                tallies[key] = (set(), set(), set())
            group["files"] += 1
            studies, series, modalities = tallies[key]
            studies.add(levels[1])
            series.add(levels[2])
            if "ModalitiesInStudy" in computed:
                modalities.update(m for m in values.get("Modality", "").split("\\") if m)
    finally:
        scan.close()
    for key, group in groups.items():
        studies, series, modalities = tallies[key]
        facts = {"ModalitiesInStudy": "\\".join(sorted(modalities)),
                 "NumberOfStudyRelatedSeries": str(len(series)),
                 "NumberOfStudyRelatedInstances": str(group["files"]),
                 "NumberOfSeriesRelatedInstances": str(group["files"]),
                 "NumberOfPatientRelatedStudies": str(len(studies)),
                 "NumberOfPatientRelatedSeries": str(len(series)),
                 "NumberOfPatientRelatedInstances": str(group["files"])}
        for name in computed:
            group["values"][name] = facts[name]
            group["vr"][name] = COMPUTED[name][1]
        yield group


def count(engine: Any, q: Query, root: str, deadline: float | None = None, level: str = "instance",
          allowed: Callable[[str], bool] | None = None) -> int:
    """Matching files, or with ``level`` the patients, studies or series they belong to."""
    if q.plan.empty:
        return 0
    if q.plan.exact and root == "/" and level == "instance" and allowed is None:
        return int(engine.query_count(q.sql))
    return sum(1 for _ in run(engine, q, root, [], 0, deadline, level, allowed))
