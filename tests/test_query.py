"""The query planner gives what brute force gives: generated headers and XPath expressions,
planner results compared with lxml evaluated on every header, on SQLite and on PostgreSQL; plus
index maintenance through namespace changes, errors with positions, limits and time limits."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from dgf import errors
from metaserver import planner, query
from metaserver.engine import MetaEngine, NewFile
from metaserver.sql import SqlEngine
from tests.pg import PostgresServer

# -- generated headers ------------------------------------------------------------------------

CODES = st.sampled_from(["A", "B", "T-D4000", "ab", ""])
NUMBERS = st.sampled_from(["0.5", "1", "1.0", " 2 ", "2.5e0", "1e", "-3", ".5", "abc", "", "10", "1E-1"])
WORDS = st.sampled_from(["CT", "MR", "ct", "CHEST", "CHEST CT", "AXIAL", "ORIGINAL", "", "x" * 300,
                         "x" * 300 + "y", "a%b_c", "é€"])
DATES = st.sampled_from(["20190101", "20211231", "20240229", "", "2019"])


def _el(name: str, text: str) -> str:
    return f'<{name} tag="00000000" vr="XX">{escape(text)}</{name}>'


@st.composite
def items(draw: st.DrawFn, depth: int) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 2))):
        inner = [_el("CodeValue", draw(CODES)) for _ in range(draw(st.integers(0, 2)))]
        if draw(st.booleans()):
            inner.append(_el("CodeMeaning", draw(WORDS)))
        if depth < 2 and draw(st.booleans()):
            inner.append(f"<ConceptCodeSequence>{draw(items(depth + 1))}</ConceptCodeSequence>")
        parts.append("<Item>" + "".join(inner) + "</Item>")
    return "".join(parts)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    parts = []
    for kw, values in (("Modality", WORDS), ("PatientSex", st.sampled_from(["F", "M", "O"])),
                       ("SliceThickness", NUMBERS), ("StudyDate", DATES), ("StudyDescription", WORDS)):
        if draw(st.integers(0, 4)):
            parts.append(_el(kw, draw(values)))
    parts += [_el("ImageType", draw(WORDS)) for _ in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):
        parts.append(f"<ProcedureCodeSequence>{draw(items(0))}</ProcedureCodeSequence>")
    if draw(st.booleans()):
        parts.append('<PrivateElement tag="00090010" vr="LO">x</PrivateElement>')
    parts.append(_el("StudyInstanceUID", draw(st.sampled_from(["1.2.1", "1.2.2"]))))
    parts.append(_el("SeriesInstanceUID", draw(st.sampled_from(["1.2.1.1", "1.2.1.2"]))))
    return ("<DicomHeader>" + "".join(parts) + "</DicomHeader>").encode()


# -- generated expressions --------------------------------------------------------------------

def _lit(s: str) -> str:
    return "'" + s + "'" if "'" not in s else '"' + s + '"'


TOP = st.sampled_from(["Modality", "PatientSex", "SliceThickness", "StudyDate", "StudyDescription",
                       "ImageType", "ProcedureCodeSequence/Item/CodeValue", ".//CodeValue",
                       "ProcedureCodeSequence/Item/CodeMeaning", "*/Item/CodeValue", "Missing",
                       ".//ConceptCodeSequence/Item/CodeValue", "ProcedureCodeSequence/Item[CodeValue='A']/CodeMeaning"])
IN_ITEM = st.sampled_from(["CodeValue", "CodeMeaning", "ConceptCodeSequence/Item/CodeValue", ".//CodeValue"])
LITERALS = st.one_of(WORDS.map(_lit), CODES.map(_lit), NUMBERS.map(_lit), DATES.map(_lit),
                     st.sampled_from(["1", "0.5", "-3", "2.5", "20190101", "20210000"]))
OPS = st.sampled_from(["=", "!=", "<", "<=", ">", ">="])


def predicates(paths: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    atom = st.one_of(
        st.builds(lambda p, o, v: f"{p} {o} {v}", paths, OPS, LITERALS),
        st.builds(lambda v, o, p: f"{v} {o} {p}", LITERALS, OPS, paths),
        st.builds(lambda f, p, v: f"{f}({p}, {v})", st.sampled_from(["contains", "starts-with"]), paths,
                  st.one_of(WORDS, CODES, st.sampled_from(["HE", "T-", "x" * 299])).map(_lit)),
        paths,
        st.builds(lambda p: f"boolean({p})", paths),
        st.sampled_from(["true()", "false()", "count(ImageType) > 1", "string-length(Modality) = 2",
                         "substring-before(SliceThickness, '.') = '1'"]),
    )
    return st.recursive(atom, lambda inner: st.one_of(
        st.builds(lambda a, b: f"({a} and {b})", inner, inner),
        st.builds(lambda a, b: f"({a} or {b})", inner, inner),
        st.builds(lambda a: f"not({a})", inner)), max_leaves=4)


EXPRESSIONS = st.one_of(
    predicates(TOP).map(lambda p: f"/DicomHeader[{p}]"),
    predicates(TOP),
    st.builds(lambda a, b: f"/DicomHeader[{a}][{b}]", predicates(TOP), predicates(TOP)),
    predicates(IN_ITEM).map(lambda p: f"//ProcedureCodeSequence/Item[{p}]"),
    predicates(IN_ITEM).map(lambda p: f"/DicomHeader/ProcedureCodeSequence/Item[{p}]/CodeValue"),
    predicates(IN_ITEM).map(lambda p: f"//Item[{p}]"),
    st.sampled_from(["/DicomHeader", "/", "//CodeValue", "/*/ImageType[2]", "/Other", "//Item/..",
                     "/DicomHeader/ImageType[.='AXIAL']", "//*[CodeValue='A']",
                     # Lists of values on one path (one IN), beside forms that must not merge.
                     "/DicomHeader[StudyInstanceUID='1.2.1' or StudyInstanceUID='9' or StudyInstanceUID='1.2.2']",
                     "/DicomHeader[(ImageType='AXIAL' or ImageType='LOCALIZER') and Modality='CT']",
                     "/DicomHeader[Modality='CT' or Modality='MR' or PatientSex='F']",
                     "//ProcedureCodeSequence/Item[CodeValue='A' or CodeValue='B']",
                     "/DicomHeader[SliceThickness='1' or SliceThickness=1]"]),
)


def brute_force(docs: dict[str, bytes], expr: str) -> list[str]:
    compiled = etree.XPath(expr)
    return sorted(p for p, x in docs.items() if compiled(etree.fromstring(x)))


_batches = itertools.count()


def check_planner(engine: SqlEngine, docs: list[bytes], expr: str) -> None:
    top = f"/q{next(_batches)}"
    files = [NewFile(f"{top}/f{i}", f"{hash((top, i)) & (2**64 - 1):064x}", 1, "s",
                     {"user.dgf.dicom": x}) for i, x in enumerate(docs)]
    engine.create_files(files)
    dialect = "sqlite" if engine.is_sqlite else "postgresql"
    want = brute_force({f.path: f.xattrs["user.dgf.dicom"] for f in files}, expr)
    # With measured selectivity (over the whole archive, and over a sample of its first two
    # files and their series sets) and with the shape heuristic: different drivers, same answer.
    for estimate in (engine.query_estimate, functools.partial(engine.query_estimate, sample=2), None):
        # Interleaved: a scan of the whole archive abandoned after one row, with chunks still in
        # flight at the workers (the thresholds are lowered by the small_chunks fixture).
        everything = query.prepare("/DicomHeader[count(*) >= 0]", engine.query_catalogue(), dialect)
        query.page(engine, everything, "/", [], 0, None, 1, 10.0)
        # Pure XPath 1.0 (the review that refuses or rewrites what users cannot mean is tested apart).
        q = query.prepare(expr, engine.query_catalogue(), dialect, estimate, review=False)
        got = sorted(r["path"] for r in query.run(engine, q, top, []))
        assert got == want, q.explain()
    # The same answer in keyset pages of two rows, as cursors deliver it.
    paged: list[str] = []
    after: int | None = 0
    while after is not None:
        page = query.page(engine, q, top, [], after, None, 2, 10.0)
        paged += [r["path"] for r in page.rows]
        after = page.after
    assert sorted(paged) == want and len(paged) == len(set(paged))


@pytest.fixture(scope="module")
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlEngine]:
    e = SqlEngine(f"sqlite:///{tmp_path_factory.mktemp('q') / 'meta.db'}")
    yield e
    e.close()


@pytest.fixture(scope="module")
def pg_engine(postgres: PostgresServer) -> Iterator[SqlEngine]:
    e = SqlEngine(postgres.create_database("planner"))
    yield e
    e.close()


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


@pytest.fixture()
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scans fan out to the worker processes after two candidates, two per chunk; headers of a
    series share a set for a single row in common, so most checks read rows from both sides."""
    from metaserver import index

    monkeypatch.setattr(query, "SERIAL_CANDIDATES", 2)
    monkeypatch.setattr(query, "CHUNK", 2)
    monkeypatch.setattr(index, "SHARE_LEAST", 1)


