"""The query planner: from an XPath syntax tree to SQL over the header index.

A plan is a set of candidate files, as SQL selecting inode numbers (or "every file"), and a flag
``exact``: when true the SQL selects exactly the files the expression matches and no header needs
parsing; when false the set is a superset and lxml evaluates the expression on each candidate.
Anything the planner does not understand becomes "every file, inexact", so the result is always
the one a brute-force evaluation gives; the planner only decides how much of the work is SQL.

Indexed shapes (for paths of child steps, ``*`` and ``//`` under the root, no predicates inside):
  path = 'text'  path != 'text'  path = number  path != number  path <,<=,>,>= literal
  contains(path, 'text')  starts-with(path, 'text')  path (existence)  boolean(path)
  true()  false()  and  or  not(...)
and location paths with predicates such as ``//ProcedureCodeSequence/Item[CodeValue='X']``.  At
the root every combination stays exact; inside a sequence item ``and`` and ``not`` become
candidate filters (they must hold within one item, which lxml then checks).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.visitors import replacement_traverse

from metaserver import xpath
from metaserver.index import (
    LAST_SET,
    LONG_MARK,
    MAX_TEXT,
    ROOT_KEY,
    comparable,
    keys_t,
    levels_t,
    sample_t,
    values_t,
    xpath_number,
)

_FLIP = {"=": "=", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_RELATIONAL = ("<", "<=", ">", ">=")
_ROOT_RE = re.escape(ROOT_KEY)


@dataclass(frozen=True)
class Leaf:
    """Index rows of some keys meeting a condition (written against ``values_t``)."""

    ids: tuple[int, ...]
    cond: Any = None
    by_text: bool = False       # cond is text = literal: a probe is one primary-key lookup
    #: The literals of ``cond`` when it is text = one of them (a union of such leaves on the
    #: same paths becomes one leaf: a list of UIDs is one IN, not a UNION of one plan each).
    texts: tuple[str, ...] = ()

    def where(self, t: Any) -> list[Any]:
        key = t.c.key.in_(self.ids) if len(self.ids) > 1 else t.c.key == self.ids[0]
        if self.cond is None:
            return [key]
        if t is values_t:
            return [key, self.cond]

        def column(element: Any, **_: Any) -> Any:
            """values_t's columns by name in ``t`` (an alias of it or of sample_t)."""
            return t.c[element.name] if isinstance(element, sa.Column) and element.table is values_t else None
        opts: dict[str, Any] = {}
        return [key, replacement_traverse(self.cond, opts, column)]


@dataclass(frozen=True)
class Sub:
    """A nested plan (``union`` of several, or one plan negated as a whole)."""

    plans: tuple[QueryPlan, ...]


#: Selects per SQL UNION (SQLite's SQLITE_MAX_COMPOUND_SELECT is 500).
UNION_TERMS = 256


def _alternatives(plan: QueryPlan) -> tuple[QueryPlan, ...]:
    """The plans a union of ``plan`` with another consists of: its own alternatives when it is
    already a union, else itself."""
    if plan.terms is not None and len(plan.terms) == 1:
        term, negated = plan.terms[0]
        if isinstance(term, Sub) and len(term.plans) > 1 and not negated:
            return term.plans
    return (plan,)


@dataclass(frozen=True)
class Corr:
    """Leaves that must hold within one sequence item: rows joined on (ino, item)."""

    terms: tuple[tuple[Leaf, bool], ...]


Term = tuple[Leaf | Sub | Corr, bool]          # (term, negated)


@dataclass(frozen=True)
class QueryPlan:
    """Candidate files: a conjunction of terms (None: every indexed file; ``empty``: none, which
    is always exact).  ``exact``: the SQL alone decides, no header needs parsing."""

    terms: tuple[Term, ...] | None = None
    exact: bool = True
    empty: bool = False
    per_item: bool = False      # terms are leaves that hold within one sequence item (see Corr)


ALL = QueryPlan()
NONE = QueryPlan(empty=True)


def _inexact() -> QueryPlan:
    return QueryPlan(exact=False)


#: Resolved path patterns a catalogue keeps.
RESOLVED_KEPT = 4096


