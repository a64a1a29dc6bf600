"""An XPath 1.0 parser: the syntax tree the query planner reads, and error positions for users.

lxml stays the evaluator (it defines the results); this parser exists because lxml reports a
syntax error without saying where, and because the planner needs the tree.  It follows the
grammar of XPath 1.0 section 3 with the lexical rules of section 3.7 (``*`` and ``and``/``or``/
``div``/``mod`` are operators only after something that can end an operand).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from dgf import errors


@dataclass(frozen=True)
class Literal:
    value: str
    span: tuple[int, int]


@dataclass(frozen=True)
class Number:
    value: float
    span: tuple[int, int]


@dataclass(frozen=True)
class Var:
    name: str
    span: tuple[int, int]


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Node, ...]
    span: tuple[int, int]


@dataclass(frozen=True)
class Step:
    axis: str            # "child", "attribute", "descendant-or-self", "self", "parent", ...
    test: str            # a name, "*", "prefix:*", or a node type such as "node()" / "text()"
    preds: tuple[Node, ...] = ()


@dataclass(frozen=True)
class Path:
    absolute: bool
    steps: tuple[Step, ...]
    span: tuple[int, int]
    start: Node | None = None   # a filter expression the path continues (``(a|b)/c``)


@dataclass(frozen=True)
class Binary:
    op: str              # or, and, =, !=, <, <=, >, >=, +, -, *, div, mod, |
    left: Node
    right: Node
    span: tuple[int, int]


@dataclass(frozen=True)
class Neg:
    operand: Node
    span: tuple[int, int]


@dataclass(frozen=True)
class Filter:
    primary: Node
    preds: tuple[Node, ...]
    span: tuple[int, int]


Node = Literal | Number | Var | Call | Path | Binary | Neg | Filter

AXES = frozenset({"ancestor", "ancestor-or-self", "attribute", "child", "descendant",
                  "descendant-or-self", "following", "following-sibling", "namespace", "parent",
                  "preceding", "preceding-sibling", "self"})
NODE_TYPES = frozenset({"comment", "text", "processing-instruction", "node"})
_OPERATOR_NAMES = frozenset({"and", "or", "mod", "div"})
_NOT_OPERAND_END = frozenset({"@", "::", "(", "[", ",", "$", "/", "//", "|", "+", "-", "=", "!=",
                              "<", "<=", ">", ">="})

_TOKEN = re.compile(r"""
    (?P<space>[\x20\t\r\n]+)
  | (?P<literal>"[^"]*"|'[^']*')
  | (?P<number>\d+(?:\.\d*)?|\.\d+)
  | (?P<op>//|::|\.\.|!=|<=|>=|[/()\[\].@,|+\-=<>*$])
  | (?P<name>[A-Za-z_\u00C0-\uFFFF][\w.\-\u00B7\u00C0-\uFFFF]*(?::(?:\*|[A-Za-z_\u00C0-\uFFFF][\w.\-\u00B7\u00C0-\uFFFF]*))?)
""", re.VERBOSE)


@dataclass
class _Tok:
    kind: str   # literal, number, op, name, operator (and/or/div/mod, or * as multiply), end
    text: str
    pos: int


def tokens(expr: str) -> list[_Tok]:
    """The tokens of ``expr`` (no recursion: safe on any input), for callers that bound it."""
    return _tokens(expr)


def _tokens(expr: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            what = "an unterminated string literal" if expr[pos] in "'\"" else "a character XPath does not use"
            raise _error(expr, pos, what)
        kind = m.lastgroup or ""
        text = m.group()
        if kind != "space":
            # XPath 3.7: after an operand, '*' multiplies and NCNames and/or/div/mod are operators.
            prev = out[-1] if out else None
            after_operand = prev is not None and prev.kind != "operator" and not (
                prev.kind == "op" and prev.text in _NOT_OPERAND_END)
            if after_operand and (text == "*" or kind == "name" and text in _OPERATOR_NAMES):
                kind = "operator"
            out.append(_Tok(kind, text, pos))
        pos = m.end()
    out.append(_Tok("end", "", len(expr)))
    return out


def _error(expr: str, pos: int, what: str) -> errors.UsageError:
    near = expr[pos:pos + 12] or "the end"
    return errors.UsageError(f"invalid XPath at column {pos + 1} near {near!r}: {what}.")


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.toks = _tokens(expr)
        self.i = 0

    # -- helpers ---------------------------------------------------------------------------

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def at(self, *texts: str) -> bool:
        return self.tok.kind in ("op", "operator") and self.tok.text in texts

    def expect(self, text: str) -> _Tok:
        if not self.at(text):
            raise self.fail(f"expected {text!r}")
        return self.take()

    def fail(self, what: str) -> errors.UsageError:
        t = self.tok
        found = "the end of the expression" if t.kind == "end" else repr(t.text)
        return errors.UsageError(f"invalid XPath at column {t.pos + 1} near {found}: {what}.")

    def span_from(self, start: int) -> tuple[int, int]:
        end = self.toks[self.i - 1].pos + len(self.toks[self.i - 1].text) if self.i else start
        return (start, end)

    # -- grammar ---------------------------------------------------------------------------

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise self.fail("the expression is empty")
        node = self.or_expr()
        if self.tok.kind != "end":
            raise self.fail("unexpected token")
        return node

    def _binary(self, ops: tuple[str, ...], sub: Callable[[], Node], operator_kind: bool) -> Node:
        start = self.tok.pos
        left = sub()
        while (self.tok.kind == "operator" if operator_kind else self.tok.kind == "op") and self.tok.text in ops:
            op = self.take().text
            right = sub()
            left = Binary(op, left, right, self.span_from(start))
        return left

    def or_expr(self) -> Node:
        return self._binary(("or",), self.and_expr, True)

    def and_expr(self) -> Node:
        return self._binary(("and",), self.equality, True)

    def equality(self) -> Node:
        return self._binary(("=", "!="), self.relational, False)

    def relational(self) -> Node:
        return self._binary(("<", "<=", ">", ">="), self.additive, False)

    def additive(self) -> Node:
        return self._binary(("+", "-"), self.multiplicative, False)

    def multiplicative(self) -> Node:
        start = self.tok.pos
        left = self.unary()
        while self.tok.kind == "operator" and self.tok.text in ("*", "div", "mod"):
            op = self.take().text
            left = Binary(op, left, self.unary(), self.span_from(start))
        return left

    def unary(self) -> Node:
        start = self.tok.pos
        if self.at("-"):
            self.take()
            return Neg(self.unary(), self.span_from(start))
        return self.union()

    def union(self) -> Node:
        return self._binary(("|",), self.path_expr, False)

    def path_expr(self) -> Node:
        t = self.tok
        start = t.pos
        is_primary = (t.kind in ("literal", "number") or self.at("(", "$")
                      or t.kind == "name" and self.peek().text == "(" and t.text not in NODE_TYPES)
        if not is_primary:
            return self.location_path()
        primary = self.primary()
        preds = self.predicates()
        node: Node = Filter(primary, preds, self.span_from(start)) if preds else primary
        if self.at("/", "//"):
            steps = self.relative_steps()
            return Path(False, tuple(steps), self.span_from(start), start=node)
        return node

    def primary(self) -> Node:
        t = self.tok
        start = t.pos
        if t.kind == "literal":
            self.take()
            return Literal(t.text[1:-1], self.span_from(start))
        if t.kind == "number":
            self.take()
            return Number(float(t.text), self.span_from(start))
        if self.at("$"):
            self.take()
            if self.tok.kind != "name":
                raise self.fail("expected a variable name after '$'")
            return Var(self.take().text, self.span_from(start))
        if self.at("("):
            self.take()
            inner = self.or_expr()
            self.expect(")")
            return inner
        name = self.take().text
        self.expect("(")
        args: list[Node] = []
        if not self.at(")"):
            args.append(self.or_expr())
            while self.at(","):
                self.take()
                args.append(self.or_expr())
        self.expect(")")
        return Call(name, tuple(args), self.span_from(start))

    def predicates(self) -> tuple[Node, ...]:
        preds = []
        while self.at("["):
            self.take()
            preds.append(self.or_expr())
            self.expect("]")
        return tuple(preds)

    def location_path(self) -> Node:
        start = self.tok.pos
        if self.at("/"):
            self.take()
            if self._step_starts():
                return Path(True, tuple(self.relative_steps(first=True)), self.span_from(start))
            return Path(True, (), self.span_from(start))
        if self.at("//"):
            self.take()
            steps = [Step("descendant-or-self", "node()")] + self.relative_steps(first=True)
            return Path(True, tuple(steps), self.span_from(start))
        if not self._step_starts():
            raise self.fail("expected a location step, a literal, a number or a function call")
        return Path(False, tuple(self.relative_steps(first=True)), self.span_from(start))

    def _step_starts(self) -> bool:
        t = self.tok
        return t.kind == "name" or self.at(".", "..", "@", "*") and t.kind == "op"

    def relative_steps(self, first: bool = False) -> list[Step]:
        steps: list[Step] = []
        if first:
            steps.append(self.step())
        while self.at("/", "//"):
            if self.take().text == "//":
                steps.append(Step("descendant-or-self", "node()"))
            steps.append(self.step())
        return steps

    def step(self) -> Step:
        if self.at("."):
            self.take()
            return Step("self", "node()")
        if self.at(".."):
            self.take()
            return Step("parent", "node()")
        axis = "child"
        if self.at("@"):
            self.take()
            axis = "attribute"
        elif self.tok.kind == "name" and self.peek().text == "::":
            axis = self.take().text
            if axis not in AXES:
                self.i -= 1
                raise self.fail(f"unknown axis {axis!r}")
            self.take()
        t = self.tok
        if self.at("*") and t.kind == "op":
            self.take()
            test = "*"
        elif t.kind == "name":
            self.take()
            if self.at("(") and t.text in NODE_TYPES:
                self.take()
                if t.text == "processing-instruction" and self.tok.kind == "literal":
                    self.take()
                self.expect(")")
                test = t.text + "()"
            else:
                test = t.text
        else:
            raise self.fail("expected a name test or a node type")
        return Step(axis, test, self.predicates())


def parse(expr: str) -> Node:
    """The syntax tree of ``expr``, or a :class:`UsageError` with the column and token at fault."""
    return _Parser(expr).parse()


def text(expr: str, node: Node) -> str:
    """The source text of ``node`` in ``expr`` (for --explain)."""
    span = getattr(node, "span", None)
    return expr[span[0]:span[1]] if span else "?"


__all__ = ["parse", "text", "Node", "Literal", "Number", "Var", "Call", "Step", "Path", "Binary",
           "Neg", "Filter"]