@PROPERTY
@given(docs=st.lists(headers(), min_size=1, max_size=8), expr=EXPRESSIONS)
def test_planner_equals_brute_force_sqlite(sqlite_engine: SqlEngine, small_chunks: None, docs: list[bytes],
                                           expr: str) -> None:
    check_planner(sqlite_engine, docs, expr)


@settings(PROPERTY, max_examples=150)
@given(docs=st.lists(headers(), min_size=1, max_size=8), expr=EXPRESSIONS)
def test_planner_equals_brute_force_postgresql(pg_engine: SqlEngine, small_chunks: None, docs: list[bytes],
                                               expr: str) -> None:
    check_planner(pg_engine, docs, expr)


# -- index maintenance and behaviour ----------------------------------------------------------

def _hdr(modality: str, study: str = "1.2.3", series: str = "1.2.3.4") -> bytes:
    return (f"<DicomHeader>{_el('PatientID', 'P1')}{_el('StudyInstanceUID', study)}"
            f"{_el('SeriesInstanceUID', series)}{_el('Modality', modality)}</DicomHeader>").encode()


def _paths(engine: MetaEngine, expr: str, root: str = "/", **kw: object) -> list[str]:
    q = query.prepare(expr, engine.query_catalogue(), "sqlite")
    return sorted(r["path"] for r in query.run(engine, q, root, [], **kw))  # type: ignore[arg-type]


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[SqlEngine]:
    e = SqlEngine(f"sqlite:///{tmp_path / 'meta.db'}")
    yield e
    e.close()


def test_index_follows_namespace_changes(engine: SqlEngine) -> None:
    engine.create_files([NewFile("/a/1", "1" * 64, 1, "s", {"user.dgf.dicom": _hdr("CT")}),
                         NewFile("/a/2", "2" * 64, 1, "s", {"user.dgf.dicom": _hdr("MR")})])
    ct = "/DicomHeader[Modality='CT']"
    assert _paths(engine, ct) == ["/a/1"]
    engine.rename("/a", "/b")
    assert _paths(engine, ct) == ["/b/1"] and _paths(engine, ct, "/b") == ["/b/1"]
    engine.create_files([NewFile("/b/1", "3" * 64, 1, "s", {"user.dgf.dicom": _hdr("MR")})], replace=True)
    assert _paths(engine, ct) == [] and _paths(engine, "/DicomHeader[Modality='MR']") == ["/b/1", "/b/2"]
    engine.setxattr("/b/2", "user.dgf.dicom", _hdr("CT"))
    assert _paths(engine, ct) == ["/b/2"]
    engine.unlink("/b/2")
    assert _paths(engine, ct) == []
    engine.removexattr("/b/1", "user.dgf.dicom")
    assert _paths(engine, "/DicomHeader") == []


def _index_rows(engine: SqlEngine, tables: tuple[str, ...] = ("hvalues", "hshared", "hmembers", "hsets")
                ) -> dict[str, int]:
    with engine.engine.connect() as conn:
        return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in tables}


