"""MetaEngine contract (per backend) and a stateful property test of the namespace against a
dict model, comparing results and error classes (after JuiceFS's random tests)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dgf import errors
from dgf.types import Principal
from metaserver import migrate, sql, sqlbase
from metaserver.engine import MetaEngine, NewFile
from metaserver.schema import dir_changes, inodes
from metaserver.sql import SqlEngine
from metaserver.sqlbase import Q_DIRS_VERSION
from tests.pg import PostgresServer
from tests.test_query import _hdr, _index_rows


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _file(path: str, content: str = "x", site: str = "site-a", gen: int = 7) -> NewFile:
    return NewFile(path, _key(content), len(content), site, {"user.dgf.dicom": b"<DicomHeader/>"},
                   "P1", b"sealed", gens=((site, gen),))


@contextlib.contextmanager
def _two_processes_at_once(engine: SqlEngine, step: Callable[[SqlEngine, random.Random, int, int], None],
                           refused: tuple[type[BaseException], ...], steps: int,
                           seeds: tuple[int, int]) -> Iterator[SqlEngine]:
    """Run ``steps`` random steps under ``/w`` in ``engine`` and in a second engine over the same
    database (another metaserver process) from two threads at once, switching every 10 us.
    A step may fail only with ``refused``.  Then both directory maps, learnt and replayed, must
    be what a third engine reads from the database; that engine is yielded for more checks."""
    url = str(engine.engine.url.render_as_string(hide_password=False))
    other, judge = SqlEngine(url), SqlEngine(url)
    failed: list[BaseException] = []

    def churn(e: SqlEngine, seed: int) -> None:
        rng = random.Random(seed)
        for n in range(steps):
            try:
                step(e, rng, seed, n)
            except refused:
                pass
            except BaseException as exc:               # noqa: BLE001 - reported below
                failed.append(exc)
                return

    try:
        engine.mkdir("/w")
        for e in (engine, other):
            e._read(e._dir_ids)
        threads = [threading.Thread(target=churn, args=(e, seed)) for e, seed in zip((engine, other), seeds)]
        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(switch)
        assert failed == []
        truth = judge._read(judge._dir_ids)              # built from the database
        for e in (engine, other):
            assert e._read(e._dir_ids) == truth
        yield judge
    finally:
        other.close()
        judge.close()


def _index_matches_headers(engine: SqlEngine) -> bool:
    """Every indexed file reads exactly its header's rows through the index view, every member's
    set exists and every set has members."""
    import collections

    import sqlalchemy as sa

    from metaserver import index

    with engine.engine.connect() as conn:
        headers = {r[0]: bytes(r[1]) for r in conn.execute(
            sa.text("SELECT ino, value FROM xattrs WHERE name = 'user.dgf.dicom'"))}
        read: dict[int, collections.Counter[tuple[object, ...]]] = collections.defaultdict(collections.Counter)
        for ino, path, text, num, first, item in conn.execute(sa.text(
                'SELECT v.ino, k.path, v.text, v.num, v."first", v.item FROM hindex v JOIN hkeys k ON k.id = v."key"')):
            read[ino][(path, text, num, bool(first), item)] += 1
        orphans = conn.execute(sa.text("SELECT count(*) FROM hmembers m WHERE NOT EXISTS "
                                       "(SELECT 1 FROM hsets s WHERE s.id = m.set_id)")).scalar_one()
        empty = conn.execute(sa.text("SELECT count(*) FROM hsets s WHERE NOT EXISTS "
                                     "(SELECT 1 FROM hmembers m WHERE m.set_id = s.id)")).scalar_one()
    want = {ino: collections.Counter(index.index_header(xml).rows) for ino, xml in headers.items()}
    return read == want and orphans == 0 and empty == 0


def engine_urls(tmp: Path) -> list[str]:
    return [f"sqlite:///{tmp / 'meta.db'}"]


class EngineContract:
    @pytest.fixture()
    def engine(self, tmp_path: Path) -> Iterator[MetaEngine]:
        raise NotImplementedError

    def test_create_files_makes_parents_and_is_idempotent(self, engine: MetaEngine) -> None:
        engine.add_patient_key("P1", b"wrapped")
        stats, released = engine.create_files([_file("/p/s/a.dcm"), _file("/p/s/b.dcm", "y")])
        assert [s.path for s in stats] == ["/p/s/a.dcm", "/p/s/b.dcm"] and released == {}
        engine.create_files([_file("/p/s/a.dcm")])  # same content again: no duplicate, no error
        assert [s.path for s in engine.readdir("/p/s")] == ["/p/s/a.dcm", "/p/s/b.dcm"]
        with pytest.raises(errors.AlreadyExists):
            engine.create_files([_file("/p/s/a.dcm", "other")])
        _, released = engine.create_files([_file("/p/s/a.dcm", "other")], replace=True)
        assert released == {_key("x"): {"site-a": 7}}
        assert engine.identity(_key("x")) is None and engine.identity(_key("other")) is not None

    def test_commit_rows_keep_every_byte_and_null(self, engine: MetaEngine) -> None:
        """A commit's rows go by the driver's bulk path (executemany; COPY on PostgreSQL): an
        attribute's every byte value, a sealed record with NUL and backslash bytes, an object
        with no seal (NULL) and one with a seal come back as they were sent."""
        every = bytes(range(256)) + b"\\N\t\n"
        engine.add_patient_key("P1", b"wrapped")
        plain = dataclasses.replace(_file("/b/plain.dcm", "p"), identity=b"\x00\\x\n" + every,
                                    xattrs={"user.dgf.dicom": b"<DicomHeader/>", "user.raw": every})
        sealed = dataclasses.replace(_file("/b/sealed.dcm", "s"), seal="00ff:1.2.3", stored_size=99)
        engine.create_files([plain, sealed])
        assert engine.getxattr("/b/plain.dcm", "user.raw") == every
        assert engine.identity(_key("p")) == ("P1", b"wrapped", b"\x00\\x\n" + every)
        assert engine.object_seals([_key("p"), _key("s")]) == {_key("s"): "00ff:1.2.3"}

    def test_identified_sizes_survive_an_upgrade(self, engine: MetaEngine) -> None:
        import sqlalchemy as sa

        engine.add_patient_key("P1", b"wrapped")
        engine.create_files([dataclasses.replace(_file("/id/a.dcm"), original_size=1234), _file("/id/b.dcm", "y")])
        assert engine.identified_sizes([_key("x"), _key("y"), _key("absent")]) == {_key("x"): 1234}
        # A database made before the column (and before schema revisions) existed gains it when a
        # newer metaserver opens it, and is stamped with the baseline revision.
        assert isinstance(engine, SqlEngine)
        with engine.engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE vault_identities DROP COLUMN size"))
            conn.execute(sa.text("DROP TABLE alembic_version"))
        again = SqlEngine(str(engine.engine.url.render_as_string(hide_password=False)))
        try:
            assert again.identified_sizes([_key("x")]) == {}
            assert again.schema_revision == migrate.head()
            again.create_files([dataclasses.replace(_file("/id/c.dcm", "z"), original_size=7)])
            assert again.identified_sizes([_key("z")]) == {_key("z"): 7}
        finally:
            again.close()

    def test_schema_revisions(self, engine: MetaEngine) -> None:
        import sqlalchemy as sa

        # A new database is at the newest revision; one a newer dgf wrote is refused, unchanged.
        assert isinstance(engine, SqlEngine)
        assert engine.schema_revision == migrate.head() == migrate.current(engine.engine)
        with engine.engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(errors.ServerError, match="newer dgf"):
            SqlEngine(str(engine.engine.url.render_as_string(hide_password=False)))
        assert migrate.current(engine.engine) == "9999"

    def test_revision_0002_takes_the_number_of_non_ascii_values_away(self, engine: MetaEngine) -> None:
        import sqlalchemy as sa

        # Indexed before 2026-11-30, '\u0663' (ARABIC-INDIC DIGIT THREE) was the number 3; XPath
        # says NaN.  Upgrading a database from revision 0001 drops such numbers, and only those.
        assert isinstance(engine, SqlEngine)
        xml = "<DicomHeader><SeriesNumber>\u0663</SeriesNumber><InstanceNumber>7</InstanceNumber>" \
              "<AcquisitionNumber>1\u00a0</AcquisitionNumber></DicomHeader>"
        engine.create_files([NewFile("/n/a.dcm", _key("n"), 1, "site-a", {"user.dgf.dicom": xml.encode()},
                                     "P1", b"sealed")])
        values = sa.text("SELECT text, num FROM hvalues WHERE text IN ('\u0663', '7', '1\u00a0')")
        with engine.engine.begin() as conn:
            assert dict(conn.execute(values).all()) == {"\u0663": None, "7": 7.0, "1\u00a0": None}
            conn.execute(sa.text("UPDATE hvalues SET num = 3 WHERE text = '\u0663'"))       # as written then
            conn.execute(sa.text("UPDATE hvalues SET num = 1 WHERE text = '1\u00a0'"))
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0001'"))
        again = SqlEngine(str(engine.engine.url.render_as_string(hide_password=False)))
        try:
            assert again.schema_revision == migrate.head()
            with again.engine.connect() as conn:
                assert dict(conn.execute(values).all()) == {"\u0663": None, "7": 7.0, "1\u00a0": None}
        finally:
            again.close()

    def test_revision_0004_reads_rows_indexed_before_and_downgrades_to_them(
            self, engine: MetaEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        import sqlalchemy as sa
        from alembic import command

        from metaserver import query, sqlindex

        def hdr(i: int) -> bytes:
            return (f"<DicomHeader><SeriesInstanceUID>1.2</SeriesInstanceUID><Modality>CT</Modality>"
                    f"<KVP>120</KVP><PatientSex>F</PatientSex><InstanceNumber>{i}</InstanceNumber>"
                    "</DicomHeader>").encode()

        def found(e: SqlEngine, expr: str) -> list[str]:
            q = query.prepare(expr, e.query_catalogue(), e.dialect, e.query_estimate)
            return sorted(r["path"] for r in query.run(e, q, "/", []))

        # A file per commit, none in a set, as every file was indexed before 0004 (so a file
        # alone in its commit does not look for another of its series); then the tables and
        # views of 0004 are taken away and the database marked 0003.
        assert isinstance(engine, SqlEngine)
        with monkeypatch.context() as before_0004:
            before_0004.setattr(sqlindex, "SIBLINGS_TRIED", 0)
            before_0004.setattr(sqlbase.SeriesFiles, "get", lambda self, series: None)
            for i in (1, 2):
                engine.create_files([NewFile(f"/v/{i}", _key(str(i)), 1, "site-a", {"user.dgf.dicom": hdr(i)})])
        with engine.engine.begin() as conn:
            for view in ("hsample", "hindex"):
                conn.execute(sa.text(f"DROP VIEW {view}"))
            for table in ("hmembers", "hshared", "hsets"):
                conn.execute(sa.text(f"DROP TABLE {table}"))
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0003'"))
        url = str(engine.engine.url.render_as_string(hide_password=False))
        again = SqlEngine(url)
        try:
            assert again.schema_revision == migrate.head()
            # Old rows read as before; a new series commit makes a set beside them.
            again.create_files([NewFile(f"/w/{i}", _key(f"w{i}"), 1, "site-a", {"user.dgf.dicom": hdr(i)})
                                for i in (3, 4, 5)])
            expr = "/DicomHeader[Modality='CT' and KVP >= 100 and PatientSex='F' and InstanceNumber != 4]"
            assert found(again, expr) == ["/v/1", "/v/2", "/w/3", "/w/5"]
            with again.engine.begin() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM hmembers")).scalar_one() == 3
                command.downgrade(migrate._config(conn), "0003")
                # Every row of the five headers (six each) is in hvalues again.
                assert conn.execute(sa.text("SELECT count(*) FROM hvalues")).scalar_one() == 5 * 6
                command.upgrade(migrate._config(conn), "head")
            assert found(again, expr) == ["/v/1", "/v/2", "/w/3", "/w/5"]
        finally:
            again.close()

    def test_a_series_set_goes_when_its_last_members_go_at_once(self, engine: MetaEngine) -> None:
        import threading

        import sqlalchemy as sa

        hdr = b"<DicomHeader><SeriesInstanceUID>1.9</SeriesInstanceUID><Modality>CT</Modality><KVP>80</KVP>" \
              b"<PatientSex>M</PatientSex></DicomHeader>"
        assert isinstance(engine, SqlEngine)
        for r in range(12):
            engine.create_files([NewFile(f"/c{r}/{n}", _key(f"{r}{n}"), 1, "site-a", {"user.dgf.dicom": hdr})
                                 for n in "ab"])
            barrier = threading.Barrier(2)

            def unlink(path: str, barrier: threading.Barrier) -> None:
                barrier.wait()
                engine.unlink(path)
            threads = [threading.Thread(target=unlink, args=(f"/c{r}/{n}", barrier)) for n in "ab"]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        with engine.engine.connect() as conn:
            assert [conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
                    for t in ("hsets", "hshared", "hmembers")] == [0, 0, 0]

    def test_a_header_committed_after_its_series_set_joins_it(self, engine: MetaEngine) -> None:
        from metaserver import query

        def ct(i: int, kvp: str = "120") -> bytes:
            return (f"<DicomHeader><SeriesInstanceUID>7.7</SeriesInstanceUID><Modality>CT</Modality>"
                    f"<KVP>{kvp}</KVP><InstanceNumber>{i}</InstanceNumber></DicomHeader>").encode()

        def found(expr: str) -> list[str]:
            assert isinstance(engine, SqlEngine)
            q = query.prepare(expr, engine.query_catalogue(), engine.dialect, engine.query_estimate)
            return sorted(r["path"] for r in query.run(engine, q, "/", []))

        def commit(*numbers: int, kvp: str = "120") -> None:
            engine.create_files([NewFile(f"/j/{i}", _key(f"j{i}"), 1, "site-a", {"user.dgf.dicom": ct(i, kvp)})
                                 for i in numbers])

        assert isinstance(engine, SqlEngine)
        commit(1, 2)                    # five rows each; four in common make a set
        for i in (3, 4):
            commit(i)                   # one image a commit, as DIMSE or STOW-RS store them
        # Another metaserver process over the same database reads the set's rows from it.
        other = SqlEngine(engine.engine.url.render_as_string(hide_password=False))
        try:
            other.create_files([NewFile("/j/5", _key("j5"), 1, "site-a", {"user.dgf.dicom": ct(5)})])
        finally:
            other.close()
        commit(6, kvp="80")             # lacks the set's kVp row: keeps all its rows
        assert _index_rows(engine) == {"hvalues": 5 + 5, "hshared": 4, "hmembers": 5, "hsets": 1}
        assert _index_matches_headers(engine)
        assert found("/DicomHeader[KVP = 120]") == [f"/j/{i}" for i in range(1, 6)]
        assert found("/DicomHeader[Modality = 'CT' and KVP >= 100 and InstanceNumber > 3]") == ["/j/4", "/j/5"]
        assert found("/DicomHeader[KVP < 100]") == ["/j/6"]
        engine.unlink("/j/1")
        engine.unlink("/j/2")
        assert _index_rows(engine)["hsets"] == 1          # the later members keep it
        assert found("/DicomHeader[KVP = 120]") == ["/j/3", "/j/4", "/j/5"]
        for i in (3, 4, 5):
            engine.unlink(f"/j/{i}")
        assert _index_rows(engine) == {"hvalues": 5, "hshared": 0, "hmembers": 0, "hsets": 0}

    def test_a_series_stored_one_file_a_commit_shares_its_rows_from_the_second_file(
            self, engine: MetaEngine) -> None:
        """As a copy into the mount or one instance per STOW-RS request store a series: the
        second file makes a set of the rows it shares with the first (found beside it in its
        directory), the next ones join it, and one that lacks a row of it but has the others
        makes a smaller one that the series goes on in."""
        from metaserver import query

        def ct(i: int, time: str = "101500") -> bytes:
            return (f"<DicomHeader><PatientID>P9</PatientID><StudyInstanceUID>9.1</StudyInstanceUID>"
                    f"<SeriesInstanceUID>9.1.1</SeriesInstanceUID><Modality>CT</Modality><KVP>120</KVP>"
                    f"<SliceThickness>1</SliceThickness><ContentTime>{time}</ContentTime>"
                    f"<InstanceNumber>{i}</InstanceNumber></DicomHeader>").encode()

        def found(expr: str) -> list[str]:
            assert isinstance(engine, SqlEngine)
            q = query.prepare(expr, engine.query_catalogue(), engine.dialect, engine.query_estimate)
            return sorted(r["path"] for r in query.run(engine, q, "/", []))

        assert isinstance(engine, SqlEngine)
        # Beside the series in its directory: a file of another series (never its sibling).
        engine.create_files([NewFile("/one/other", _key("o"), 1, "site-a", {"user.dgf.dicom": _hdr("MR", series="9.1.2")})])
        for i in range(1, 4):
            engine.create_files([NewFile(f"/one/{i}", _key(f"one{i}"), 1, "site-a", {"user.dgf.dicom": ct(i)})])
        # Nine rows each (the root's among them), eight in common: the second file's set of
        # eight, which the third joins; the first keeps its nine, the others one each.
        assert _index_rows(engine) == {"hvalues": 5 + 9 + 1 + 1, "hshared": 8, "hmembers": 2, "hsets": 1}
        # A later second: seven of the set's eight rows make a smaller set, which the next joins.
        for i in (4, 5):
            engine.create_files([NewFile(f"/one/{i}", _key(f"one{i}"), 1, "site-a",
                                         {"user.dgf.dicom": ct(i, "101501")})])
        assert _index_rows(engine) == {"hvalues": 5 + 9 + 1 + 1 + 2 + 2, "hshared": 8 + 7, "hmembers": 4,
                                       "hsets": 2}
        assert _index_matches_headers(engine)
        assert found("/DicomHeader[SeriesInstanceUID='9.1.1' and KVP >= 100]") == [f"/one/{i}" for i in range(1, 6)]
        assert found("/DicomHeader[ContentTime='101500' and InstanceNumber > 1]") == ["/one/2", "/one/3"]
        assert found("/DicomHeader[SeriesInstanceUID='9.1.2']") == ["/one/other"]
        for i in range(1, 6):
            engine.unlink(f"/one/{i}")
        assert _index_rows(engine) == {"hvalues": 5, "hshared": 0, "hmembers": 0, "hsets": 0}

    def test_a_series_spread_over_directories_one_file_a_commit_still_shares(self, engine: MetaEngine) -> None:
        """A series whose files land in different directories (``dgf_up --to`` puts them in one
        flat directory among other series' files) finds its earlier file through the process's
        memory of the files it indexed; another process, without that memory and with no file
        of the series beside the new one, keeps the new file's rows as they are."""
        def ct(i: int) -> bytes:
            return (f"<DicomHeader><SeriesInstanceUID>8.1</SeriesInstanceUID><Modality>CT</Modality>"
                    f"<KVP>120</KVP><Rows>512</Rows><InstanceNumber>{i}</InstanceNumber></DicomHeader>").encode()

        def commit(e: MetaEngine, i: int) -> None:
            e.create_files([NewFile(f"/far/d{i}/{i}", _key(f"far{i}"), 1, "site-a", {"user.dgf.dicom": ct(i)})])

        assert isinstance(engine, SqlEngine)
        commit(engine, 1)
        other = SqlEngine(engine.engine.url.render_as_string(hide_password=False))
        try:
            commit(other, 2)                  # knows no file of the series: all six rows its own
            assert _index_rows(engine) == {"hvalues": 6 + 6, "hshared": 0, "hmembers": 0, "hsets": 0}
            commit(engine, 3)                 # remembers file 1: their five rows in common, a set
            assert _index_rows(engine) == {"hvalues": 6 + 6 + 1, "hshared": 5, "hmembers": 1, "hsets": 1}
            commit(other, 4)                  # the set is in the index: it joins
        finally:
            other.close()
        assert _index_rows(engine) == {"hvalues": 6 + 6 + 1 + 1, "hshared": 5, "hmembers": 2, "hsets": 1}
        assert _index_matches_headers(engine)

    def test_estimates_read_every_set_of_the_sample_when_its_last_file_joined_an_old_one(
            self, engine: MetaEngine) -> None:
        import sqlalchemy as sa

        from metaserver.index import LAST_SET, sample_t

        def hdr(series: str, modality: str, i: int) -> dict[str, bytes]:
            return {"user.dgf.dicom": (f"<DicomHeader><SeriesInstanceUID>{series}</SeriesInstanceUID><Modality>"
                                       f"{modality}</Modality><KVP>90</KVP><Rows>5</Rows><InstanceNumber>{i}"
                                       "</InstanceNumber></DicomHeader>").encode()}

        def commit(*files: tuple[str, str, str, int]) -> None:
            engine.create_files([NewFile(p, _key(p), 1, "site-a", hdr(s, m, i)) for p, s, m, i in files])

        assert isinstance(engine, SqlEngine)
        commit(("/e/a1", "1", "CT", 1), ("/e/a2", "1", "CT", 2))      # set 1
        commit(("/e/b1", "2", "MR", 1), ("/e/b2", "2", "MR", 2))      # set 2
        commit(("/e/a3", "1", "CT", 3))                              # joins set 1
        commit(("/e/c1", "3", "US", 1))                              # past the sample
        # The sample (four files past the first) ends at /e/a3, a member of set 1; the MR files
        # before it are in set 2, which the estimate must still read.
        modality = engine.query_catalogue().keys["/DicomHeader/Modality"][0]
        v = sample_t.alias()
        for text, want in (("MR", 2), ("CT", 3), ("US", 0)):
            select = sa.select(v.c.ino).where(v.c.key == modality, v.c.text == text, v.c.set_id <= LAST_SET)
            assert engine.query_estimate(select, sample=4) == want

    def test_a_set_joined_while_its_last_member_goes_stays_whole_or_goes_whole(self, engine: MetaEngine) -> None:
        import threading

        def hdr(r: int, i: int) -> dict[str, bytes]:
            return {"user.dgf.dicom": (f"<DicomHeader><SeriesInstanceUID>8.{r}</SeriesInstanceUID><Modality>MR"
                                       f"</Modality><KVP>90</KVP><InstanceNumber>{i}</InstanceNumber>"
                                       "</DicomHeader>").encode()}

        assert isinstance(engine, SqlEngine)
        for r in range(12):
            engine.create_files([NewFile(f"/k{r}/{i}", _key(f"k{r}{i}"), 1, "site-a", hdr(r, i)) for i in (1, 2)])
            engine.unlink(f"/k{r}/1")
            barrier = threading.Barrier(2)

            def unlink(r: int = r, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                engine.unlink(f"/k{r}/2")

            def join(r: int = r, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                engine.create_files([NewFile(f"/k{r}/3", _key(f"k{r}3"), 1, "site-a", hdr(r, 3))])
            threads = [threading.Thread(target=unlink), threading.Thread(target=join)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        # Every file reads exactly its header's rows, and no set outlives its members or leaves one.
        assert _index_matches_headers(engine)
        tables = _index_rows(engine)
        assert tables["hmembers"] <= 12 and (tables["hsets"] == 0) == (tables["hmembers"] == 0)

    def test_the_revisions_build_the_tables_the_code_declares(self, engine: MetaEngine) -> None:
        # A table definition changed without a revision would show up here as a difference.
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        from metaserver import index, schema

        assert isinstance(engine, SqlEngine)
        with engine.engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), [schema.metadata, index.metadata])
        assert [d for d in diffs if not (d[0] == "remove_table" and d[1].name == "alembic_version")] == []

    def test_unlink_releases_unreferenced_objects_only(self, engine: MetaEngine) -> None:
        engine.create_files([_file("/a.dcm", "same"), _file("/b.dcm", "same")])
        engine.create_files([_file("/c.dcm", "same", gen=9)])        # stored again: a newer generation
        assert engine.unlink("/a.dcm") == {} and engine.unlink("/c.dcm") == {}
        # The generation released is the last one a receipt signed for (a delete of it keeps
        # bytes stored again since); a link, with no receipt, leaves it as it is.
        engine.create_files([dataclasses.replace(_file("/d.dcm", "same", gen=3), linked=True)])
        assert engine.unlink("/d.dcm") == {}
        assert engine.unlink("/b.dcm") == {_key("same"): {"site-a": 9}}
        assert engine.object_replicas([_key("same")]) == {_key("same"): []}

    def test_a_receipt_signed_before_a_release_gives_no_object_or_copy_back(self, engine: MetaEngine) -> None:
        # The release deletes generation 5 of the object at site-a; a receipt for it (kept by
        # a client, replayed) must not publish a name or record a copy with those bytes gone.
        engine.create_files([_file("/gone.dcm", "kept", gen=5), _file("/other.dcm", "other")])
        assert engine.unlink("/gone.dcm") == {_key("kept"): {"site-a": 5}}
        for gen in (5, 4):
            with pytest.raises(errors.PermissionDenied, match="deleted since it was signed"):
                engine.create_files([_file("/again.dcm", "kept", gen=gen), _file("/new.dcm", "new")])
        with pytest.raises(errors.NotFound):
            engine.stat("/new.dcm")                               # nothing of that commit
        engine.create_files([_file("/again.dcm", "kept", gen=6)])  # stored again since: published
        with pytest.raises(errors.PermissionDenied, match="deleted since it was signed"):
            engine.add_replica(_key("kept"), "site-a", 5)
        assert engine.add_replica(_key("kept"), "site-b", 5)       # another site's copy: not deleted
        assert engine.unlink("/again.dcm") == {_key("kept"): {"site-a": 6, "site-b": 5}}
        with pytest.raises(errors.PermissionDenied, match="site site-b .* deleted since"):
            engine.create_files([NewFile("/b.dcm", _key("kept"), 4, "site-b", {"user.dgf.dicom": b"<DicomHeader/>"},
                                         "P1", b"sealed", gens=(("site-b", 5),))])

    def test_a_receipt_for_a_copy_fsck_removes_records_nothing(self, engine: MetaEngine) -> None:
        # fsck trims an extra copy (or a drain moves one away): the record goes, then the bytes.
        # An upload of the same content stored it there just before (generation 5) and commits
        # after: that copy must not come back on record, its bytes being deleted.
        engine.create_files([_file("/x.dcm", "twice", gen=5)])
        assert engine.add_replica(_key("twice"), "site-b", 3)
        assert engine.drop_replica(_key("twice"), "site-a") and not engine.drop_replica(_key("twice"), "site-a")
        with pytest.raises(errors.PermissionDenied, match="site site-a .* deleted since"):
            engine.create_files([_file("/y.dcm", "twice", gen=5)])
        with pytest.raises(errors.PermissionDenied, match="deleted since"):
            engine.add_replica(_key("twice"), "site-a", 5)
        assert engine.object_replicas([_key("twice")]) == {_key("twice"): ["site-b"]}
        engine.create_files([_file("/y.dcm", "twice", gen=6)])           # stored again since: kept
        assert engine.object_replicas([_key("twice")]) == {_key("twice"): ["site-a", "site-b"]}
        # Orphans: refused while recorded there (nothing noted); otherwise their generations are.
        assert engine.note_orphans_deleted("site-a", [_key("twice"), _key("stray")], {_key("stray"): 4}) == {_key("twice")}
        engine.create_files([_file("/s.dcm", "stray", gen=4)])              # nothing was noted
        engine.unlink("/s.dcm")
        assert engine.note_orphans_deleted("site-b", [_key("lost")], {_key("lost"): 9}) == set()
        with pytest.raises(errors.PermissionDenied, match="site site-b .* deleted since"):
            engine.create_files([_file("/l.dcm", "lost", site="site-b", gen=9)])
        engine.create_files([_file("/l.dcm", "lost", site="site-b", gen=10)])

    def test_a_link_to_an_object_released_meanwhile_is_refused(self, engine: MetaEngine) -> None:
        # An upload checked that the archive holds this object and sends one more name for it,
        # no bytes; before its commit, an unlink freed the object, whose bytes the sites are
        # now deleting.  Publishing the name would point it at nothing.
        engine.create_files([_file("/a.dcm", "same"), _file("/keep.dcm", "kept")])
        assert engine.unlink("/a.dcm") == {_key("same"): {"site-a": 7}}
        with pytest.raises(errors.NotFound, match="removed meanwhile"):
            engine.create_files([dataclasses.replace(_file("/b.dcm", "same"), linked=True),
                                 dataclasses.replace(_file("/c.dcm", "kept"), linked=True)])
        with pytest.raises(errors.NotFound):
            engine.stat("/c.dcm")                          # nothing of the commit was published
        assert engine.object_replicas([_key("same")]) == {_key("same"): []}
        engine.create_files([dataclasses.replace(_file("/c.dcm", "kept"), linked=True)])
        assert engine.stat("/c.dcm").object_key == _key("kept")
        engine.create_files([_file("/b.dcm", "same", gen=8)])     # its bytes sent again: stored anew
        assert engine.object_replicas([_key("same")]) == {_key("same"): ["site-a"]}

    def test_reads_follow_tree_changes_made_by_another_process(self, engine: MetaEngine) -> None:
        # stat and readdir find the parent in a directory map; a tree changed by another
        # metaserver process over the same database must not leave them reading the old tree.
        assert isinstance(engine, SqlEngine)
        other = SqlEngine(str(engine.engine.url.render_as_string(hide_password=False)))
        try:
            engine.create_files([_file("/a/b/f.dcm", "1")])
            assert engine.stat("/a/b/f.dcm").size == 1 and [s.path for s in engine.readdir("/a/b")] == ["/a/b/f.dcm"]
            other.rename("/a/b", "/a/c")
            other.mkdir("/a/b")
            with pytest.raises(errors.NotFound):
                engine.stat("/a/b/f.dcm")
            assert engine.stat("/a/c/f.dcm").size == 1
            assert engine.readdir("/a/b") == [] and [s.path for s in engine.readdir("/a/c")] == ["/a/c/f.dcm"]
            with pytest.raises(errors.NotADirectory):
                engine.readdir("/a/c/f.dcm")
        finally:
            other.close()

    def test_new_directories_join_the_map_without_a_rebuild(self, engine: MetaEngine) -> None:
        # An upload into new series creates directories in most commits; the process that made
        # them learns them instead of rebuilding its map from every directory in the database.
        assert isinstance(engine, SqlEngine)
        engine.create_files([_file("/p1/s1/a.dcm", "1")])
        engine._read(engine._dir_paths)
        engine.create_files([_file("/p1/s2/b.dcm", "2"), _file("/p2/s1/c.dcm", "3")])
        learnt = engine._dirs
        assert learnt is not None and {"/p1/s2", "/p2", "/p2/s1"} <= set(learnt.values())
        engine._dirs = None
        assert engine._read(engine._dir_paths) == learnt            # what a rebuild finds
        assert engine.stat("/p2/s1/c.dcm").size == 1
        # Another process changed the tree in between: this one rebuilds rather than guess.
        other = SqlEngine(str(engine.engine.url.render_as_string(hide_password=False)))
        try:
            other.create_files([_file("/q/z.dcm", "4")])
            other.rename("/p1", "/p9")
            engine.create_files([_file("/p3/d.dcm", "5")])
            assert engine._dirs is None or "/q" in engine._dirs.values()
            assert engine.stat("/q/z.dcm").size == 1 and engine.stat("/p9/s2/b.dcm").size == 1
            paths = set(engine._read(engine._dir_paths).values())
            assert {"/q", "/p3", "/p9/s1"} <= paths and "/p1" not in paths
        finally:
            other.close()

    def test_moves_and_removals_join_the_map_without_a_rebuild(self, engine: MetaEngine) -> None:
        # mkdir, a directory's rename (its subtree with it; over an empty directory too), rmdir and
        # rm -r are learnt by the process that made them: a rebuild reads every directory in the
        # database (a second at 250,000, after each of them).  A file's rename leaves the tree.
        assert isinstance(engine, SqlEngine)
        engine.create_files([_file("/t/p1/s1/a.dcm", "1"), _file("/t/p1/s2/b.dcm", "2"),
                             _file("/t/p2/s1/c.dcm", "3")])
        engine._read(engine._dir_ids)
        steps = [
            (lambda: engine.mkdir("/t/p3"), {"/t/p3"}, set()),
            (lambda: engine.mkdir("/t/p4/s9", parents=True), {"/t/p4", "/t/p4/s9"}, set()),
            (lambda: engine.rename("/t/p1", "/t/p3/moved"), {"/t/p3/moved", "/t/p3/moved/s1", "/t/p3/moved/s2"},
             {"/t/p1", "/t/p1/s1", "/t/p1/s2"}),
            (lambda: engine.rename("/t/p2", "/t/p4/s9"), {"/t/p4/s9/s1"}, {"/t/p2", "/t/p2/s1"}),
            (lambda: engine.mkdir("/t/e"), {"/t/e"}, set()),
            (lambda: engine.rmdir("/t/e"), set(), {"/t/e"}),
            (lambda: engine.rmtree("/t/p3"), set(), {"/t/p3", "/t/p3/moved", "/t/p3/moved/s1", "/t/p3/moved/s2"}),
        ]
        expected = {"/", "/t", "/t/p1", "/t/p1/s1", "/t/p1/s2", "/t/p2", "/t/p2/s1"}
        for step, made, gone in steps:
            step()
            expected = (expected - gone) | made
            learnt, inverse = engine._dirs, engine._dir_ids_of
            assert learnt is not None and inverse is not None and inverse[0] is learnt   # learnt, not dropped
            assert set(learnt.values()) == expected and inverse[1] == {p: i for i, p in learnt.items()}
            engine._dirs = None
            assert engine._read(engine._dir_paths) == learnt                   # what a rebuild finds
            engine._read(engine._dir_ids)
        assert engine.stat("/t/p4/s9/s1/c.dcm").size == 1
        version = engine._read(lambda conn: conn.execute(Q_DIRS_VERSION).scalar())
        held = engine._dirs
        engine.rename("/t/p4/s9/s1/c.dcm", "/t/p4/s9/d.dcm")
        assert engine._read(lambda conn: conn.execute(Q_DIRS_VERSION).scalar()) == version
        assert engine._dirs is held and engine.stat("/t/p4/s9/d.dcm").size == 1

    def test_moves_find_their_subtree_from_each_directorys_directories(self, engine: MetaEngine) -> None:
        # A move visits the directories it moves, found from each directory's directories (kept
        # with the map from the first move on), not every directory's path: those must stay what
        # the map holds through moves, mkdir and rmdir learnt one after another, or a move would
        # leave a subdirectory at its old path.
        assert isinstance(engine, SqlEngine)
        other = SqlEngine(str(engine.engine.url.render_as_string(hide_password=False)))
        try:
            engine.create_files([_file("/k/p1/s1/a.dcm", "1"), _file("/k/p1/s2/b.dcm", "2"),
                                 _file("/k/p2/s1/c.dcm", "3")])
            steps = [
                lambda: engine.rename("/k/p1", "/k/p2/p1"),
                lambda: engine.mkdir("/k/p2/p1/s1/deep"),
                lambda: engine.rename("/k/p2", "/k/q"),
                lambda: engine.rmdir("/k/q/p1/s1/deep"),
                lambda: engine.mkdir("/k/q/p1/s3"),
                lambda: engine.rename("/k/q/p1/s3", "/k/s3"),
                lambda: engine.rename("/k/q/p1", "/k/p1"),
                lambda: engine.rmtree("/k/q"),
                lambda: engine.rename("/k/s3", "/k/p1/s3"),
            ]
            for n, step in enumerate(steps):
                step()
                dirs, kids = engine._dirs, engine._kids_of
                assert dirs is not None and kids is not None and kids[0] is dirs, n    # learnt, not rebuilt
                ids = engine._dir_ids_of
                assert ids is not None and ids[0] is dirs
                assert kids[1] == sqlbase._children(dirs, ids[1]), n
                other._dirs = None
                assert other._read(other._dir_paths) == dirs, n                       # what a rebuild finds
            assert set(engine._read(engine._dir_ids)) == {"/", "/k", "/k/p1", "/k/p1/s1", "/k/p1/s2", "/k/p1/s3"}
            assert engine.stat("/k/p1/s2/b.dcm").size == 1
        finally:
            other.close()

    def test_another_process_replays_tree_changes_and_rebuilds_only_past_what_is_kept(
            self, engine: MetaEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        # Several metaserver processes may serve one database.  Each files its changes of the tree
        # under the version they move it to; the others replay them into their maps instead of
        # rebuilding from every directory, unless the changes they missed are no longer kept.
        from metaserver import sqlbase

        assert isinstance(engine, SqlEngine)
        other = SqlEngine(str(engine.engine.url.render_as_string(hide_password=False)))
        rebuilds: list[int | None] = []
        rebuilt = other._rebuilt_dirs

        def counted(conn, version):  # type: ignore[no-untyped-def]
            rebuilds.append(version)
            return rebuilt(conn, version)

        monkeypatch.setattr(other, "_rebuilt_dirs", counted)
        try:
            engine.create_files([_file("/r/p1/s1/a.dcm", "1"), _file("/r/p1/s2/b.dcm", "2")])
            assert other.stat("/r/p1/s1/a.dcm").size == 1 and len(rebuilds) == 1
            engine.create_files([_file("/r/p2/s1/c.dcm", "3")])
            engine.mkdir("/r/p3")
            engine.rename("/r/p1", "/r/p3/moved")
            engine.mkdir("/r/e")
            engine.rmdir("/r/e")
            engine.rmtree("/r/p2")
            engine.rename("/r/p3/moved/s2/b.dcm", "/r/p3/moved/s2/d.dcm")   # a file: no change of the tree
            assert other.stat("/r/p3/moved/s2/d.dcm").size == 1 and len(rebuilds) == 1
            for gone in ("/r/p1/s1/a.dcm", "/r/p2", "/r/e"):
                with pytest.raises(errors.NotFound):
                    other.stat(gone)
            assert set(other._read(other._dir_ids)) == {"/", "/r", "/r/p3", "/r/p3/moved", "/r/p3/moved/s1",
                                                         "/r/p3/moved/s2"}
            assert len(rebuilds) == 1 and other._read(other._dir_ids) == engine._read(engine._dir_ids)
            # Only the last DIR_CHANGES_KEPT versions are kept: a process further behind rebuilds.
            monkeypatch.setattr(sqlbase, "DIR_CHANGES_KEPT", 3)
            monkeypatch.setattr(sqlbase, "DIR_CHANGES_PRUNE", 1)
            for n in range(5):
                engine.mkdir(f"/r/k{n}")
            with engine.engine.connect() as conn:
                kept = conn.execute(sa.select(sa.func.count()).select_from(dir_changes)).scalar()
            assert kept == 3
            assert other.stat("/r/k4").is_dir and len(rebuilds) == 2
            assert other._read(other._dir_ids) == engine._read(engine._dir_ids)
            engine.mkdir("/r/k5")
            assert other.stat("/r/k5").is_dir and len(rebuilds) == 2
        finally:
            other.close()

    def test_two_processes_making_the_same_directories_at_once_both_succeed(self, engine: MetaEngine) -> None:
        # Two uploads into the same new study through two metaserver processes make the same
        # directories at the same moment.  The one whose check came before the other's commit
        # met a unique key (an internal error); it now retries, finds the directory and uses it.
        def step(e: SqlEngine, rng: random.Random, seed: int, n: int) -> None:
            path = rng.choice([f"/w/{a}/{b}" for a in "abcd" for b in "xyz"])
            action = rng.choice(["mkdir -p", "mkdir", "file", "stat"])
            if action == "mkdir -p":
                e.mkdir(path, parents=True)
            elif action == "mkdir":
                e.mkdir(path.rsplit("/", 1)[0] + f"/m{n % 3}")
            elif action == "file":
                e.create_files([_file(f"{path}/s{n % 2}/f{seed}-{n}.dcm", f"{seed}-{n}")])
            else:
                e.stat(path)

        assert isinstance(engine, SqlEngine)
        # Refused only because the other made it first, or has not yet.
        with _two_processes_at_once(engine, step, (errors.AlreadyExists, errors.NotFound), 60, (1, 2)) as judge:
            assert len(judge._read(judge._dir_ids)) > 20
            assert {s.path for s in judge.readdir("/w/a/x")} <= {"/w/a/x/s0", "/w/a/x/s1"}

    def test_two_processes_adding_removing_and_moving_at_once_leave_every_entry_reachable(
            self, engine: MetaEngine) -> None:
        # One process removes or moves directories while another adds under them, or moves the
        # other way.  A removal that checked a directory before an upload added to it, or two
        # moves each putting a directory under the other, left files no path reaches.  Every
        # entry must stay reachable from the root.
        def step(e: SqlEngine, rng: random.Random, seed: int, n: int) -> None:
            names = [f"/w/{a}" for a in "abc"] + [f"/w/{a}/{b}" for a in "abc" for b in "xy"]
            src, dst = rng.choice(names), rng.choice(names)
            action = rng.choice(["mkdir", "mkdir", "file", "file", "rename", "rmdir", "rmtree"])
            if action == "mkdir":
                e.mkdir(src, parents=True)
            elif action == "file":
                e.create_files([_file(f"{src}/f{seed}-{n}.dcm", f"{seed}-{n}")])
            elif action == "rename":
                e.rename(src, dst)
            elif action == "rmdir":
                e.rmdir(src)
            else:
                e.rmtree(src)

        assert isinstance(engine, SqlEngine)
        # Any refusal by name is the tree deciding; anything else fails the test.
        with _two_processes_at_once(engine, step, (errors.DgfError,), 80, (3, 4)) as judge:
            reached, stack = 0, ["/"]
            while stack:
                entries = judge.readdir(stack.pop())
                reached += len(entries)
                stack.extend(s.path for s in entries if s.is_dir)
            with judge.engine.connect() as conn:
                stored = conn.execute(sa.select(sa.func.count()).select_from(inodes)).scalar()
            assert reached == stored - 1                     # every entry but the root

    def test_names_linked_while_their_object_is_released_are_refused_or_keep_it(self, engine: MetaEngine) -> None:
        # Two processes link new names to stored objects (uploads of an instance stored
        # before) and unlink names, from two threads.  An unlink that saw an object's last name
        # go released it while a link in the other transaction added one: the new name led to
        # bytes the sites were deleting; and two unlinks of one name both succeeded, each
        # releasing its object.  A released object must have no name ever after, and is
        # released once.
        contents = [f"{'k' if i % 2 else 'o'}{i}" for i in range(12)]
        released: list[str] = []

        def step(e: SqlEngine, rng: random.Random, seed: int, n: int) -> None:
            if rng.random() < 0.6:
                e.create_files([dataclasses.replace(_file(f"/w/{seed}-{n}.dcm", rng.choice(contents)),
                                                    linked=True)])
            else:
                # The first names of half the objects stay: the archive is never emptied.
                names = [s.path for d in ("/o", "/w") for s in e.readdir(d) if not s.path.startswith("/o/k")]
                if names:
                    released.extend(e.unlink(rng.choice(names)))

        assert isinstance(engine, SqlEngine)
        engine.create_files([_file(f"/o/{c}.dcm", c) for c in contents])
        # Refused by name only: a name the other unlinked first, a link to a released object.
        with _two_processes_at_once(engine, step, (errors.NotFound,), 120, (5, 6)) as judge:
            named = {s.object_key for d in ("/o", "/w") for s in judge.readdir(d)}
            assert released and named                   # both sides of the race were run
            assert named.isdisjoint(released)
            assert len(released) == len(set(released))  # each object released once
            held = judge.object_replicas(sorted(named))
            assert all(held[k] == ["site-a"] for k in named)

    def test_the_map_learns_new_directories_in_place_while_readers_walk_it(self, engine: MetaEngine) -> None:
        # Learning a commit's directories costs what the commit made, not a copy of the whole map
        # (a copy was 17.5 ms of a 200-file commit at 240,000 directories); a query under a
        # subtree, which walks the map, meanwhile never meets it changing under it.
        assert isinstance(engine, SqlEngine)
        engine.create_files([_file(f"/g/p{i}/s/a.dcm", str(i)) for i in range(3000)])
        engine._read(engine._dir_paths)
        stop, failed = threading.Event(), []

        def walk() -> None:
            while not stop.is_set():
                try:
                    list(engine.query_candidates("/g", None, False))
                    engine._dir_ids_of = None            # the inverse map, rebuilt by walking
                    engine._read(engine._dir_ids)
                except Exception as exc:               # noqa: BLE001 - reported below
                    failed.append(exc)
                    return

        reader = threading.Thread(target=walk)
        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)                     # threads switch often: a race shows
        reader.start()
        try:
            for n in range(40):
                engine.create_files([_file(f"/g/q{n}/s{k}/b.dcm", f"{n}-{k}") for k in range(20)])
        finally:
            stop.set()
            reader.join()
            sys.setswitchinterval(switch)
        assert failed == []
        # (The reader, seeing a commit's tree version before this thread learnt it, may have
        # rebuilt the map meanwhile.)  With no reader, a commit's directories join the same map.
        dirs = engine._read(engine._dir_paths)
        engine.create_files([_file(f"/g/r/s{k}/c.dcm", f"r-{k}") for k in range(20)])
        assert engine._dirs is dirs and {"/g/r", "/g/r/s19", "/g/q39/s19"} <= set(dirs.values())
        assert engine._read(engine._dir_ids)["/g/r/s19"] == next(i for i, p in dirs.items() if p == "/g/r/s19")
        engine._dirs = None
        assert engine._read(engine._dir_paths) == dirs              # what a rebuild finds

    def test_a_commit_makes_every_missing_directory_once_or_refuses_it_whole(self, engine: MetaEngine) -> None:
        # A commit into many new series makes their directories depth by depth; each is made
        # once, links its parent, joins the directory map, and holds its files.  An entry of
        # another kind in the way refuses the whole commit, by name, with nothing made.
        assert isinstance(engine, SqlEngine)
        engine.create_files([_file("/x/old/a.dcm", "1"), _file("/x/blocker", "2")])
        engine.create_files([_file("/x/old/b.dcm", "3"), _file("/x/new1/s1/c.dcm", "4"),
                             _file("/x/new1/s2/d.dcm", "5"), _file("/x/new2/s1/e.dcm", "6"),
                             _file("/x/new1/s1/f.dcm", "7"), _file("/top.dcm", "8")])
        assert engine.stat("/x").nlink == 2 + 3 and engine.stat("/x/new1").nlink == 2 + 2
        assert engine.stat("/x/new2/s1").is_dir and engine.stat("/x/new2/s1").nlink == 2
        assert [s.path for s in engine.readdir("/x/new1/s1")] == ["/x/new1/s1/c.dcm", "/x/new1/s1/f.dcm"]
        assert [s.path for s in engine.readdir("/x/old")] == ["/x/old/a.dcm", "/x/old/b.dcm"]
        assert engine.stat("/top.dcm").size == 1
        learnt = engine._dirs
        engine._dirs = None
        assert learnt is not None and engine._read(engine._dir_paths) == learnt
        with pytest.raises(errors.NotADirectory, match="/x/blocker exists and is not a directory"):
            engine.create_files([_file("/x/new3/g.dcm", "9"), _file("/x/blocker/h.dcm", "10")])
        with pytest.raises(errors.NotFound):
            engine.stat("/x/new3")
        assert engine.stat("/x").nlink == 5 and engine._read(engine._dir_paths) == learnt
        # A file and, below it, another file of the same commit: refused by name in either
        # order, in a new directory or an old one (one order used to fail inside the INSERT).
        for parent in ("/x/new4", "/x/old"):
            for pair in ([f"{parent}/y", f"{parent}/y/z.dcm"], [f"{parent}/y/s/z.dcm", f"{parent}/y"]):
                with pytest.raises(errors.NotADirectory, match=f"{parent}/y is both a file and a directory"):
                    engine.create_files([_file(p, str(n + 11)) for n, p in enumerate(pair)])
        with pytest.raises(errors.NotFound):
            engine.stat("/x/new4")
        assert [s.path for s in engine.readdir("/x/old")] == ["/x/old/a.dcm", "/x/old/b.dcm"]
        assert engine.stat("/x").nlink == 5 and engine._read(engine._dir_paths) == learnt

    def test_a_commit_larger_than_one_statement_gives_every_entry_its_own_inode(self, engine: MetaEngine) -> None:
        """New inodes go in as multi-row INSERTs of at most 3,333 rows each, their ids matched
        back by (parent, name): in a commit of 3,500 files over 3,400 new directories, every
        file and directory gets a distinct inode, its own name, size and place."""
        assert isinstance(engine, SqlEngine)
        files = [_file(f"/big/d{i % 3400:04d}/f{i:04d}.dcm", str(i)) for i in range(3500)]
        files = [dataclasses.replace(f, size=i + 1) for i, f in enumerate(files)]
        stats, _ = engine.create_files(files)
        assert len({s.ino for s in stats}) == 3500
        assert [(s.path, s.size) for s in stats] == [(f.path, f.size) for f in files]
        again = {s.path: s for s in (engine.stat(f.path) for f in files)}
        assert all(again[s.path].ino == s.ino and again[s.path].size == s.size for s in stats)
        dirs = engine.readdir("/big")
        assert len(dirs) == 3400 and len({d.ino for d in dirs} | {s.ino for s in stats}) == 6900
        assert [s.path for s in engine.readdir("/big/d0007")] == ["/big/d0007/f0007.dcm", "/big/d0007/f3407.dcm"]
        assert engine.stat("/big").nlink == 2 + 3400

    def test_the_replicas_question_reads_only_directories_that_have_an_answer(self, engine: MetaEngine) -> None:
        import sqlalchemy as sa

        from metaserver.schema import REPLICAS_XATTR

        assert isinstance(engine, SqlEngine)
        engine.create_files([_file("/r/a.dcm", "1"), _file("/r/b/c.dcm", "2")])
        engine._dirs = None
        assert engine.replication_overrides() == {} and engine._dirs is None     # no map needed
        engine.setxattr("/r/b", REPLICAS_XATTR, b"3")
        assert engine.replication_overrides() == {"/r/b": 3}
        if engine.is_sqlite:
            with engine.engine.connect() as conn:
                plan = conn.execute(sa.text("EXPLAIN QUERY PLAN SELECT ino, value FROM xattrs "
                                            "WHERE xattrs.name = 'user.dgf.replicas'")).all()
            assert "ix_xattrs_replicas" in " ".join(str(r[-1]) for r in plan), plan

    def test_upload_facts_are_what_the_single_reads_give(self, engine: MetaEngine) -> None:
        """An upload's placement reads sites, settings and replication numbers in one
        transaction: the same as each read alone, settings not set left out."""
        from dgf.types import Site
        from metaserver.schema import REPLICAS_XATTR

        engine.register_site(Site("site-b", "127.0.0.1", 2, "ssh-ed25519 BBBB", "z2", False))
        engine.register_site(Site("site-a", "127.0.0.1", 1, "ssh-ed25519 AAAA", "", False))
        engine.set_site_trust("site-b", True)
        engine.set_setting("sites.draining", '["site-a"]')
        engine.set_setting("access.mode", "grants")
        engine.create_files([_file("/f/a/x.dcm", "1")])
        engine.setxattr("/f/a", REPLICAS_XATTR, b"2")
        facts = engine.upload_facts(("sites.draining", "replication.mode", "access.mode"))
        assert facts.sites == engine.sites() and [s.name for s in facts.sites] == ["site-a", "site-b"]
        assert facts.sites[1].untrusted and facts.sites[1].zone == "z2"
        assert facts.settings == {"sites.draining": '["site-a"]', "access.mode": "grants"}
        assert facts.overrides == engine.replication_overrides() == {"/f/a": 2}

    def test_rename_semantics(self, engine: MetaEngine) -> None:
        engine.mkdir("/d1")
        engine.mkdir("/d2")
        engine.create_files([_file("/d1/f", "1"), _file("/d2/g", "2")])
        engine.rename("/d1/f", "/d2/g")  # replaces the file atomically
        assert [s.path for s in engine.readdir("/d2")] == ["/d2/g"]
        assert engine.stat("/d2/g").object_key == _key("1")
        with pytest.raises(errors.UsageError):
            engine.rename("/d1", "/d1/inside")
        engine.mkdir("/d1/sub")
        engine.rename("/d1", "/d2/moved")
        assert engine.stat("/d2").nlink == 3
        assert engine.stat("/d2/moved/sub").is_dir
        with pytest.raises(errors.IsADirectory):
            engine.rename("/d2/g", "/d2/moved")

    def test_xattrs_and_scan(self, engine: MetaEngine) -> None:
        engine.create_files([_file("/x/1.dcm", "a"), _file("/y/2.dcm", "b")])
        engine.setxattr("/x/1.dcm", "user.tag", b"v")
        assert engine.getxattr("/x/1.dcm", "user.tag") == b"v"
        assert engine.listxattr("/x/1.dcm") == ["user.dgf.dicom", "user.tag"]
        with pytest.raises(errors.UsageError):
            engine.setxattr("/x/1.dcm", "trusted.x", b"v")
        assert [p for _, p, _, _ in engine.query_candidates("/", None, True)] == ["/x/1.dcm", "/y/2.dcm"]
        assert [p for _, p, _, x in engine.query_candidates("/y", None, True)] == ["/y/2.dcm"]
        assert [p for p, _, _ in engine.walk_files("/x/1.dcm")] == ["/x/1.dcm"]
        # Named files in one query per directory, directories walked, in the order asked.
        engine.create_files([_file("/x/3.dcm", "c")])
        walked = list(engine.walk_files_many(["/x/1.dcm", "/x/3.dcm", "/y"]))
        assert [(p, k) for p, k, _ in walked] == [("/x/1.dcm", _key("a")), ("/x/3.dcm", _key("c")), ("/y/2.dcm", _key("b"))]
        with pytest.raises(errors.NotFound):
            list(engine.walk_files_many(["/x/1.dcm", "/x/nope.dcm"]))

    def test_principals_sites_audit(self, engine: MetaEngine) -> None:
        p = Principal("alice", "clinician", "ssh-ed25519 AAAA", "SHA256:abc")
        engine.add_principal(p)
        with pytest.raises(errors.AlreadyExists):
            engine.add_principal(p)
        assert engine.principal_by_fingerprint("SHA256:abc") == p
        engine.remove_principal("alice")
        assert engine.principal_by_fingerprint("SHA256:abc") is None
        engine.audit("bob", "identity.release", "/a", "refused")
        assert engine.audit_log(1)[0]["outcome"] == "refused"

    def test_erase_patient_destroys_key_and_records(self, engine: MetaEngine) -> None:
        engine.add_patient_key("P1", b"wrapped")
        engine.create_files([_file("/e.dcm", "e")])
        assert engine.erase_patient("P1") == 1
        assert engine.patient_key("P1") is None and engine.identity(_key("e")) is None

    def test_audit_commits_with_its_action_or_not_at_all(self, engine: MetaEngine) -> None:
        engine.create_files([NewFile("/au/1", "a" * 64, 1, "s", {})])
        with pytest.raises(errors.NotFound):
            with engine.audited("alice", "delete", "/au/missing", released="unlinked"):
                engine.unlink("/au/missing")            # failed: no record claims it happened
        with engine.audited("alice", "delete", "/au/1", released="unlinked"):
            engine.unlink("/au/1")
        engine.audit("bob", "whoami", "-", "ok")         # outside the context: its own transaction
        # A later audited action that released nothing claims no release: what the unlink's
        # transaction noted on its pooled connection stays with it.
        engine.create_files([NewFile("/au/2", "c" * 64, 1, "s", {})])
        with engine.audited("carol", released="replaced by rename"):
            engine.rename("/au/2", "/au/3")
        assert [(e["principal"], e["action"], e["target"]) for e in engine.audit_log(10)] == [
            ("bob", "whoami", "-"), ("alice", "object.release", "a" * 64), ("alice", "delete", "/au/1")]

    def test_quarantined_replicas_are_not_offered_and_a_fresh_receipt_heals(self, engine: MetaEngine) -> None:
        engine.create_files([NewFile("/q/1", "b" * 64, 1, "s1", {})])
        assert engine.set_replica_state("s1", ["b" * 64], "quarantined") == 1
        assert engine.object_replicas(["b" * 64]) == {"b" * 64: []}
        assert engine.replica_states("b" * 64) == [("s1", "quarantined")]
        engine.create_files([NewFile("/q/1", "b" * 64, 1, "s1", {}, blocks=b"\1" * 64)])
        assert engine.object_replicas(["b" * 64]) == {"b" * 64: ["s1"]}
        assert engine.object_blocks(["b" * 64, "c" * 64]) == {"b" * 64: b"\1" * 64}

    def test_xattr_quota_is_per_principal(self, engine: MetaEngine) -> None:
        engine.create_files([NewFile("/x/1", "d" * 64, 1, "s", {})])
        engine.setxattr("/x/1", "user.a", b"1" * 60, owner="alice", quota=(10, 100))
        engine.setxattr("/x/1", "user.a", b"2" * 60, owner="alice", quota=(10, 100))   # replaced, not added
        with pytest.raises(errors.LimitExceeded, match="xattr_bytes_per_principal"):
            engine.setxattr("/x/1", "user.b", b"3" * 60, owner="alice", quota=(10, 100))
        engine.setxattr("/x/1", "user.b", b"3" * 60, owner="bob", quota=(10, 100))
        engine.removexattr("/x/1", "user.a")
        engine.setxattr("/x/1", "user.c", b"4" * 60, owner="alice", quota=(10, 100))   # freed by the removal

    def test_paths_are_validated(self, engine: MetaEngine) -> None:
        for bad in ("relative", "/a/../b", "/" + "n" * 300):
            with pytest.raises(errors.UsageError):
                engine.stat(bad)
        with pytest.raises(errors.UsageError):
            engine.rmdir("/")


def _norm_path_by_parts(path: str) -> str:
    """norm_path as it reads every path, by its parts (the shortcut for normal paths aside)."""
    from metaserver.engine import MAX_NAME, MAX_PATH

    if not path.startswith("/"):
        raise errors.UsageError("relative")
    if len(path) > MAX_PATH or "\0" in path:
        raise errors.UsageError("long or NUL")
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts or any(len(p.encode()) > MAX_NAME for p in parts):
        raise errors.UsageError("'..' or a long name")
    return "/" + "/".join(parts)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(["/", ".", "..", "a", "b.dcm", "\u00e9", "\0", "x" * 120, "y" * 255, "\u20ac" * 80]),
                max_size=8))