@dataclass
class Catalogue:
    """The indexed element paths: path -> (id, has_long), and the ids of paths some header has
    more than one value at."""

    keys: dict[str, tuple[int, bool]]
    multi: frozenset[int] = frozenset()
    #: Patterns resolved already (a list of 128 UIDs names one path 128 times), at most
    #: RESOLVED_KEPT; the catalogue is replaced, not changed, when paths are added.
    resolved: dict[str, list[tuple[str, int, bool]]] = field(default_factory=dict, repr=False, compare=False)

    def resolve(self, pattern: str) -> list[tuple[str, int, bool]]:
        found = self.resolved.get(pattern)
        if found is None:
            rx = re.compile(pattern)
            found = [(k, i, long) for k, (i, long) in self.keys.items() if rx.fullmatch(k)]
            if len(self.resolved) >= RESOLVED_KEPT:
                self.resolved.clear()
            self.resolved[pattern] = found
        return list(found)


@dataclass
class Planner:
    expr: str
    catalogue: Catalogue
    dialect: str                          # "sqlite" or "postgresql"
    estimate: Callable[[Any], int] | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)
    #: What drivers read: values_t, or sample_t while a nested term is rendered to be estimated.
    rows: Any = field(default=values_t, repr=False)

    # -- entry ----------------------------------------------------------------------------

    def plan(self, node: xpath.Node) -> QueryPlan:
        """QueryPlan the top-level expression; its context node is the DicomHeader element."""
        return self.boolean(node, _ROOT_RE, single=True)

    def note(self, node: xpath.Node, how: str) -> None:
        self.notes.append((xpath.text(self.expr, node), how))

    # -- boolean expressions in a context -------------------------------------------------

    def boolean(self, node: xpath.Node, ctx: str, single: bool) -> QueryPlan:
        """Files where some context node (matching regex ``ctx``) makes ``node`` true.

        ``single``: the context is the root element, one node per file, so conjunction and
        negation of exact plans stay exact."""
        if isinstance(node, xpath.Binary) and node.op in ("and", "or"):
            left = self.boolean(node.left, ctx, single)
            right = self.boolean(node.right, ctx, single)
            if node.op == "or":
                return self.union(self.file_level(left), self.file_level(right))
            if left.per_item and right.per_item:
                # Both sides test children of the same item: correlate on (ino, item).
                return QueryPlan(left.terms + right.terms, left.exact and right.exact,  # type: ignore[operator]
                            per_item=True)
            plan = self.intersect(self.file_level(left), self.file_level(right))
            return plan if single or plan.empty else replace(plan, exact=False)
        if isinstance(node, xpath.Binary) and node.op in _FLIP:
            return self.comparison(node, ctx, single)
        if isinstance(node, xpath.Path):
            return self.path(node, ctx)
        if isinstance(node, xpath.Call):
            return self.call(node, ctx, single)
        self.note(node, "not indexed: evaluated on each candidate")
        return _inexact()

    def call(self, node: xpath.Call, ctx: str, single: bool) -> QueryPlan:
        if node.name == "true" and not node.args:
            return QueryPlan()
        if node.name == "false" and not node.args:
            return NONE
        if node.name == "boolean" and len(node.args) == 1 and isinstance(node.args[0], xpath.Path):
            return self.path(node.args[0], ctx)
        if node.name == "not" and len(node.args) == 1:
            inner = self.boolean(node.args[0], ctx, single)
            if inner.per_item and inner.exact and inner.terms is not None and len(inner.terms) == 1:
                term, negated = inner.terms[0]
                return QueryPlan(((term, not negated),), per_item=True)   # NOT EXISTS in the same item
            if not single or not inner.exact:
                return _inexact()
            if inner.empty:
                return QueryPlan()
            if inner.terms is None:
                return NONE
            if len(inner.terms) == 1:
                term, negated = inner.terms[0]
                return QueryPlan(((term, not negated),))
            return QueryPlan(((Sub((inner,)), True),))
        if node.name in ("contains", "starts-with") and len(node.args) == 2:
            return self.substring(node, ctx, single)
        self.note(node, "not indexed: evaluated on each candidate")
        return _inexact()

    # -- location paths -------------------------------------------------------------------

    def steps_regex(self, steps: Iterable[xpath.Step]) -> str | None:
        out = ""
        for step in steps:
            if step.axis == "child" and step.test == "*":
                out += "/[^/]+"
            elif step.axis == "child" and not step.test.endswith(("()", ":*")) and ":" not in step.test:
                out += "/" + re.escape(step.test)
            elif step.axis == "descendant-or-self" and step.test == "node()" and not step.preds:
                out += "(?:/[^/]+)*"
            elif step.axis == "self" and step.test == "node()" and not step.preds:
                pass
            else:
                return None
        return out

    def path(self, node: xpath.Path, ctx: str) -> QueryPlan:
        """Files where the location path selects at least one node."""
        if node.start is not None:
            self.note(node, "not indexed: evaluated on each candidate")
            return _inexact()
        base = "" if node.absolute else ctx
        regex = base
        plans: list[QueryPlan] = []
        preds_total = sum(len(s.preds) for s in node.steps)
        for i, step in enumerate(node.steps):
            ext = self.steps_regex([Step_without_preds(step)])
            if ext is None:
                self.note(node, "not indexed: evaluated on each candidate")
                return _inexact()
            regex += ext
            for pred in step.preds:
                single = regex == _ROOT_RE
                last = i == len(node.steps) - 1
                if _positional(pred):
                    self.note(pred, "not indexed (position): evaluated on each candidate")
                    plans.append(_inexact())
                    continue
                plan = self.file_level(self.boolean(pred, regex, single))
                if not single and not plan.empty and not (last and preds_total == 1):
                    plan = replace(plan, exact=False)
                plans.append(plan)
        if not node.steps:                       # "/": lxml returns no node for the document
            return _inexact()
        keys = self.catalogue.resolve(regex)
        if not keys:
            self.note(node, "index: no header has this path")
            return NONE
        self.note(node, f"index: existence of {len(keys)} path(s)")
        if regex == _ROOT_RE:
            result = QueryPlan()
        else:
            result = QueryPlan(((Leaf(tuple(k for _, k, _ in keys)), False),),
                          per_item=not plans and _item_child(ctx, node))
        for plan in plans:
            result = self.intersect(result, plan)
        return result

    # -- comparisons ----------------------------------------------------------------------

    def operand_keys(self, node: xpath.Node, ctx: str) -> tuple[list[tuple[str, int, bool]], bool] | None:
        """The index keys a relative path operand selects, and whether ignoring its predicates
        kept the plan exact; None when the operand is not such a path or not comparable."""
        if not isinstance(node, xpath.Path) or node.start is not None:
            return None
        regex = self.steps_regex([Step_without_preds(s) for s in node.steps])
        if regex is None or not node.steps:
            return None
        keys = self.catalogue.resolve(("" if node.absolute else ctx) + regex)
        if not all(comparable(k.rsplit("/", 1)[-1]) for k, _, _ in keys):
            return None
        return keys, not any(s.preds for s in node.steps)

    def comparison(self, node: xpath.Binary, ctx: str, single: bool) -> QueryPlan:
        op, left, right = node.op, node.left, node.right
        if _literal(left) is not None and _literal(right) is None:
            op, left, right = _FLIP[op], right, left
        lit = _literal(right)
        found = self.operand_keys(left, ctx) if lit is not None else None
        if found is None or lit is None:
            self.note(node, "not indexed: evaluated on each candidate")
            return _inexact()
        keys, exact = found
        if not keys:
            self.note(node, "index: no header has this path")
            return NONE
        ids = [k for _, k, _ in keys]
        has_long = any(long for _, _, long in keys)
        text, num = values_t.c.text, values_t.c.num
        value = lit[0]
        cond: Any
        if op in _RELATIONAL:
            bound = xpath_number(value) if isinstance(value, str) else value
            if bound is None or math.isnan(bound):
                self.note(node, "index: the literal is not a number, so nothing compares")
                return NONE
            cond = {"<": num < bound, "<=": num <= bound, ">": num > bound, ">=": num >= bound}[op]
        elif isinstance(value, float):
            cond = num == value if op == "=" else sa.or_(num.is_(None), num != value)
        else:
            if LONG_MARK in value:
                self.note(node, "not indexed: evaluated on each candidate")
                return _inexact()
            if has_long and len(value) >= MAX_TEXT:
                exact = False                    # long values are indexed by their prefix
                cond = _prefix(text, value[:MAX_TEXT]) if op == "=" else None
            else:
                cond = text == value if op == "=" else text != value
        self.note(node, f"index: {len(keys)} path(s)")
        equal = op == "=" and isinstance(value, str)
        whole = equal and not (has_long and len(str(value)) >= MAX_TEXT)   # text = the value itself
        leaf = Leaf(tuple(ids), cond, by_text=equal, texts=(str(value),) if whole else ())
        return QueryPlan(((leaf, False),), exact, per_item=_item_child(ctx, left))

    def substring(self, node: xpath.Call, ctx: str, single: bool) -> QueryPlan:
        """contains(path, 'lit') and starts-with(path, 'lit'): on string(path), the first node."""
        lit = _literal(node.args[1])
        found = self.operand_keys(node.args[0], ctx)
        if found is None or lit is None or not isinstance(lit[0], str):
            self.note(node, "not indexed: evaluated on each candidate")
            return _inexact()
        value = lit[0]
        if value == "":
            return QueryPlan()                       # every string contains and starts with ''
        keys, exact = found
        if not keys:
            self.note(node, "index: no header has this path")
            return NONE
        text = values_t.c.text
        cond: Any
        if node.name == "contains":
            cond = (sa.func.instr(text, value) if self.dialect == "sqlite" else sa.func.strpos(text, value)) > 0
        else:
            cond = _prefix(text, value)
        if any(long for _, _, long in keys) or LONG_MARK in value:
            exact, cond = False, None
        elif single and len(keys) == 1:
            cond = sa.and_(values_t.c.first.is_(True), cond)
        else:
            exact = False                        # string() reads the first node per context
        self.note(node, f"index: {len(keys)} path(s)")
        return QueryPlan(((Leaf(tuple(k for _, k, _ in keys), cond), False),), exact)

    # -- SQL ------------------------------------------------------------------------------

    def file_level(self, plan: QueryPlan) -> QueryPlan:
        """A per-item plan as a set of files: one leaf is itself; several are one Corr term; a
        plan with only negated leaves cannot be checked per item in SQL (lxml does it)."""
        if not plan.per_item or plan.terms is None:
            return plan
        if all(negated for _, negated in plan.terms):
            return _inexact()
        if len(plan.terms) == 1:
            return QueryPlan(plan.terms, plan.exact)
        leaves = tuple((t, n) for t, n in plan.terms if isinstance(t, Leaf))
        return QueryPlan(((Corr(leaves), False),), plan.exact)

    def intersect(self, a: QueryPlan, b: QueryPlan) -> QueryPlan:
        if a.empty or b.empty:
            return NONE
        exact = a.exact and b.exact
        if a.terms is None:
            return QueryPlan(b.terms, exact)
        if b.terms is None:
            return QueryPlan(a.terms, exact)
        return QueryPlan(a.terms + b.terms, exact)

    def union(self, a: QueryPlan, b: QueryPlan) -> QueryPlan:
        if a.empty:
            return b
        if b.empty:
            return a
        if a.terms is None or b.terms is None:
            return QueryPlan(None, a.terms is None and a.exact or b.terms is None and b.exact)
        alternatives = _alternatives(a) + _alternatives(b)
        leaves = [t for p in alternatives if p.terms is not None and len(p.terms) == 1 and not p.per_item
                  for t, negated in p.terms if isinstance(t, Leaf) and t.texts and not negated]
        if len(leaves) == len(alternatives) and all(t.ids == leaves[0].ids for t in leaves):
            # Equalities on the same paths (a list of UIDs): one leaf, text IN (...).
            texts = tuple(dict.fromkeys(t for leaf in leaves for t in leaf.texts))
            # One expanding parameter: built in constant time as each 'or' of a chain adds one.
            merged = Leaf(leaves[0].ids, values_t.c.text.in_(sa.bindparam(None, list(texts), expanding=True)),
                          by_text=True, texts=texts)
            return QueryPlan(((merged, False),), a.exact and b.exact)
        # A chain of 'or' becomes one union of n plans, not n nested unions: rendering and
        # estimating recurse once per nesting level.
        return QueryPlan(((Sub(alternatives), False),), a.exact and b.exact)

    # -- rendering ------------------------------------------------------------------------

    def render(self, plan: QueryPlan) -> Any:
        """SQL selecting the distinct inode numbers of ``plan`` (None: every indexed file).

        A conjunction is driven by its most selective positive term (by a capped row count);
        the other terms are checked per driver row: index rows by a correlated (NOT) EXISTS on the
        primary key, nested plans by (NOT) IN.  That costs one probe per candidate instead of
        materialising every term, which matters when one term (Modality='MR') is huge."""
        if plan.terms is None:
            return None
        terms = self.merge_single_valued(plan.terms)
        positive = [t for t, negated in terms if not negated]
        # Estimated only where there is a choice: a list of 64 UIDs is 64 one-term plans.
        driver = min(positive, key=self.estimate_term) if len(positive) > 1 else \
            positive[0] if positive else None
        # Negated checks last.  (Ordering the probes by selectivity was measured slower: a text
        # probe is one primary-key lookup, a range probe a walk of the file's index rows.)
        terms = tuple(sorted(terms, key=lambda tn: tn[1]))
        if isinstance(driver, Leaf):
            d = self.rows.alias("d")
            query = sa.select(d.c.ino).where(*driver.where(d), *self.sampled(d))
            ino = d.c.ino
        elif driver is not None:
            sub = self.render_sub(driver).subquery("d")
            query, ino = sa.select(sub.c.ino), sub.c.ino
        else:
            query, ino = sa.select(levels_t.c.ino), levels_t.c.ino
        skipped = False
        for term, negated in terms:
            if term is driver and not negated and not skipped:
                skipped = True
                continue
            test: Any
            if isinstance(term, Leaf):
                test = self.probe(term, lambda v: [v.c.ino == ino])
            else:
                test = ino.in_(self.render_sub(term))
            query = query.where(~test if negated else test)
        return query.distinct()

    def merge_single_valued(self, terms: tuple[Term, ...]) -> tuple[Term, ...]:
        """Positive leaves on the same paths, none of which ever holds two values in a header,
        test the same node: ``StudyDate >= A and StudyDate <= B`` becomes one range."""
        merged: dict[tuple[int, ...], Leaf] = {}
        out: list[Term] = []
        for term, negated in terms:
            if (isinstance(term, Leaf) and not negated and term.cond is not None
                    and not any(i in self.catalogue.multi for i in term.ids)):
                prior = merged.get(term.ids)
                merged[term.ids] = term if prior is None else Leaf(
                    term.ids, sa.and_(prior.cond, term.cond), prior.by_text or term.by_text)
                continue
            out.append((term, negated))
        return tuple((leaf, False) for leaf in merged.values()) + tuple(out)

    def render_sub(self, sub: Sub | Corr) -> Any:
        if isinstance(sub, Corr):
            return self.render_corr(sub)
        if len(sub.plans) == 1:
            return self.render(sub.plans[0])
        selects = [self.render(p) for p in sub.plans]
        # SQLite cannot nest compound selects bare, and allows 500 terms in one.
        while len(selects) > 1:
            selects = [sa.select(sa.union(*selects[i:i + UNION_TERMS]).subquery().c.ino)
                       if len(selects[i:i + UNION_TERMS]) > 1 else selects[i]
                       for i in range(0, len(selects), UNION_TERMS)]
        return selects[0]

    def render_corr(self, corr: Corr) -> Any:
        """Files with one item in which every positive leaf holds and no negated one does."""
        positive = [t for t, negated in corr.terms if not negated]
        driver = min(positive, key=self.estimate_term)
        d = self.rows.alias("i")
        query = sa.select(d.c.ino).where(*driver.where(d), *self.sampled(d))
        for term, negated in corr.terms:
            if term is driver and not negated:
                continue
            test = self.probe(term, lambda v: [v.c.ino == d.c.ino, v.c.item == d.c.item])
            query = query.where(~test if negated else test)
        return query.distinct()

    def probe(self, leaf: Leaf, join: Callable[[Any], list[Any]]) -> Any:
        """EXISTS a row of ``leaf`` joined to the driver row, looked up by (ino, key).  On SQLite
        the key test is written ``key + 0`` so that, lacking statistics, it cannot prefer an index
        that starts with the key (it scanned a whole numeric range once per probe)."""
        v = values_t.alias()
        where = leaf.where(v)
        if self.dialect == "sqlite" and not leaf.by_text:
            ids = leaf.ids
            where[0] = (v.c.key + 0).in_(ids) if len(ids) > 1 else (v.c.key + 0) == ids[0]
        return sa.exists(sa.select(sa.literal(1)).where(*join(v), *where))

    def estimate_term(self, term: Leaf | Sub | Corr) -> int:
        """Rows a term selects, counted up to a cap (the cheapest driver wins)."""
        if self.estimate is None:
            return 1 if isinstance(term, Leaf) and term.cond is not None else 2
        if isinstance(term, Leaf):
            v = sample_t.alias()
            return self.estimate(sa.select(v.c.ino).where(*term.where(v), *self.sampled(v)))
        prior, self.rows = self.rows, sample_t
        try:
            select = self.render_sub(term)
        finally:
            self.rows = prior
        return self.estimate(select)

    @staticmethod
    def sampled(rows: Any) -> list[Any]:
        """An estimate's rows (sample_t) stop at the sample's last series set: sets are made in
        about the order of their files, and a common value ('CT') would otherwise be read for
        every set in the archive only for the members past the sample to be dropped."""
        return [rows.c.set_id <= LAST_SET] if "set_id" in rows.c else []