def test_a_commit_clears_the_rows_of_what_it_writes_over_and_a_reused_inode_starts_clean(
        engine: SqlEngine, tmp_path: Path) -> None:
    """A commit clears old attributes and index rows only of the files it writes over: a new
    inode has none, even where SQLite hands out the number of one removed just before."""
    engine.create_files([NewFile("/r/1", "1" * 64, 1, "s", {"user.dgf.dicom": _hdr("CT", series="9.1")}),
                         NewFile("/r/2", "2" * 64, 1, "s", {"user.dgf.dicom": _hdr("CT", series="9.2")})])
    gone = engine.stat("/r/2").ino
    engine.unlink("/r/2")
    engine.create_files([NewFile("/r/1", "3" * 64, 1, "s", {"user.dgf.dicom": _hdr("MR", series="9.1")}),
                         NewFile("/r/3", "4" * 64, 1, "s", {"user.dgf.dicom": _hdr("US", series="9.3")})],
                        replace=True)
    assert engine.stat("/r/3").ino == gone          # the removed file's number, used again
    assert _paths(engine, "/DicomHeader[Modality='CT']") == []
    assert _paths(engine, "/DicomHeader[Modality='MR']") == ["/r/1"]
    assert _paths(engine, "/DicomHeader[Modality='US']") == ["/r/3"]
    assert engine.getxattr("/r/1", "user.dgf.dicom") == _hdr("MR", series="9.1")
    fresh = SqlEngine(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        fresh.create_files([NewFile("/r/1", "3" * 64, 1, "s", {"user.dgf.dicom": _hdr("MR", series="9.1")}),
                            NewFile("/r/3", "4" * 64, 1, "s", {"user.dgf.dicom": _hdr("US", series="9.3")})])
        tables = ("hvalues", "hshared", "hmembers", "hsets", "hlevels", "xattrs")
        assert _index_rows(engine, tables) == _index_rows(fresh, tables)
    finally:
        fresh.close()


def test_a_series_keeps_its_common_rows_once_and_they_leave_with_its_last_file(engine: SqlEngine) -> None:
    def ct(i: int, kvp: str = "120") -> bytes:
        return (f"<DicomHeader>{_el('PatientID', 'P1')}{_el('StudyInstanceUID', '1.2')}"
                f"{_el('SeriesInstanceUID', '1.2.3')}{_el('Modality', 'CT')}{_el('KVP', kvp)}"
                f"{_el('InstanceNumber', str(i))}</DicomHeader>").encode()

    engine.create_files([NewFile(f"/s/{i}", f"{i:064x}", 1, "s", {"user.dgf.dicom": ct(i)}) for i in range(1, 4)]
                        + [NewFile("/o/1", "9" * 64, 1, "s", {"user.dgf.dicom": _hdr("MR")})])
    # Seven rows each; six in common (root, patient, study, series, modality, kVp): one set of
    # six, each file keeps its instance number, and the lone MR header all its rows.
    assert _index_rows(engine) == {"hvalues": 3 + 5, "hshared": 6, "hmembers": 3, "hsets": 1}
    assert _paths(engine, "/DicomHeader[Modality='CT' and KVP >= 120 and InstanceNumber > 1]") == ["/s/2", "/s/3"]
    assert _paths(engine, "/DicomHeader[KVP = 120 and not(Modality = 'MR')]") == ["/s/1", "/s/2", "/s/3"]
    engine.unlink("/s/1")
    engine.create_files([NewFile("/s/2", "8" * 64, 1, "s", {"user.dgf.dicom": ct(2, "80")})], replace=True)
    assert _paths(engine, "/DicomHeader[KVP = 120]") == ["/s/3"]
    assert _paths(engine, "/DicomHeader[KVP < 100 and InstanceNumber = 2]") == ["/s/2"]
    # /s/3 is still a member of the first set; /s/2, alone in its commit and short of the set's
    # kVp row but holding the other five, makes a set of those five, which keeps its two own rows.
    assert _index_rows(engine) == {"hvalues": 1 + 2 + 5, "hshared": 6 + 5, "hmembers": 2, "hsets": 2}
    engine.unlink("/s/3")
    assert _index_rows(engine) == {"hvalues": 2 + 5, "hshared": 5, "hmembers": 1, "hsets": 1}
    assert _paths(engine, "/DicomHeader[KVP < 100 and Modality = 'CT' and PatientID = 'P1']") == ["/s/2"]


def test_share_splits_rows_exactly() -> None:
    """A header's own rows and its set's rows are its rows, none twice."""
    from metaserver import index

    hdrs = [index.index_header(x) for x in (
        b"<DicomHeader><SeriesInstanceUID>1</SeriesInstanceUID><ImageType>A</ImageType><ImageType>B</ImageType>"
        b"<Modality>CT</Modality><KVP>80</KVP><Rows>5</Rows></DicomHeader>",
        b"<DicomHeader><SeriesInstanceUID>1</SeriesInstanceUID><ImageType>B</ImageType><ImageType>A</ImageType>"
        b"<Modality>CT</Modality><KVP>80</KVP><Rows>5</Rows></DicomHeader>",
        b"<DicomHeader><SeriesInstanceUID>2</SeriesInstanceUID><Modality>CT</Modality></DicomHeader>")]
    own, sets, joined = index.share(list(zip((10, 11, 12), hdrs)))
    assert joined == []
    assert [(s.series, s.inos) for s in sets] == [("1", [10, 11])]
    for ino, h in zip((10, 11, 12), hdrs):
        mine = [row for i, row in own if i == ino] + [row for s in sets if ino in s.inos for row in s.rows]
        assert sorted(mine, key=repr) == sorted(h.rows, key=repr) and len(set(mine)) == len(mine)
    # The ImageType values differ in order, so in which of them is first: neither row is shared.
    assert ("/DicomHeader/ImageType", "A", None, True, 0) not in sets[0].rows


def test_a_header_alone_in_its_series_shares_with_a_stored_one_or_a_smaller_set() -> None:
    """share(): a lone header makes a set of what it has in common with a stored header of its
    series (``siblings``), or with the series' set when it holds three quarters of it; less
    (a localizer in an axial series) and it keeps its rows, the set staying as it is."""
    from metaserver import index

    def hdr(n: int, **changed: str) -> index.HeaderIndex:
        values = {"SeriesInstanceUID": "5", "PatientID": "P", "StudyInstanceUID": "4", "Modality": "CT",
                  "KVP": "120", "Rows": "512", "Columns": "512", "SliceThickness": "1",
                  **changed, "InstanceNumber": str(n)}
        return index.index_header(("<DicomHeader>" + "".join(f"<{k}>{v}</{k}>" for k, v in values.items())
                                   + "</DicomHeader>").encode())

    first, second = hdr(1), hdr(2)              # ten rows each, the root's among them
    own, sets, joined = index.share([(2, second)], siblings={"5": frozenset(first.rows)})
    assert joined == [] and [(s.inos, len(s.rows)) for s in sets] == [([2], 9)]
    assert sorted(own) == sorted((2, r) for r in set(second.rows) - set(first.rows))
    stored = {"5": (40, frozenset(sets[0].rows))}
    # kVp 80: eight of the set's nine rows make a smaller set.
    own, sets, joined = index.share([(3, hdr(3, KVP="80"))], stored)
    assert joined == [] and [(s.inos, len(s.rows)) for s in sets] == [([3], 8)] and len(own) == 2
    # A localizer: five of the nine (its kVp, rows, columns and thickness differ) is less than
    # three quarters.
    scout = hdr(4, KVP="100", Rows="256", Columns="256", SliceThickness="10")
    own, sets, joined = index.share([(4, scout)], stored)
    assert sets == [] and joined == [] and sorted(own) == sorted((4, r) for r in scout.rows)
    # No stored header of its series to compare with: a lone header keeps its rows.
    own, sets, _ = index.share([(5, hdr(5))], siblings={"6": frozenset(first.rows)})
    assert sets == [] and len(own) == 10


def test_long_values_sharing_a_prefix_index_once_and_match_exactly(engine: SqlEngine) -> None:
    """Values longer than the index keeps are stored by their prefix: two that share it are one
    row (a second would break the table's key), and each still matches only itself."""
    long = "7" * 300
    header = (f"<DicomHeader>{_el('PatientID', 'P1')}{_el('ImageComments', long + '1')}"
              f"{_el('ImageComments', long + '2')}{_el('ImageComments', long)}</DicomHeader>").encode()
    engine.create_files([NewFile("/l/1", "1" * 64, 1, "s", {"user.dgf.dicom": header}),
                         NewFile("/l/2", "2" * 64, 1, "s", {"user.dgf.dicom": _hdr("CT")})])
    assert _paths(engine, f"/DicomHeader[ImageComments='{long}2']") == ["/l/1"]
    assert _paths(engine, f"/DicomHeader[ImageComments='{long}3']") == []
    assert _paths(engine, "/DicomHeader[ImageComments > 1000]") == ["/l/1"]    # numbers of whole values


def test_levels_limit_and_count(engine: SqlEngine) -> None:
    engine.create_files([NewFile(f"/p/s{i % 2}/{i}", f"{i:064x}", 1, "s",
                                 {"user.dgf.dicom": _hdr("CT", series=f"1.{i % 2}")}) for i in range(6)])
    q = query.prepare("/DicomHeader[Modality='CT']", engine.query_catalogue(), "sqlite")
    series = list(query.run(engine, q, "/", [], level="series"))
    assert sorted((g["SeriesInstanceUID"], g["files"], g["path"]) for g in series) == [
        ("1.0", 3, "/p/s0"), ("1.1", 3, "/p/s1")]
    assert [g["files"] for g in query.run(engine, q, "/", [], level="study")] == [6]
    assert len(list(query.run(engine, q, "/", [], limit=4))) == 4
    assert query.count(engine, q, "/") == 6 and query.count(engine, q, "/p/s1") == 3
    assert q.explain()["strategy"] == "index only"


def test_a_scan_of_every_header_reads_in_inode_order_without_sorting(engine: SqlEngine) -> None:
    """A query with no indexed term (``/DicomHeader``, a study list's first page) reads candidates
    in inode order from the first one: without a bound on the inode, SQLite scanned the xattrs
    table and sorted every header before giving the first (0.1 s at 10,000 files, growing)."""
    engine.create_files([NewFile(f"/o/{i}", f"{i + 70:064x}", 1, "s", {"user.dgf.dicom": _hdr("CT")})
                         for i in range(3)])
    seen: list[tuple[str, object]] = []

    def record(conn: object, cursor: object, statement: str, params: object, *_: object) -> None:
        if "xattrs.value" in statement:
            seen.append((statement, params))
    sa.event.listen(engine.engine, "before_cursor_execute", record)
    try:
        rows = engine.query_candidates("/", None, True)
        assert next(rows)[1] == "/o/0"
        rows.close()
    finally:
        sa.event.remove(engine.engine, "before_cursor_execute", record)
    (statement, params), = seen
    with engine.engine.connect() as conn:
        plan = [r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)]
    assert not any("TEMP B-TREE" in step for step in plan), plan
    assert plan[0].startswith("SEARCH inodes"), plan