def test_norm_path_takes_normal_paths_as_they_are_and_normalises_or_refuses_the_rest(pieces: list[str]) -> None:
    from metaserver.engine import norm_path

    path = "/" + "".join(pieces)
    try:
        want: str | type[Exception] = _norm_path_by_parts(path)
    except errors.UsageError:
        want = errors.UsageError
    if want is errors.UsageError:
        with pytest.raises(errors.UsageError):
            norm_path(path)
    else:
        assert norm_path(path) == want


def test_the_set_rows_kept_in_memory_are_bounded_by_rows() -> None:
    from metaserver.sqlbase import SetRows

    kept = SetRows()
    big = frozenset(range(SetRows.LIMIT // 2))
    kept.add({1: big})
    kept.add({2: big})
    assert kept.get(1) is big and kept.get(2) is big
    kept.add({3: frozenset(range(10))})          # over the limit: what was kept goes
    assert kept.get(1) is None and kept.get(2) is None and kept.get(3) == frozenset(range(10))


def test_sqlite_binds_none_bools_and_bytes_as_before(tmp_path: Path) -> None:
    """The engine's sqlite3 adapters (which skip the module's slow adaptation protocol) bind the
    values sqlite3 bound without them: NULL, integers 1 and 0, blobs; and the index's flags and
    missing numbers read back as such."""
    import sqlite3

    e = SqlEngine(f"sqlite:///{tmp_path / 'meta.db'}")
    try:
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE t (a, b, c, d)")
        conn.execute("INSERT INTO t VALUES (?, ?, ?, ?)", (None, True, b"\x00xy", False))
        assert conn.execute("SELECT typeof(a), b, typeof(b), c, typeof(c), d FROM t").fetchall() == [
            ("null", 1, "integer", b"\x00xy", "blob", 0)]
        e.create_files([NewFile("/b/a.dcm", _key("a"), 1, "site-a", {"user.dgf.dicom": b"<DicomHeader><Modality>CT"
                                                                       b"</Modality></DicomHeader>"})])
        with e.engine.connect() as c:
            rows = c.exec_driver_sql("SELECT typeof(num), typeof(first), first FROM hindex").all()
        assert ("null", "integer", 1) in rows and all(r[1] == "integer" for r in rows)
    finally:
        e.close()


def test_commits_pause_the_cycle_collector_and_resume_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit runs with the cycle collector off (its rows would make it traverse them again
    and again); it is back on afterwards, after a refused commit too, stays off for a caller
    that had turned it off, and stays off until the last of two overlapping commits ends."""
    import gc
    import threading

    from metaserver import engine as engine_mod

    e = SqlEngine(f"sqlite:///{tmp_path / 'meta.db'}")
    seen: list[bool] = []
    real = e._do_create_files

    def spy(files: list[NewFile], replace: bool) -> object:
        seen.append(gc.isenabled())
        return real(files, replace)

    monkeypatch.setattr(e, "_do_create_files", spy)
    try:
        assert gc.isenabled()
        e.add_patient_key("P1", b"wrapped")
        e.create_files([_file("/gc/a.dcm")])
        assert seen == [False] and gc.isenabled()
        with pytest.raises(errors.AlreadyExists):
            e.create_files([_file("/gc/a.dcm", "other")])
        assert seen == [False, False] and gc.isenabled()
        gc.disable()
        e.create_files([_file("/gc/b.dcm", "y")])
        assert not gc.isenabled()
        gc.enable()
    finally:
        gc.enable()
        e.close()
    # Two threads' commits overlap: the first to end must not turn the collector back on.
    entered, release_first, first_done = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with engine_mod.collector_paused:
            entered.set()
            release_first.wait(10)
        first_done.set()

    t = threading.Thread(target=first)
    t.start()
    assert entered.wait(10)
    with engine_mod.collector_paused:
        release_first.set()
        assert first_done.wait(10)
        assert not gc.isenabled()
    t.join(10)
    assert gc.isenabled()
    # Commits that overlap without end: one ending after LONGEST_S of the pause collects the
    # cycles made meanwhile, though the collector stays paused for the others.
    import weakref

    class Node:
        ref: object = None

    monkeypatch.setattr(engine_mod.collector_paused, "LONGEST_S", 0.0)
    with engine_mod.collector_paused:
        with engine_mod.collector_paused:
            a, b = Node(), Node()
            a.ref, b.ref = b, a              # a cycle: reference counting cannot free it
            gone = weakref.ref(a)
            del a, b
            assert gone() is not None
        assert gone() is None and not gc.isenabled()
    assert gc.isenabled()


class TestSqliteEngine(EngineContract):
    @pytest.fixture()
    def engine(self, tmp_path: Path) -> Iterator[MetaEngine]:
        e = SqlEngine(f"sqlite:///{tmp_path / 'meta.db'}")
        yield e
        e.close()


_databases = itertools.count()


class TestPostgresEngine(EngineContract):
    """The same contract on a real PostgreSQL server (a fresh database per test)."""

    @pytest.fixture()
    def engine(self, postgres: PostgresServer) -> Iterator[MetaEngine]:
        e = SqlEngine(postgres.create_database(f"contract{next(_databases)}"))
        yield e
        e.close()

    def test_an_upload_committing_while_fsck_notes_orphans_waits_for_it(self, engine: MetaEngine) -> None:
        # fsck has found bytes at site-a that the archive does not record (an upload stored them
        # and has not committed yet) and, in one transaction, checks that and notes their
        # generation.  The upload commits in between, in another transaction: under READ
        # COMMITTED neither sees the other's row, so the copy would be recorded and then its
        # bytes deleted.  The commit must wait for fsck's note and be refused instead.
        # (The pause after fsck's check is injected; the race is real, on a real server.)
        assert isinstance(engine, SqlEngine)
        engine.mkdir("/up")
        checked, go_on = threading.Event(), threading.Event()
        check = engine._recorded_at

        def paused(conn: sa.Connection, site: str, keys: list[str]) -> set[str]:
            found = check(conn, site, keys)
            checked.set()
            assert go_on.wait(30)
            return found
        engine._recorded_at = paused  # type: ignore[method-assign]
        outcome: dict[str, object] = {}

        def fsck() -> None:
            outcome["fsck"] = engine.note_orphans_deleted("site-a", [_key("racing")], {_key("racing"): 7})

        def upload() -> None:
            try:
                engine.create_files([_file("/up/r.dcm", "racing", gen=7)])
                outcome["upload"] = "published"
            except errors.DgfError as exc:
                outcome["upload"] = exc
        _second_waits(engine, fsck, upload, checked, go_on, "the commit did not wait for fsck's note")
        assert outcome["fsck"] == set()                         # an orphan when checked: noted
        assert isinstance(outcome["upload"], errors.PermissionDenied)
        assert "deleted since it was signed" in str(outcome["upload"])
        with pytest.raises(errors.NotFound):
            engine.stat("/up/r.dcm")
        assert engine.object_replicas([_key("racing")]) == {_key("racing"): []}

    def test_a_drain_dropping_a_copy_a_commit_records_waits_for_it(self, engine: MetaEngine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        # An upload stored the same bytes at site-a again (the site kept them: same generation)
        # and has checked its receipt; before it records the copy, a drain or fsck's trim drops
        # site-a's copy of that object and notes the generation, to delete its bytes next.  The
        # drop must wait for the commit and take the copy it recorded too, not leave a record of
        # bytes about to go.  (The pause in the commit is injected.)
        assert isinstance(engine, SqlEngine)
        engine.create_files([_file("/x.dcm", "twice", gen=5)])
        assert engine.add_replica(_key("twice"), "site-b", 3)
        checked, go_on = threading.Event(), threading.Event()
        refuse = sql._refuse_released

        def paused(conn: sa.Connection, copies: list[tuple[str, str, str, int]]) -> None:
            refuse(conn, copies)
            checked.set()
            assert go_on.wait(30)
        monkeypatch.setattr(sql, "_refuse_released", paused)
        outcome: dict[str, object] = {}

        def upload() -> None:
            engine.create_files([_file("/y.dcm", "twice", gen=5)])
            outcome["upload"] = "published"

        def drain() -> None:
            outcome["drop"] = engine.drop_replica(_key("twice"), "site-a")
        _second_waits(engine, upload, drain, checked, go_on, "the drop did not wait for the commit")
        assert outcome == {"upload": "published", "drop": True}
        assert engine.stat("/y.dcm").object_key == _key("twice")
        assert engine.object_replicas([_key("twice")]) == {_key("twice"): ["site-b"]}


def _second_waits(engine: SqlEngine, first: Callable[[], None], second: Callable[[], None],
                  paused: threading.Event, go_on: threading.Event, why: str) -> None:
    """Run ``first`` in a thread until it pauses (sets ``paused``), then ``second`` in another:
    ``second`` must come to wait on an advisory lock (PostgreSQL's pg_locks says so) rather
    than finish.  Then ``first`` goes on (``go_on``) and both are waited for."""
    threads = [threading.Thread(target=first, daemon=True), threading.Thread(target=second, daemon=True)]
    waiting = sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    try:
        threads[0].start()
        assert paused.wait(30)
        threads[1].start()
        with engine.engine.connect() as conn:
            for _ in range(500):
                if not threads[1].is_alive() or conn.execute(waiting).scalar():
                    break
                time.sleep(0.02)
        assert threads[1].is_alive(), why
    finally:
        go_on.set()
        for t in threads:
            t.join(30)


NAMES = st.sampled_from(["a", "b", "c"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))


class NamespaceModel(RuleBasedStateMachine):
    """Random mkdir/create/rename/unlink/rmdir against SqlEngine and a dict of path -> kind."""

    url = "sqlite"

    @initialize()
    def setup(self) -> None:
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        url = f"sqlite:///{self.tmp.name}/m.db"
        if self.url == "postgresql":
            url = _PG[0].create_database(f"model{next(_databases)}")
        self.engine = SqlEngine(url)
        # A second metaserver process over the same database, which only reads: it replays the
        # first one's changes of the tree into its directory map, and never rebuilds it.
        self.other = SqlEngine(url)
        self.other_rebuilds = 0
        rebuilt = self.other._rebuilt_dirs

        def counted(conn, version):  # type: ignore[no-untyped-def]
            self.other_rebuilds += 1
            return rebuilt(conn, version)
        self.other._rebuilt_dirs = counted  # type: ignore[method-assign]
        self.model: dict[str, str] = {"/": "d"}
        self.stores = itertools.count(1)     # each upload's store stamps a new generation

    def teardown(self) -> None:
        self.engine.close()
        self.other.close()
        self.tmp.cleanup()

    def _parent(self, path: str) -> str:
        return path.rsplit("/", 1)[0] or "/"

    def _expect(self, fn, expected_error):  # type: ignore[no-untyped-def]
        try:
            fn()
        except errors.DgfError as exc:
            assert type(exc) is expected_error, f"got {type(exc).__name__}, model says {expected_error}"
            return False
        assert expected_error is None, f"expected {expected_error.__name__}"
        return True

    def _parent_error(self, path: str) -> type[errors.DgfError] | None:
        parent = self._parent(path)
        walked = ""
        for part in [p for p in parent.split("/") if p]:
            walked += "/" + part
            kind = self.model.get(walked)
            if kind is None:
                return errors.NotFound
            if kind != "d":
                return errors.NotADirectory
        return None

    @rule(path=PATHS)
    def mkdir(self, path: str) -> None:
        err = self._parent_error(path) or (errors.AlreadyExists if path in self.model else None)
        if self._expect(lambda: self.engine.mkdir(path), err):
            self.model[path] = "d"

    @rule(path=PATHS)
    def create(self, path: str) -> None:
        err = self._parent_error(path)
        if err is errors.NotFound:
            err = None  # create_files makes parents
            for i in range(1, path.count("/")):
                p = "/".join(path.split("/")[:i + 1])
                if self.model.get(p) == "f":
                    err = errors.NotADirectory
                    break
        if err is None and self.model.get(path) == "d":
            err = errors.IsADirectory
        if self._expect(lambda: self.engine.create_files([_file(path, path, gen=next(self.stores))], replace=True),
                        err):
            parts = path.split("/")
            for i in range(2, len(parts)):
                self.model.setdefault("/".join(parts[:i]), "d")
            self.model[path] = "f"

    @rule(path=PATHS)
    def unlink(self, path: str) -> None:
        kind = self.model.get(path)
        err = self._parent_error(path) or (errors.NotFound if kind is None else
                                            errors.IsADirectory if kind == "d" else None)
        if self._expect(lambda: self.engine.unlink(path), err):
            del self.model[path]

    @rule(path=PATHS)
    def rmdir(self, path: str) -> None:
        kind = self.model.get(path)
        children = [p for p in self.model if p.startswith(path + "/")]
        err = self._parent_error(path) or (errors.NotFound if kind is None else
                                            errors.NotADirectory if kind == "f" else
                                            errors.DirectoryNotEmpty if children else None)
        if self._expect(lambda: self.engine.rmdir(path), err):
            del self.model[path]

    @rule(src=PATHS, dst=PATHS)
    def rename(self, src: str, dst: str) -> None:
        skind, dkind = self.model.get(src), self.model.get(dst)
        err = self._parent_error(src) or (errors.NotFound if skind is None else None)
        if err is None and (dst + "/").startswith(src + "/") and dst != src:
            err = errors.UsageError
        if err is None and dst != src:
            err = self._parent_error(dst)
            if err is None and dkind is not None:
                if skind == "d" and dkind == "f":
                    err = errors.NotADirectory
                elif skind == "f" and dkind == "d":
                    err = errors.IsADirectory
                elif dkind == "d" and any(p.startswith(dst + "/") for p in self.model):
                    err = errors.DirectoryNotEmpty
        if self._expect(lambda: self.engine.rename(src, dst), err) and src != dst:
            moved = {p: k for p, k in self.model.items() if p == src or p.startswith(src + "/")}
            for p in list(self.model):
                if p == dst or p.startswith(dst + "/"):
                    del self.model[p]
            for p in moved:
                del self.model[p]
            for p, k in moved.items():
                self.model[dst + p[len(src):]] = k

    @rule(path=PATHS)
    def rmtree(self, path: str) -> None:
        kind = self.model.get(path)
        err = self._parent_error(path) or (errors.NotFound if kind is None else
                                            errors.NotADirectory if kind == "f" else None)
        if self._expect(lambda: self.engine.rmtree(path), err):
            for p in [p for p in self.model if p == path or p.startswith(path + "/")]:
                del self.model[p]

    @rule(data=st.data())
    def move_or_remove_what_exists(self, data: st.DataObject) -> None:
        # Drawn from the paths the model holds (directories, mostly): random paths rarely name
        # a directory to move, and moves are what the directory map must learn right.
        existing = sorted(p for p in self.model if p != "/")
        dirs = [p for p in existing if self.model[p] == "d"]
        if not existing:
            return
        action = data.draw(st.sampled_from(["rename", "rename", "rename", "rmtree", "rmdir"]))
        src = data.draw(st.sampled_from(dirs if dirs and action != "rmtree" else existing))
        if action == "rename":                   # to a name in a directory that exists
            into = data.draw(st.sampled_from(["/", *dirs]))
            self.rename(src, ("" if into == "/" else into) + "/" + data.draw(NAMES))
        else:
            getattr(self, action)(src)

    @invariant()
    def map_is_what_a_rebuild_finds(self) -> None:
        # The directory map learns each committed change of the tree instead of being rebuilt
        # (SqlBase._learn_dirs); what it learnt, and its inverse, must be what a rebuild reads.
        if not hasattr(self, "engine"):
            return
        held, held_ids, version = self.engine._dirs, self.engine._dir_ids_of, self.engine._dirs_version
        kids = self.engine._kids_of
        if held is None:
            return
        self.engine._dirs = None
        assert self.engine._read(self.engine._dir_paths) == held
        if held_ids is not None and held_ids[0] is held:
            assert held_ids[1] == {p: i for i, p in held.items()}
        if kids is not None and kids[0] is held:
            # Each directory's directories, by which a move finds what it moves.
            assert held_ids is not None and held_ids[0] is held
            assert kids[1] == sqlbase._children(held, held_ids[1])
        self.engine._dirs, self.engine._dir_ids_of, self.engine._dirs_version = held, held_ids, version
        self.engine._kids_of = kids

    @invariant()
    def another_process_replays_the_changes(self) -> None:
        if not hasattr(self, "engine"):
            return
        ids = self.other._read(self.other._dir_ids)
        assert set(ids) == {p for p, kind in self.model.items() if kind == "d"}
        assert ids == self.engine._read(self.engine._dir_ids)
        assert self.other_rebuilds == 1                     # the first build only

    @invariant()
    def same_tree(self) -> None:
        if not hasattr(self, "engine"):
            return
        seen: dict[str, str] = {"/": "d"}
        stack = ["/"]
        while stack:
            d = stack.pop()
            for s in self.engine.readdir(d):
                seen[s.path] = "d" if s.is_dir else "f"
                if s.is_dir:
                    stack.append(s.path)
                    subdirs = sum(1 for p, k in self.model.items() if k == "d" and self._parent(p) == s.path
                                  and p != "/")
                    assert s.nlink == 2 + subdirs
        assert seen == self.model


TestNamespaceModel = NamespaceModel.TestCase
TestNamespaceModel.settings = settings(max_examples=40, stateful_step_count=20, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])


class NamespaceModelPostgres(NamespaceModel):
    url = "postgresql"


_PG: list[PostgresServer] = []


@pytest.fixture()
def _pg_for_model(postgres: PostgresServer) -> Iterator[None]:
    _PG[:] = [postgres]
    yield


@pytest.mark.usefixtures("_pg_for_model")
class TestNamespaceModelPostgres(NamespaceModelPostgres.TestCase):  # type: ignore[name-defined,misc]
    settings = settings(max_examples=15, stateful_step_count=15, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])
