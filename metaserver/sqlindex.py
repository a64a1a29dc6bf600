"""The header index's storage: the rows metaserver/index.py derives from each XML header, the
catalogue of indexed paths, candidate scans for the query planner, and saved queries."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from lxml import etree
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from dgf import errors
from metaserver import index
from metaserver.index import LAST_SET, keys_t, levels_t, members_t, own_t, sets_t, shared_t
from metaserver.planner import Catalogue, load_catalogue
from metaserver.schema import (
    inodes,
    queries_t,
    xattrs,
)
from metaserver.sqlbase import DirMade, SqlBase, join_path

#: How long a query's estimates reuse their sample's bounds (HeaderIndexStore._sample_bounds).
SAMPLE_BOUNDS_S = 2.0
#: Files beside a header alone in its series looked at for one of that series, and directories
#: looked in per commit (_siblings).
SIBLINGS_TRIED = 8
SIBLING_DIRS = 64


class HeaderIndexStore(SqlBase):
    """The header index, written in the namespace's transactions and read by the planner."""

    _bounds: tuple[int, float, int | None, int | None] | None = None

    def _unindex(self, conn: Connection, inos: list[int]) -> None:
        """Remove files' index rows; a series set left without members goes with its last one."""
        left: set[int] = set()
        for i in range(0, len(inos), 500):
            chunk = inos[i:i + 500]
            conn.execute(own_t.delete().where(own_t.c.ino.in_(chunk)))
            sets = sorted(set(conn.execute(sa.select(members_t.c.set_id).where(members_t.c.ino.in_(chunk)))
                              .scalars()))
            if sets:
                # Locked before their members go (PostgreSQL; SQLite has one writer): two
                # commits removing a set's last two members would otherwise each see the
                # other's member still there, and neither would remove the set.
                conn.execute(sa.select(sets_t.c.id).where(sets_t.c.id.in_(sets)).order_by(sets_t.c.id)
                             .with_for_update())
                left.update(sets)
            conn.execute(members_t.delete().where(members_t.c.ino.in_(chunk)))
            conn.execute(levels_t.delete().where(levels_t.c.ino.in_(chunk)))
        ids = sorted(left)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            alive = set(conn.execute(sa.select(members_t.c.set_id).where(members_t.c.set_id.in_(chunk))
                                     .distinct()).scalars())
            gone = [s for s in chunk if s not in alive]
            if gone:
                conn.execute(shared_t.delete().where(shared_t.c.set_id.in_(gone)))
                conn.execute(sets_t.delete().where(sets_t.c.id.in_(gone)))

    @staticmethod
    def _parsed(xml: bytes) -> index.HeaderIndex:
        """A header's index rows, computed before its transaction: a commit holds the database's
        write lock (SQLite's, and ours around it) only for the inserts, not for lxml and the walk."""
        try:
            return index.index_header(xml)
        except (ValueError, etree.XMLSyntaxError) as exc:
            raise errors.UsageError(f"an XML header is not well-formed ({exc}).") from exc

    def _index(self, conn: Connection, indexed: list[tuple[int, index.HeaderIndex]]) -> None:
        """Insert the index rows of parsed headers (:meth:`_parsed`) in the caller's transaction:
        the rows a series has in common once per set, the rest per file (metaserver/index.py)."""
        if not indexed:
            return
        ids = self._key_id_map(conn, set().union(*(h.keys for _, h in indexed)),
                               set().union(*(h.long_keys for _, h in indexed)),
                               set().union(*(h.multi_keys for _, h in indexed)))
        existing = self._stored_sets(conn, {h.series for _, h in indexed})
        count = collections.Counter(h.series for _, h in indexed)
        lone = {ino: h.series for ino, h in indexed if h.series and count[h.series] == 1 and h.series not in existing}
        own, shared, joined = index.share(indexed, existing, self._siblings(conn, lone) if lone else None)
        # The hot inserts (dozens of rows per header) skip SQLAlchemy's per-row processing.
        # Rows go in header by header, unsorted: sorting them by (key, text) cost ~0.4 us a row
        # and made SQLite's inserts no cheaper (the (ino, ...) index then took them at random).
        self._bulk(conn, "hvalues", ("key", "text", "ino", "item", "num", "first"),
                   [(ids[k], t, ino, i, n, f) for ino, (k, t, n, f, i) in own])
        if shared:
            # One multi-row INSERT ... RETURNING, ids matched by series (one set a series in a
            # commit): asking for parameter order makes SQLAlchemy insert row by row on SQLite.
            ids_by_series = {r.series: r.id for r in conn.execute(
                sets_t.insert().returning(sets_t.c.series, sets_t.c.id), [{"series": s.series} for s in shared])}
            made = [ids_by_series[s.series] for s in shared]
            self._bulk(conn, "hshared", ("key", "text", "set_id", "item", "num", "first"),
                       [(ids[k], t, sid, i, n, f) for s, sid in zip(shared, made) for k, t, n, f, i in s.rows])
            joined.extend((sid, ino) for s, sid in zip(shared, made) for ino in s.inos)
            # Once committed, the next commits of these series find the sets' rows in memory.
            conn.info.setdefault("dgf.after", {}).setdefault("sets", {}).update(
                {sid: frozenset(s.rows) for s, sid in zip(shared, made)})
        if joined:
            self._bulk(conn, "hmembers", ("set_id", "ino"), joined)
        conn.info.setdefault("dgf.after", {}).setdefault("series", {}).update(
            {h.series: ino for ino, h in indexed if h.series})
        self._bulk(conn, levels_t.name, ("ino", "patient", "study", "series"),
                   [(ino, h.patient, h.study, h.series) for ino, h in indexed])

    def _stored_sets(self, conn: Connection, series: set[str]) -> dict[str, tuple[int, frozenset[index.Row]]]:
        """The newest stored set of each of ``series``, with its rows, for headers to join
        (index.share).  A set's rows never change, so they are read once and kept in memory
        (``_set_rows``); which sets exist is read in this transaction."""
        names = sorted(series)
        latest: dict[str, int] = {}
        for i in range(0, len(names), 500):
            latest.update((r[0], r[1]) for r in conn.execute(
                sa.select(sets_t.c.series, sa.func.max(sets_t.c.id))
                .where(sets_t.c.series.in_(names[i:i + 500])).group_by(sets_t.c.series)))
        if not latest:
            return {}
        ids = sorted(latest.values())
        if not self.is_sqlite:
            # Locked until this commit ends, against one removing the sets' last members
            # (_unindex locks them for update): a set joined here is not gone when its new
            # members are written.  A set removed meanwhile is not returned.  SQLite has one writer.
            alive: set[int] = set()
            for i in range(0, len(ids), 500):
                alive.update(conn.execute(sa.select(sets_t.c.id).where(sets_t.c.id.in_(ids[i:i + 500]))
                                          .order_by(sets_t.c.id).with_for_update(read=True)).scalars())
            latest = {s: i for s, i in latest.items() if i in alive}
        # Sets this transaction made are read from its own record of them, and kept in memory
        # only once it commits (SqlBase._txn): a rolled-back set's id may be given again.
        made = conn.info.get("dgf.after", {}).get("sets", {})
        known = self._set_rows
        rows = {i: got for i in latest.values() if (got := made.get(i) or known.get(i)) is not None}
        missing = sorted(set(latest.values()) - rows.keys())
        if missing:
            stored: dict[int, list[tuple[int, str, float | None, bool, int]]] = {i: [] for i in missing}
            for i in range(0, len(missing), 500):
                for r in conn.execute(sa.select(shared_t.c.set_id, shared_t.c.key, shared_t.c.text, shared_t.c.num,
                                                shared_t.c.first, shared_t.c.item)
                                      .where(shared_t.c.set_id.in_(missing[i:i + 500]))):
                    stored[r[0]].append((r[1], r[2], r[3], bool(r[4]), r[5]))
            paths = self._key_paths(conn, {k for got in stored.values() for k, *_ in got})
            loaded = {i: frozenset((paths[k], t, n, f, item) for k, t, n, f, item in got) for i, got in stored.items()}
            known.add(loaded)
            rows.update(loaded)
        return {s: (i, rows[i]) for s, i in latest.items()}

    def _siblings(self, conn: Connection, lone: dict[int, str]) -> dict[str, frozenset[index.Row]]:
        """Every index row of one stored header of each series of ``lone`` (a header of this
        commit alone in its series, which has no set -> that series): the file of the series
        this process indexed last, or else one beside the header in its directory, where the
        archive's layout puts a series' files (the index has no lookup by series; the namespace
        has one by directory).  Such a header's rows are all its own: a series without a set
        has no members.  A few statements a commit, however many headers are alone: a
        radiograph's series is one image, and each such commit has nothing to find."""
        found = self._series_of(conn, {s: [i] for s in lone.values() if (i := self._series_files.get(s)) is not None})
        rest = {ino: series for ino, series in lone.items() if series not in found}
        if rest:
            made = {c.ino for c in conn.info.get("dgf.after", {}).get("tree", ()) if isinstance(c, DirMade)}
            inos = sorted(rest)
            parents: dict[int, int] = {}
            for i in range(0, len(inos), 500):
                parents.update((r[0], r[1]) for r in conn.execute(
                    sa.select(inodes.c.id, inodes.c.parent).where(inodes.c.id.in_(inos[i:i + 500]))))
            near: dict[int, list[int]] = {}
            # Directories made by this commit hold only its own files.
            for parent in sorted(set(parents.values()) - made)[:SIBLING_DIRS]:
                near[parent] = list(conn.execute(sa.select(inodes.c.id).where(
                    inodes.c.parent == parent, inodes.c.is_dir.is_(False)).limit(SIBLINGS_TRIED)).scalars())
            tried = {series: [i for i in near.get(parents.get(ino, -1), ()) if i != ino] for ino, series in rest.items()}
            found.update(self._series_of(conn, tried))
        if not found:
            return {}
        stored: dict[int, list[tuple[int, str, float | None, bool, int]]] = {i: [] for i in found.values()}
        for r in conn.execute(sa.select(own_t.c.ino, own_t.c.key, own_t.c.text, own_t.c.num, own_t.c.first,
                                        own_t.c.item).where(own_t.c.ino.in_(sorted(stored)))):
            stored[r[0]].append((r[1], r[2], r[3], bool(r[4]), r[5]))
        paths = self._key_paths(conn, {k for got in stored.values() for k, *_ in got})
        return {series: frozenset((paths[k], t, n, f, item) for k, t, n, f, item in stored[ino])
                for series, ino in found.items()}

    @staticmethod
    def _series_of(conn: Connection, wanted: Mapping[str, Sequence[int]]) -> dict[str, int]:
        """For each series, the first of its candidate files that the index has in that series."""
        inos = sorted({i for c in wanted.values() for i in c})
        of: dict[int, str] = {}
        for i in range(0, len(inos), 500):
            of.update((r[0], r[1]) for r in conn.execute(
                sa.select(levels_t.c.ino, levels_t.c.series).where(levels_t.c.ino.in_(inos[i:i + 500]))))
        return {s: found for s, c in wanted.items() if (found := next((i for i in c if of.get(i) == s), None)) is not None}

    def _key_paths(self, conn: Connection, ids: set[int]) -> dict[int, str]:
        """The catalogue's paths of key ``ids`` (those this process does not know, read)."""
        paths = {v: k for k, v in self._key_ids.items()}
        unknown = ids - paths.keys()
        if unknown:
            paths.update({r.id: r.path for r in conn.execute(
                sa.select(keys_t.c.id, keys_t.c.path).where(keys_t.c.id.in_(sorted(unknown))))})
        return paths

    def _key_id_map(self, conn: Connection, paths: set[str], long_paths: set[str],
                    multi_paths: set[str]) -> dict[str, int]:
        """Catalogue ids for ``paths``, adding new ones in this transaction.  The in-process
        cache learns them only from rows read back, so a rolled-back insert leaves no trace."""
        missing = paths - self._key_ids.keys()
        out = {p: self._key_ids[p] for p in paths - missing}
        if missing:
            conn.execute(self._insert_ignore(keys_t), [{"path": p, "has_long": False, "multi": False}
                                                       for p in sorted(missing)])
            for r in conn.execute(sa.select(keys_t.c.id, keys_t.c.path).where(keys_t.c.path.in_(missing))):
                out[r.path] = r.id
        if long_paths:
            conn.execute(keys_t.update().where(keys_t.c.path.in_(long_paths)).values(has_long=True))
        flagged = multi_paths - self._multi
        if flagged:
            conn.execute(keys_t.update().where(keys_t.c.path.in_(flagged)).values(multi=True))
            conn.info.setdefault("dgf.after", {}).setdefault("multi", set()).update(flagged)
        if missing:
            conn.info.setdefault("dgf.after", {}).setdefault("keys", {}).update({p: out[p] for p in missing})
        return out

    def catalogue(self, conn: Connection) -> Catalogue:
        """The catalogue of indexed paths, reloaded when it has grown or changed."""
        stamp = conn.execute(sa.select(sa.func.count(), sa.func.sum(sa.cast(keys_t.c.has_long, sa.Integer)),
                                       sa.func.sum(sa.cast(keys_t.c.multi, sa.Integer)))
                             .select_from(keys_t)).one()
        version = hash(tuple(stamp))
        if self._catalogue is None or self._catalogue[0] != version:
            cat = load_catalogue(conn)
            self._catalogue = (version, cat)
            self._key_ids.update({p: i for p, (i, _) in cat.keys.items()})
        return self._catalogue[1]

    @contextlib.contextmanager
    def _deadline(self, conn: Connection, deadline: float | None) -> Iterator[None]:
        """Interrupt the database's own work past ``deadline`` (a time.monotonic() value)."""
        if deadline is None:
            yield
            return
        if self.is_sqlite:
            raw = conn.connection.driver_connection
            raw.set_progress_handler(lambda: time.monotonic() > deadline, 20000)  # type: ignore[union-attr]
            try:
                yield
            finally:
                raw.set_progress_handler(None, 0)  # type: ignore[union-attr]
            return
        ms = max(1, int((deadline - time.monotonic()) * 1000))
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
        yield

    def query_candidates(self, root: str, plan: sa.Select[Any] | None, with_xml: bool, deadline: float | None = None,
                         after: int = 0, batch: int = 2000) -> Iterator[tuple[int, str, tuple[str, str, str], bytes | None]]:
        """Stream (ino, path, (patient, study, series), XML or None) of the indexed files at or
        under ``root`` whose inode is selected by ``plan`` (a select of inos; None: all) and is
        above ``after``, in inode order (keyset pagination resumes after the last one seen),
        fetched ``batch`` rows at a time: a short page does not read 2000 headers ahead."""
        try:
            with self._connect() as conn, self._deadline(conn, deadline):
                top = self._resolve(conn, root)
                dirs = self._dir_paths(conn)
                cols = [inodes.c.id, inodes.c.parent, inodes.c.name, levels_t.c.patient, levels_t.c.study,
                        levels_t.c.series]
                joined = inodes.join(levels_t, levels_t.c.ino == inodes.c.id)
                if with_xml:
                    cols.append(xattrs.c.value)
                    joined = joined.join(xattrs, sa.and_(xattrs.c.ino == inodes.c.id,
                                                         xattrs.c.name == index.HEADER_XATTR))
                query = sa.select(*cols).select_from(joined)
                # Always, 0 too: without a bound on the inode SQLite read every header (the
                # xattrs table first) and sorted them before the first row (0.1 s at 10,000).
                query = query.where(inodes.c.id > after)
                if plan is not None:
                    query = query.where(inodes.c.id.in_(plan))
                allowed: set[int] | None = None
                if not top.is_dir:
                    query = query.where(inodes.c.id == top.id)
                elif root != "/":
                    with self._dirs_lock:            # the map may be growing (_learn_dirs)
                        every = dict(dirs)           # a copy in C: the lock is held briefly
                    allowed = {i for i, p in every.items() if p == root or p.startswith(root + "/")}
                rows = conn.execution_options(stream_results=True, yield_per=batch).execute(
                    query.order_by(inodes.c.id))
                for row in rows:
                    if allowed is not None and row.parent not in allowed:
                        continue
                    parent = dirs.get(row.parent)
                    if parent is None:                 # created after the map was built
                        self._dirs = None
                        dirs = self._dir_paths(conn)
                        parent = dirs.get(row.parent)
                        if parent is None:             # removed meanwhile
                            continue
                    yield (row.id, join_path(parent, row.name), (row.patient, row.study, row.series),
                           bytes(row.value) if with_xml else None)
        except OperationalError as exc:
            if "interrupt" in str(exc).lower():
                raise errors.QueryTimeout("the query ran past its time limit; narrow the expression.") from exc
            raise
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) == "57014":
                raise errors.QueryTimeout("the query ran past its time limit; narrow the expression.") from exc
            raise

    def query_count(self, plan: sa.Select[Any] | None) -> int:
        """How many indexed files ``plan`` selects, archive-wide (exact plans only)."""
        source: Any = sa.select(levels_t.c.ino) if plan is None else plan
        counted: Any = sa.select(sa.func.count()).select_from(source.subquery())

        def run(conn: Connection) -> int:
            return int(conn.execute(counted).scalar_one())
        return self._read(run)

    def query_estimate(self, select: sa.Select[Any], sample: int = 20_000) -> int:
        """Rows ``select`` (of inos) returns among the first ``sample`` indexed files: a cheap,
        proportional selectivity estimate the planner uses to pick the driving predicate."""
        def run(conn: Connection) -> int:
            bound, last = self._sample_bounds(conn, sample)
            query = select if bound is None else select.where(list(select.selected_columns)[0] <= bound)
            params = {LAST_SET.key: 2**31 - 1 if bound is None else (last or 0)}      # set ids are int4
            return int(conn.execute(sa.select(sa.func.count()).select_from(query.subquery()), params).scalar_one())
        return self._read(run)

    def _sample_bounds(self, conn: Connection, sample: int) -> tuple[int | None, int | None]:
        """The last file of an estimate's sample (None: the archive is smaller than the sample)
        and the newest series set of a file in it, which estimates read sets up to (LAST_SET): a
        file may join a set made long before it.  Each is a scan of the sample's index entries
        (~1 ms for 20,000), so a query's estimates share them for a few seconds; an estimate
        only picks the driving term, so one from a sample a few commits old is as good."""
        now = time.monotonic()
        kept = self._bounds
        if kept is not None and kept[0] == sample and now - kept[1] < SAMPLE_BOUNDS_S:
            return kept[2], kept[3]
        bound = conn.execute(sa.select(levels_t.c.ino).order_by(levels_t.c.ino).limit(1).offset(sample)).scalar()
        # "+ 0": the maximum is taken over the sample's entries of the ino index, not by walking
        # the primary key down from the newest set, past every set made after the sample.
        last = None if bound is None else conn.execute(
            sa.select(sa.func.max(members_t.c.set_id + 0)).where(members_t.c.ino <= bound)).scalar()
        self._bounds = (sample, now, bound, last)
        return bound, last

    def query_catalogue(self) -> Catalogue:
        return self._read(self.catalogue)

    @property
    def dialect(self) -> str:
        return "sqlite" if self.is_sqlite else "postgresql"

    def save_query(self, name: str, xpath: str, owner: str) -> None:
        def run(conn: Connection) -> None:
            conn.execute(queries_t.delete().where(queries_t.c.name == name))
            conn.execute(queries_t.insert().values(name=name, xpath=xpath, owner=owner, created=time.time()))
        self._txn(run)

    def saved_query_count(self, owner: str) -> int:
        return int(self._read(lambda c: c.execute(sa.select(sa.func.count()).select_from(queries_t).where(
            queries_t.c.owner == owner)).scalar_one()))

    def saved_queries(self) -> dict[str, str]:
        return self._read(lambda c: {r.name: r.xpath for r in c.execute(
            sa.select(queries_t.c.name, queries_t.c.xpath).order_by(queries_t.c.name))})

    def remove_query(self, name: str) -> None:
        def run(conn: Connection) -> None:
            if conn.execute(queries_t.delete().where(queries_t.c.name == name)).rowcount == 0:
                raise errors.NotFound(f"no saved query named {name!r}.")
        self._txn(run)