def test_a_list_of_values_on_one_path_is_one_index_lookup(engine: SqlEngine) -> None:
    """``StudyInstanceUID='a' or StudyInstanceUID='b' or ...`` (a UID list, as C-FIND and QIDO-RS
    send, and as a study list's second step asks) plans as one leaf, text IN (...): planning a
    union of one plan per UID cost ~0.3 ms a UID."""
    engine.create_files([NewFile(f"/u/{i}", f"{i + 90:064x}", 1, "s", {"user.dgf.dicom": _hdr("CT", study=f"1.9.{i}")})
                         for i in range(6)])
    expr = "/DicomHeader[" + " or ".join(f"StudyInstanceUID='1.9.{i}'" for i in (4, 1, 4, 7)) + "]"
    q = query.prepare(expr, engine.query_catalogue(), "sqlite")
    (leaf, negated), = q.plan.terms or ()
    assert isinstance(leaf, planner.Leaf) and leaf.texts == ("1.9.4", "1.9.1", "1.9.7") and not negated
    assert q.plan.exact and _paths(engine, expr) == ["/u/1", "/u/4"]
    # Different paths, or an item's fields, stay a union.
    mixed = query.prepare("/DicomHeader[StudyInstanceUID='1.9.1' or Modality='MR']", engine.query_catalogue(), "sqlite")
    assert not isinstance((mixed.plan.terms or ())[0][0], planner.Leaf)


def test_a_file_matching_on_several_rows_counts_and_lists_once(engine: SqlEngine) -> None:
    # Three ImageType values, three index rows of one key: the plan's SQL names the file once
    # per row (its consumers test membership), and a count counts files.
    hdr = (f"<DicomHeader>{_el('SeriesInstanceUID', '1.5')}{_el('ImageType', 'ORIGINAL')}"
           f"{_el('ImageType', 'PRIMARY')}{_el('ImageType', 'AXIAL')}</DicomHeader>").encode()
    engine.create_files([NewFile(f"/m/{i}", f"{i + 50:064x}", 1, "s", {"user.dgf.dicom": hdr}) for i in range(3)])
    q = query.prepare("/DicomHeader[ImageType != 'X']", engine.query_catalogue(), "sqlite")
    assert q.explain()["strategy"] == "index only"
    assert query.count(engine, q, "/") == 3 and _paths(engine, "/DicomHeader[ImageType != 'X']") == [
        "/m/0", "/m/1", "/m/2"]


def test_invalid_xpath_names_position_and_token() -> None:
    with pytest.raises(errors.UsageError, match=r"column 23 near '\]'"):
        query.compile_xpath("/DicomHeader[Modality=]")
    with pytest.raises(errors.UsageError, match="unterminated string literal"):
        query.compile_xpath("/DicomHeader[Modality='CT]")
    with pytest.raises(errors.UsageError, match="empty"):
        query.compile_xpath("  ")


def test_time_limit_stops_a_scan(engine: SqlEngine) -> None:
    engine.create_files([NewFile(f"/t/{i}", f"{i:064x}", 1, "s", {"user.dgf.dicom": _hdr("CT")})
                         for i in range(300)])
    q = query.prepare("count(//*) > 1", engine.query_catalogue(), "sqlite")
    assert q.explain()["strategy"] == "scan of every header"
    with pytest.raises(errors.QueryTimeout):
        list(query.run(engine, q, "/", [], deadline=time.monotonic() - 1))