def Step_without_preds(step: xpath.Step) -> xpath.Step:  # noqa: N802 - reads as a constructor
    return xpath.Step(step.axis, step.test)


def _item_child(ctx: str, operand: xpath.Node) -> bool:
    """Whether ``operand`` names a direct child of a sequence item context (rows of the same
    item then share the item number, so conjunctions can be checked per item)."""
    return (ctx.endswith("/Item") and isinstance(operand, xpath.Path) and not operand.absolute
            and operand.start is None and len(operand.steps) == 1 and operand.steps[0].axis == "child"
            and not operand.steps[0].preds and operand.steps[0].test not in ("*", "Item")
            and not operand.steps[0].test.endswith("()"))


def _literal(node: xpath.Node) -> tuple[str | float] | None:
    if isinstance(node, xpath.Literal):
        return (node.value,)
    if isinstance(node, xpath.Number):
        return (node.value,)
    if isinstance(node, xpath.Neg) and isinstance(node.operand, xpath.Number):
        return (-node.operand.value,)
    return None


def _positional(pred: xpath.Node) -> bool:
    """A predicate whose value may be a number tests position; only boolean shapes are planned."""
    if isinstance(pred, xpath.Binary):
        return pred.op not in ("and", "or", "=", "!=", "<", "<=", ">", ">=")
    if isinstance(pred, xpath.Call):
        return pred.name not in ("not", "true", "false", "boolean", "contains", "starts-with")
    return not isinstance(pred, xpath.Path)


def _prefix(text: Any, value: str) -> Any:
    """``text`` starts with ``value``, as a range the primary key can seek (binary collation)."""
    last = ord(value[-1])
    if last >= 0x10FFFF:
        return sa.func.substr(text, 1, len(value)) == value
    nxt = last + 1 if not 0xD7FF <= last < 0xE000 else 0xE000
    return sa.and_(text >= value, text < value[:-1] + chr(nxt))


def load_catalogue(conn: Any) -> Catalogue:
    rows = conn.execute(sa.select(keys_t.c.id, keys_t.c.path, keys_t.c.has_long, keys_t.c.multi)).all()
    return Catalogue({r.path: (r.id, bool(r.has_long)) for r in rows}, frozenset(r.id for r in rows if r.multi))