def test_results_stream_in_pages_through_cursors(engine: SqlEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    from dgf.types import Principal
    from metaserver import server

    engine.create_files([NewFile(f"/c/{i:03d}", f"{i:064x}", 1, "s", {"user.dgf.dicom": _hdr("CT")})
                         for i in range(25)])
    monkeypatch.setattr(server, "PAGE_ROWS", 10)
    service = server.MetaService(engine, None, None)  # type: ignore[arg-type]
    me, other = Principal("r", "researcher", "k", "fp-r"), Principal("o", "researcher", "k", "fp-o")
    reply = service.find(me, "/DicomHeader[Modality='CT']", "/c")
    pages = [reply.payload or b""]
    while reply.result["cursor"]:
        with pytest.raises(errors.NotFound):          # a cursor is its owner's only
            service.find_next(other, reply.result["cursor"])
        reply = service.find_next(me, reply.result["cursor"])
        pages.append(reply.payload or b"")
    assert [p.count(b"\n") for p in pages] == [10, 10, 5]
    with pytest.raises(errors.UsageError, match="--level"):
        service.find(me, "/DicomHeader", "/c", level="image")


def test_long_scans_fan_out_to_workers_in_order(engine: SqlEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = {f"/w/{i:04d}": _hdr("CT" if i % 3 else "MR", series=f"1.{i % 7}") for i in range(1200)}
    engine.create_files([NewFile(p, f"{i:064x}", 1, "s", {"user.dgf.dicom": x})
                         for i, (p, x) in enumerate(docs.items())])
    monkeypatch.setattr(query, "SERIAL_CANDIDATES", 50)
    monkeypatch.setattr(query, "CHUNK", 100)
    for expr in ("/DicomHeader[count(Modality[.='MR']) = 1]", "count(//*) > 99"):   # scans; the second matches nothing
        q = query.prepare(expr, engine.query_catalogue(), "sqlite")
        got = [r["path"] for r in query.run(engine, q, "/w", ["SeriesInstanceUID"])]
        assert got == brute_force(docs, expr)          # same files, in candidate order
    mr = query.prepare("/DicomHeader[count(Modality[.='MR']) = 1]", engine.query_catalogue(), "sqlite")
    assert [r["path"] for r in query.run(engine, mr, "/w", [], limit=80)] == brute_force(docs, mr.expr)[:80]


def test_an_abandoned_scan_leaves_nothing_for_the_next(engine: SqlEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan stopped early (--limit, a page boundary, a closed cursor) while the workers still
    held chunks: the next scan once read those results (1866 rows instead of 2000, wrong paths)."""
    docs = {f"/ab/{i:04d}": _hdr("CT" if i % 2 else "MR", series=f"1.{i % 5}") for i in range(2000)}
    engine.create_files([NewFile(p, f"{i:064x}", 1, "s", {"user.dgf.dicom": x})
                         for i, (p, x) in enumerate(docs.items())])
    monkeypatch.setattr(query, "SERIAL_CANDIDATES", 10)
    monkeypatch.setattr(query, "CHUNK", 50)
    scan = query.prepare("/DicomHeader[count(Modality[.='CT']) = 1]", engine.query_catalogue(), "sqlite")
    every = query.prepare("/DicomHeader[count(*) > 0]", engine.query_catalogue(), "sqlite")
    for _ in range(3):
        assert len(list(query.run(engine, scan, "/ab", [], limit=30))) == 30          # abandoned
        page = query.page(engine, scan, "/ab", [], 0, None, 25, 10.0)                 # abandoned too
        assert len(page.rows) == 25 and page.after
        got = [r["path"] for r in query.run(engine, every, "/ab", [])]
        assert got == sorted(docs)                    # all 2000, in order, none from the last scan


def _study_hdr(patient: str, study: str, series: str, modality: str, date: str = "20100615") -> bytes:
    return (f"<DicomHeader><StudyDate tag=\"00080020\" vr=\"DA\">{date}</StudyDate>{_el('Modality', modality)}"
            f"{_el('PatientID', patient)}{_el('StudyInstanceUID', study)}"
            f"{_el('SeriesInstanceUID', series)}<Rows tag=\"00280010\" vr=\"US\">512</Rows>"
            f"<ImageType tag=\"00080008\" vr=\"CS\">ORIGINAL</ImageType>"
            f"<ImageType tag=\"00080008\" vr=\"CS\">PRIMARY</ImageType></DicomHeader>").encode()


def test_count_follows_level_and_groups_compute_c_find_attributes(engine: SqlEngine) -> None:
    layout = [("P1", "1.1", "1.1.1", "CT"), ("P1", "1.1", "1.1.1", "CT"), ("P1", "1.1", "1.1.2", "PT"),
              ("P1", "1.2", "1.2.1", "MR"), ("P2", "2.1", "2.1.1", "CT")]
    engine.create_files([NewFile(f"/c/{i}", f"{i + 100:064x}", 1, "s",
                                 {"user.dgf.dicom": _study_hdr(*row)}) for i, row in enumerate(layout)])
    q = query.prepare("/DicomHeader", engine.query_catalogue(), "sqlite")
    assert [query.count(engine, q, "/", level=lv) for lv in ("instance", "series", "study", "patient")] == \
        [5, 4, 3, 2]
    studies = {g["StudyInstanceUID"]: g for g in query.run(
        engine, q, "/", ["ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                         "Rows"], level="study")}
    assert studies["1.1"]["values"] == {"Rows": "512", "ModalitiesInStudy": "CT\\PT",
                                        "NumberOfStudyRelatedSeries": "2", "NumberOfStudyRelatedInstances": "3"}
    assert studies["1.1"]["vr"] == {"Rows": "US", "ModalitiesInStudy": "CS", "NumberOfStudyRelatedSeries": "IS",
                                    "NumberOfStudyRelatedInstances": "IS"}
    series = {g["SeriesInstanceUID"]: g["values"] for g in query.run(
        engine, q, "/", ["NumberOfSeriesRelatedInstances"], level="series")}
    assert series == {"1.1.1": {"NumberOfSeriesRelatedInstances": "2"}, "1.1.2": {"NumberOfSeriesRelatedInstances": "1"},
                      "1.2.1": {"NumberOfSeriesRelatedInstances": "1"}, "2.1.1": {"NumberOfSeriesRelatedInstances": "1"}}
    patients = {g["PatientID"]: g["values"] for g in query.run(
        engine, q, "/", ["NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries"], level="patient")}
    assert patients["P1"] == {"NumberOfPatientRelatedStudies": "2", "NumberOfPatientRelatedSeries": "3"}
    # Counts are of the matching files, as C-FIND counts what matched.
    ct = query.prepare("/DicomHeader[Modality='CT']", engine.query_catalogue(), "sqlite")
    [p1] = [g for g in query.run(engine, ct, "/", ["ModalitiesInStudy"], level="study")
            if g["StudyInstanceUID"] == "1.1"]
    assert p1["values"]["ModalitiesInStudy"] == "CT" and p1["files"] == 2
    with pytest.raises(errors.UsageError, match="computed per study; add --level study"):
        list(query.run(engine, q, "/", ["ModalitiesInStudy"]))


def test_queries_researchers_write_are_reviewed(engine: SqlEngine) -> None:
    engine.create_files([NewFile("/r/1", "a" * 64, 1, "s", {"user.dgf.dicom": _study_hdr("P1", "1", "1.1", "CT")}),
                         NewFile("/r/2", "b" * 64, 1, "s", {"user.dgf.dicom": (
                             b"<DicomHeader><Modality tag=\"00080060\" vr=\"CS\">MR</Modality>"
                             b"<StudyDate tag=\"00080020\" vr=\"DA\">20090101</StudyDate>"
                             b"<LocalNote tag=\"00091001\" vr=\"LO\">x</LocalNote></DicomHeader>")})])

    def prepared(expr: str) -> query.Query:
        return query.prepare(expr, engine.query_catalogue(), "sqlite")

    # Typos select nothing, so they are named with the nearest keyword (but the query runs).
    for typo, near in (("Modalty", "Modality"), ("modality", "Modality"), ("StudyDat", "StudyDate")):
        q = prepared(f"/DicomHeader[{typo}='CT']")
        assert [w for w in q.warnings if w.startswith(f"{typo} is not a DICOM keyword")]
        assert f"did you mean {near}?" in q.warnings[0]
        assert [r["path"] for r in query.run(engine, q, "/", [])] == []
    # Keywords, the model's names and names stored in the archive are not warned about.
    assert prepared("/DicomHeader[Modality='CT' and LocalNote and Item/CodeValue]").warnings == ()
    # ISO dates mean the DICOM date; the rewrite is said.
    q = prepared("/DicomHeader[StudyDate >= '2010-01-01']")
    assert [r["path"] for r in query.run(engine, q, "/", [])] == ["/r/1"]
    assert q.warnings == ("read '2010-01-01' as the DICOM date 20100101 in StudyDate >= '2010-01-01'.",)
    assert [r["path"] for r in query.run(engine, prepared("/DicomHeader[StudyDate = '2009-01-01']"), "/", [])] \
        == ["/r/2"]
    # An ordering comparison with text that is no number could match nothing: refused, with a hint.
    with pytest.raises(errors.UsageError, match=r"number\(substring\(PatientAge, 1, 3\)\) >= 30 and "
                                                r"substring\(PatientAge, 4\) = 'Y'"):
        prepared("/DicomHeader[PatientAge >= '030Y']")
    with pytest.raises(errors.UsageError, match="'noon', which is not a number"):
        prepared("/DicomHeader[StudyTime < 'noon']")
    assert prepared("/DicomHeader[StudyTime < '120000']").warnings == ()
    # Functions XPath 1.0 lacks are named.
    with pytest.raises(errors.UsageError, match=r"^date\(\) is not an XPath 1.0 function"):
        prepared("/DicomHeader[StudyDate > date('2010-01-01')]")
    with pytest.raises(errors.UsageError, match=r"^lower-case\(\) is not an XPath 1.0 function"):
        prepared("/DicomHeader[lower-case(Modality)='ct']")


@settings(max_examples=3000, deadline=None)
@given(st.one_of(
    st.text(alphabet="0123456789.-+eE \t\n\rxY^\u0663\u00b2\u00a0", max_size=12),
    st.from_regex(r"[ \t]?-?[0-9]{0,4}\.?[0-9]{0,4}([eE][+-]?[0-9]{1,3})?[ \n]?", fullmatch=True),
    st.from_regex(r"-?[0-9]{0,25}\.0{0,6}[0-9]{0,30}([eE]-?[0-9]{1,4})?", fullmatch=True),    # past 20 digits
    st.sampled_from(["1.2.840.10008.1.2", "000Y", "ISO_IR 100", "-0500", ".5", "5.", "-.5", "1e3", " 2E-2 ",
                     "+1", "1e", "0E+", "e5", ".", "-", "1.5e+2", "0x10", "Infinity", "NaN", "1 2", "\u0663",
                     "1\u0663"])))
def test_index_numbers_are_xpath_numbers(text: str) -> None:
    """The index stores a value's number() as libxml2 computes it: a number exactly when XPath
    sees one, the same one with an exponent, and within libxml2's rounding of plain decimals
    (the index keeps those correctly rounded, as it always has)."""
    import math

    from metaserver.index import xpath_number

    expected = float(etree.XPath("number($v)")(etree.Element("n"), v=text))  # type: ignore[arg-type]
    got = xpath_number(text)
    if math.isnan(expected):
        assert got is None, (text, got)
    elif "e" in text.lower():
        assert got == expected, (text, got, expected)
    else:
        assert got == float(text) and math.isclose(got, expected, rel_tol=1e-15, abs_tol=1e-300), (text, got)


def test_index_header_numbers_from_its_memo_are_the_conversions() -> None:
    """index_header remembers number() of short values it has seen; a value met again (in the
    same header, a later one, or after the memo was cleared) gets the same number, and a long
    value is converted each time without entering the memo, as is a value with two dots (a UID)."""
    from metaserver import index

    long_number = "1" * 70
    xml = ("<DicomHeader><SliceThickness>2.5</SliceThickness><KVP> 120 </KVP>"
           "<Modality>CT</Modality><ImagePositionPatient>-0.5</ImagePositionPatient>"
           "<ImagePositionPatient>1e3</ImagePositionPatient>"
           f"<PatientWeight>{long_number}</PatientWeight><StudyInstanceUID>1.2.840.5</StudyInstanceUID>"
           "<KVP>1.5.</KVP></DicomHeader>").encode()
    index._NUMBERS.clear()
    first = index.index_header(xml).rows
    assert "2.5" in index._NUMBERS and long_number not in index._NUMBERS
    assert "1.2.840.5" not in index._NUMBERS          # a UID is never a number, nor met again
    again = index.index_header(xml).rows                    # every number now from the memo
    index._NUMBERS.clear()
    cleared = index.index_header(xml).rows
    assert first == again == cleared
    nums = {text: num for _, text, num, _, _ in first}
    assert nums == {"2.5": 2.5, " 120 ": 120.0, "CT": None, "-0.5": -0.5, "1e3": 1000.0,
                    long_number: float(long_number), "": None, "1.2.840.5": None, "1.5.": None}
    assert all(num == index.xpath_number(text) for text, num in nums.items() if text)


def test_index_header_rows_follow_document_order_items_and_string_values() -> None:
    """One row per distinct (key, string-value, item): an element with children is indexed by
    its whole string-value (comments left out), items are numbered in document order wherever
    they nest, a repeated value adds no row, the first row of a key carries the flag, and
    comments and processing instructions are no elements."""
    from metaserver import index

    xml = (b"<DicomHeader><!-- c --><?pi x?><Modality>C<!-- x -->T</Modality>"
           b"<ImageType>A</ImageType><ImageType>B</ImageType><ImageType>A</ImageType>"
           b"<ReferencedImageSequence><Item><ReferencedSOPInstanceUID>1.2</ReferencedSOPInstanceUID></Item>"
           b"<Item><ReferencedSOPInstanceUID>1.2</ReferencedSOPInstanceUID>"
           b"<ReferencedImageSequence><Item><InstanceNumber>7</InstanceNumber></Item></ReferencedImageSequence>"
           b"</Item></ReferencedImageSequence><PrivateElement>hidden</PrivateElement></DicomHeader>")
    h = index.index_header(xml)
    seq, ref = "/DicomHeader/ReferencedImageSequence", "/DicomHeader/ReferencedImageSequence/Item"
    assert h.rows == [
        ("/DicomHeader", "", None, True, 0),
        ("/DicomHeader/Modality", "CT", None, True, 0),
        ("/DicomHeader/ImageType", "A", None, True, 0),
        ("/DicomHeader/ImageType", "B", None, False, 0),
        (seq, "", None, True, 0),
        (ref, "1.2", 1.2, True, 1),
        (ref + "/ReferencedSOPInstanceUID", "1.2", 1.2, True, 1),
        (ref, "1.27", 1.27, False, 2),
        (ref + "/ReferencedSOPInstanceUID", "1.2", 1.2, False, 2),
        (ref + "/ReferencedImageSequence", "", None, True, 2),
        (ref + "/ReferencedImageSequence/Item", "7", 7.0, True, 3),
        (ref + "/ReferencedImageSequence/Item/InstanceNumber", "7", 7.0, True, 3),
        ("/DicomHeader/PrivateElement", "", None, True, 0),
    ]
    assert h.multi_keys == {"/DicomHeader/ImageType", ref, ref + "/ReferencedSOPInstanceUID"}
    assert h.long_keys == set() and h.keys == {r[0] for r in h.rows}


@settings(max_examples=300, deadline=None)
@given(doc=headers(), tails=st.booleans())
def test_index_header_shape_memo_gives_the_general_walk(doc: bytes, tails: bool) -> None:
    """The rows, keys and multi-valued keys read through the memo of header shapes are the
    general walk's, for the shape's first header and again once it is memoised; text around
    elements (which XPath's string-value of a parent includes) is kept.  Only headers with a
    long value are left to the walk."""
    from metaserver import index

    if tails:
        doc = doc.replace(b"</CodeValue>", b"</CodeValue>tail ")
    root = etree.fromstring(doc)
    rows, keys, long_keys, multi = index._by_walk(root)
    index._SHAPES.clear()
    for _ in range(2):                                  # the second from the memo
        fast = index._by_shape(root)
        if long_keys:
            assert fast is None
            continue
        assert fast is not None
        assert (fast[0], set(fast[1]), fast[2], fast[3]) == (rows, keys, long_keys, multi)


def test_index_header_shapes_differ_by_nesting_and_hold_no_values() -> None:
    """Two headers with the same tags in the same order but nested differently get their own
    keys and items (the memo knows each element's child count); a header of a memoised shape
    gets its own values; a comment sends a header down the general walk with the same rows."""
    from metaserver import index

    index._SHAPES.clear()
    index._TAGS.clear()
    nested = index.index_header(b"<DicomHeader><ProcedureCodeSequence><Item><CodeValue>A</CodeValue></Item>"
                                b"</ProcedureCodeSequence></DicomHeader>")
    flat = index.index_header(b"<DicomHeader><ProcedureCodeSequence/><Item/><CodeValue>A</CodeValue>"
                              b"</DicomHeader>")
    assert ("/DicomHeader/ProcedureCodeSequence/Item/CodeValue", "A", None, True, 1) in nested.rows
    assert ("/DicomHeader/CodeValue", "A", None, True, 0) in flat.rows
    again = index.index_header(b"<DicomHeader><ProcedureCodeSequence><Item><CodeValue>B</CodeValue></Item>"
                               b"</ProcedureCodeSequence></DicomHeader>")
    assert len(index._TAGS) == 2 and not index._SHAPES      # the token reader's memo
    assert [r[1] for r in again.rows] == ["", "", "B", "B"]
    commented = index.index_header(b"<DicomHeader><ProcedureCodeSequence><Item><CodeValue>B</CodeValue><!-- x -->"
                                   b"</Item></ProcedureCodeSequence></DicomHeader>")
    assert commented.rows == again.rows


#: Bytes dropped into generated headers: some leave them well-formed (references, attributes,
#: empty elements, blanks), most do not (stray markup, forbidden characters, bad UTF-8, a
#: namespace, a repeated attribute); the token reader must read the first as lxml does and
#: leave the rest to it.
_SNIPPETS = [b"<", b">", b"&", b"&amp;", b"&lt;", b"&#60;", b"&#x41;", b"&#13;", b"&#0;", b"&#xD800;",
             b"&bogus;", b"&#00000065;", b"]]>", b"]", b"\r", b"\r\n", b"\x01", b"\x7f", b"\xc2\x85",
             b"\xef\xbf\xbe", b"\xed\xa0\x80", b"\xff", b"\xc3\xa9", b"<!-- c -->", b"<?pi x?>",
             b"<![CDATA[a<b]]>", b' a="1"', b' a="1" a="2"', b' xmlns="urn:x"', b" b='1'", b' c="&amp;"',
             b' d="&#65;"', b"/", b" ", b"\n", b"\t", b"<X/>", b"<X></X>", b"</X>", b"<Item>", b"</Item>",
             b"<PatientID>P&amp;1</PatientID>", b"<a:b/>", b"\xef\xbb\xbf", b'<?xml version="1.0"?>',
             b"<!DOCTYPE DicomHeader>", b"<DicomHeader/>"]


def _same_reading(xml: bytes) -> object:
    """The token reader's answer, compared with lxml's: equal where both read the header, and
    None where lxml cannot; lxml's answer (None for an error)."""
    from metaserver import index

    try:
        want = index._by_lxml(xml)
    except (etree.XMLSyntaxError, ValueError):
        want = None
    index._TAGS.clear()
    for _ in range(2):                                  # the second from the memo
        got = index._read(xml)
        if want is None:
            assert got is None, xml
        elif got is not None:
            (rows, keys, long_keys, multi), levels = got
            assert (rows, set(keys), long_keys, multi, levels) == \
                (want[0][0], set(want[0][1]), want[0][2], want[0][3], want[1]), xml
    return want


@settings(max_examples=1500, deadline=None)
@given(doc=headers(), cuts=st.lists(st.tuples(st.integers(0, 1 << 20), st.sampled_from(_SNIPPETS)), max_size=3))
def test_the_token_reader_reads_headers_as_lxml_does_or_leaves_them_to_it(doc: bytes, cuts: list[tuple[int, bytes]]
                                                                         ) -> None:
    """Generated headers with bytes dropped anywhere (in a tag, a text, between elements): what
    is not well-formed is left to lxml (which names the error), what is reads the same rows,
    keys and levels both ways; an unchanged header is read by the token reader itself."""
    from metaserver import index

    for at, snippet in cuts:
        at %= len(doc) + 1
        doc = doc[:at] + snippet + doc[at:]
    _same_reading(doc)
    if not cuts:
        assert index._read(doc) is not None


def test_the_token_reader_takes_references_empty_elements_and_mixed_content() -> None:
    """Well-formed forms the reader takes itself, as lxml reads them: named and numeric
    references (a carriage return by reference stays one), attributes with references, empty
    elements, blanks in tags, text between elements, a long value; a PatientID read from a
    reference; and forms it leaves to lxml, which reads or refuses them."""
    from metaserver import index

    taken = [
        b'<DicomHeader><PatientID tag="00100020" vr="LO">P&amp;1 &lt;2&gt; &#65;&#x42;&#13;</PatientID>'
        b'<StudyDescription a="x &quot;y&quot;" b="&amp;">A &apos;B&apos;</StudyDescription>'
        b'<Modality/><Manufacturer ></Manufacturer ><SeriesDescription\tvr="LO" />'
        b"<ProcedureCodeSequence> <Item>\n<CodeValue>X</CodeValue>tail<CodeMeaning>M</CodeMeaning> <CodeValue/>t"
        b"</Item>"
        b"</ProcedureCodeSequence><AdmittingDiagnosesDescription>a<X>b</X>c</AdmittingDiagnosesDescription>"
        b"<StudyComments>" + b"long " * 80 + b"</StudyComments><ImageType>A</ImageType><ImageType>A</ImageType>"
        b"</DicomHeader>\n",
        b"<DicomHeader/>",
        "<DicomHeader><PatientName>\u00e9\u20ac\U0001f600</PatientName></DicomHeader>".encode(),
        b"<DicomHeader><PatientID/><Item><PatientID>R</PatientID></Item><PatientID>Q</PatientID>"
        b"<PatientID>S</PatientID><StudyInstanceUID>1.2</StudyInstanceUID></DicomHeader>",
    ]
    for xml in taken:
        assert _same_reading(xml) is not None
        assert index._read(xml) is not None, xml
    assert (index.index_header(taken[3]).patient, index.index_header(taken[3]).study) == ("Q", "1.2")
    h = index.index_header(taken[0])
    assert h.patient == "P&1 <2> AB\r"
    assert ("/DicomHeader/AdmittingDiagnosesDescription", "abc", None, True, 0) in h.rows
    assert ("/DicomHeader/ProcedureCodeSequence/Item/CodeValue", "", None, False, 1) in h.rows
    assert h.long_keys == {"/DicomHeader/StudyComments"}
    left = [b"<?xml version='1.0' encoding='ISO-8859-1'?><DicomHeader><PatientID>\xe9</PatientID></DicomHeader>",
            b"<DicomHeader><!-- c --><PatientID>P</PatientID></DicomHeader>",
            b"<DicomHeader><PatientID><![CDATA[<P>]]></PatientID></DicomHeader>",
            b"<DicomHeader><PatientID>P\r\n</PatientID></DicomHeader>",
            b"<DicomHeader><PatientID a = '1'>P</PatientID></DicomHeader>",
            b" <DicomHeader/>",
            b"<DicomHeader><PatientID>a>b</PatientID></DicomHeader>"]
    for xml in left:
        assert index._read(xml) is None, xml
        assert _same_reading(xml) is not None, xml
    deep = b"<DicomHeader>" + b"<Item>" * 300 + b"</Item>" * 300 + b"</DicomHeader>"
    assert index._read(deep) is None and _same_reading(deep) is not None
    refused = [b"<DicomHeader><PatientID>P</PatientID>", b"<DicomHeader></DicomHeader><X/>",
               b"<DicomHeader><A></B></DicomHeader>", b'<DicomHeader a="1" a="2"/>', b"<Other/>",
               b'<DicomHeader xmlns="urn:x"><PatientID>P</PatientID></DicomHeader>',
               b"<DicomHeader>&#0;</DicomHeader>", b"<DicomHeader>a]]>b</DicomHeader>",
               b"<DicomHeader>\x01</DicomHeader>", b"<DicomHeader>\xef\xbf\xbf</DicomHeader>",
               b"<DicomHeader>&nbsp;</DicomHeader>", b"<DicomHeader>\xff</DicomHeader>", b""]
    for xml in refused:
        assert _same_reading(xml) is None, xml
        with pytest.raises((etree.XMLSyntaxError, ValueError)):
            index.index_header(xml)


def test_the_token_reader_reads_every_real_header_as_lxml_does() -> None:
    """The XML header of every corpus file (as a site derives it): read by the token reader
    itself, long values included, with lxml's rows, keys and levels."""
    from dgf.dicom import xmlheader
    from metaserver import index
    from tests import corpus

    read = 0
    for path in corpus.readable_files():
        try:
            xml = xmlheader.header_xml(path.read_bytes())
        except errors.DgfError:
            continue                                    # not a file a site would store
        assert _same_reading(xml) is not None, path
        assert index._read(xml) is not None, path
        read += 1
    assert read >= 100


def test_index_header_leaves_no_garbage_for_the_cycle_collector() -> None:
    """Indexing a header makes no reference cycles: a commit of 10,000 headers runs with the
    collector paused, and cycles left per header (a recursive closure's, holding the header's
    nodes) cost a collection of ~700,000 objects after it."""
    import gc

    from metaserver import index

    doc = (b"<DicomHeader><Modality>CT</Modality><!-- c --><ProcedureCodeSequence><Item><CodeValue>A</CodeValue>"
           b"</Item></ProcedureCodeSequence></DicomHeader>")
    index.index_header(doc)
    index.index_header(doc.replace(b"<!-- c -->", b""))
    enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        for _ in range(20):
            index.index_header(doc)                              # the general walk
            index.index_header(doc.replace(b"<!-- c -->", b""))  # the shape memo
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()
