"""The SQLAlchemy implementation of :class:`MetaEngine` (SQLite by default, PostgreSQL for scale):
the namespace (inodes, files, xattrs, objects and their replicas) over the header index
(:mod:`metaserver.sqlindex`) and the administrative tables (:mod:`metaserver.sqladmin`), both
on :mod:`metaserver.sqlbase`.

Every write goes through :meth:`SqlEngine._txn`, one transaction with retry on conflict; reads use
a plain connection.  SQLite runs in WAL mode with writers serialised in-process, so readers never
wait for a batch commit.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from dgf import errors
from dgf.types import Stat
from metaserver import index
from metaserver.engine import RECEIPT_TTL_S, MetaEngine, NewFile, Released, norm_path
from metaserver.index import keys_t, values_t
from metaserver.schema import (
    REPLICAS_XATTR,
    identities,
    inodes,
    object_blocks,
    objects,
    released_gens,
    repairs,
    replicas,
    xattr_owners,
    xattrs,
)
from metaserver.sqladmin import AdminStore
from metaserver.sqlbase import (
    EXCLUSIVE,
    IGNORE,
    Q_CHILDREN,
    Q_CHILDREN_NAMED,
    SHARED,
    U_FILE,
    U_MTIME,
    U_NLINK,
    DirGone,
    DirMade,
    DirMoved,
    InodeRow,
    inserted_id,
    join_path,
    slices,
    stat_of,
    stats_of,
    tree_changed,
)
from metaserver.sqlindex import HeaderIndexStore

__all__ = ["REPLICAS_XATTR", "SqlEngine"]


# up.check runs these for every batch: built once, like the hot statements in sqlbase (a profile
# of an ingest put SQLAlchemy's per-call construction here at up to a seventh of the
# metaserver's samples; the metaserver's CPU per file did not move measurably, 1.3 ms either way).
_Q_HEALTHY = sa.select(replicas.c.key, replicas.c.site).where(
    replicas.c.key.in_(sa.bindparam("b_keys", expanding=True)), replicas.c.state == "ok")
_Q_VERSIONS = sa.select(values_t.c.text, inodes.c.parent, inodes.c.name).join(
    inodes, inodes.c.id == values_t.c.ino).where(
    values_t.c.key == sa.bindparam("b_key"), values_t.c.item == 0,
    values_t.c.text.in_(sa.bindparam("b_uids", expanding=True)))

#: The columns of a new inode, in the order commits give them (_bulk_returning).
_NEW_INODE = ("parent", "name", "is_dir", "mode", "size", "nlink", "mtime", "ctime", "object_key")


def _refuse_files_as_parents(paths: set[str], parents: Iterable[str]) -> None:
    """A commit may not hold a file and, below it, another file: the first would need to be a
    directory too.  Refused by name before anything is written (otherwise which of the two
    came first in the batch decided between a named error and a failed INSERT)."""
    seen: set[str] = set()
    for d in parents:
        while d != "/" and d not in seen:
            if d in paths:
                raise errors.NotADirectory(f"{d} is both a file and a directory in this commit; "
                                           "nothing was published.")
            seen.add(d)
            d = d.rsplit("/", 1)[0] or "/"


def _locked_objects(conn: Connection, keys: set[str], share: bool) -> set[str]:
    """Those of ``keys`` the archive stores, their rows locked until the transaction ends:
    shared by a step that gives an object a name or a copy, exclusive by its release (one then
    waits for the other).  Locked in key order, so two such steps never wait on each other
    both ways; SQLite, one writer at a time, reads them."""
    held: set[str] = set()
    for part in slices(sorted(keys)):
        held.update(conn.execute(sa.select(objects.c.key).where(objects.c.key.in_(part))
                                 .order_by(objects.c.key).with_for_update(read=share)).scalars())
    return held


#: PostgreSQL advisory lock class of object keys (the two-number form, whose key space is apart
#: from the single-number TREE_LOCK_KEY's): see _lock_keys.
KEY_LOCK_CLASS = 0x64676B


def _lock_keys(conn: Connection, keys: Iterable[str], shared: bool) -> None:
    """On PostgreSQL, lock object ``keys`` until the transaction ends, whether or not the archive
    stores them yet: shared by a step that checks a receipt's generation and then records the
    copy, exclusive by fsck's check that a site's copies are orphans and its note of their
    generations (SqlEngine.note_orphans_deleted).  Under READ COMMITTED the two checks could
    otherwise each miss the other's uncommitted row, and a copy be recorded whose bytes fsck
    then deletes.  Taken in one order, so two such steps never wait on each other both ways;
    keys that share a 32-bit hash share a lock, which costs a wait, never a wrong answer.
    SQLite has one writer at a time, which already orders them."""
    if conn.dialect.name != "postgresql":
        return
    ids = sorted({zlib.crc32(k.encode()) - 2 ** 31 for k in keys})
    if ids:
        fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        conn.execute(sa.text(f"SELECT {fn}(:c, k) FROM unnest(CAST(:ids AS integer[])) AS k"),
                     {"c": KEY_LOCK_CLASS, "ids": ids})


def _refuse_released(conn: Connection, copies: list[tuple[str, str, str, int]]) -> None:
    """Refuse ``(path, key, site, generation)`` copies a release (SqlEngine._release) has deleted since their receipts
    were signed: a receipt kept for later (it is good for an hour) must not give the archive a
    name, or a copy, whose bytes are gone.  A store after the release has a newer generation.
    The keys stay locked against fsck's note of orphans until the copies are recorded."""
    if not copies:
        return
    _lock_keys(conn, (key for _, key, _, _ in copies), shared=True)
    deleted: dict[tuple[str, str], int] = {}
    for part in slices(sorted({key for _, key, _, _ in copies})):
        deleted.update(((r.key, r.site), r.gen) for r in conn.execute(
            sa.select(released_gens.c.key, released_gens.c.site, released_gens.c.gen)
            .where(released_gens.c.key.in_(part))))
    for path, key, site, gen in copies:
        if gen <= deleted.get((key, site), -1):
            raise errors.PermissionDenied(
                f"the receipt of site {site} for {path} names bytes a removal deleted since it was signed; "
                "nothing was published: upload again.")


class SqlEngine(HeaderIndexStore, AdminStore, MetaEngine):
    def _new_dir(self, conn: Connection, parent_id: int, name: str, mode: int) -> Any:
        now = time.time()
        ino = inserted_id(conn.execute(inodes.insert().values(
            parent=parent_id, name=name, is_dir=True, mode=mode, size=0, nlink=2,
            mtime=now, ctime=now)))
        tree_changed(conn, DirMade(ino, parent_id, name))
        conn.execute(U_NLINK, {"b_id": parent_id, "b_delta": 1, "b_now": now})
        return InodeRow(ino, name, True, mode, 0, 2, now, now, None)

    def _make_parents(self, conn: Connection, paths: set[str]) -> tuple[dict[str, int], set[int]]:
        """The id of each directory in ``paths``, those missing made (0755, as ``mkdir -p``
        does), and the ids of the directories made.

        Committed directories come from the directory map (its version is read in this
        transaction).  The missing ones are made depth by depth, one multi-row INSERT a depth,
        so a commit into a hundred new series directories costs a few statements, not a few per
        directory.  Under a directory that already existed, the names are first looked up (one
        query per such parent): an entry of another kind in the way is refused by name, and a
        directory the map has not learnt yet is used."""
        known = self._dir_ids(conn)
        ids: dict[str, int] = {}
        missing: set[str] = set()
        fresh: set[int] = set()
        for path in paths:
            while path not in ids and path not in missing:
                if path in known:
                    ids[path] = known[path]
                    break
                missing.add(path)
                path = path.rsplit("/", 1)[0] or "/"
        by_depth: dict[int, list[str]] = {}
        for path in missing:
            by_depth.setdefault(path.count("/"), []).append(path)
        for depth in sorted(by_depth):
            under: dict[int, dict[str, str]] = {}       # parent id -> name -> path
            for path in sorted(by_depth[depth]):
                parent, name = path.rsplit("/", 1)
                under.setdefault(ids[parent or "/"], {})[name] = path
            for pid, names in under.items():
                if pid in fresh:
                    continue                             # made by this commit: empty
                for part in slices(sorted(names)):
                    for row in conn.execute(Q_CHILDREN_NAMED, {"b_parent": pid, "b_names": part}):
                        path = names.pop(row.name)
                        if not row.is_dir:
                            raise errors.NotADirectory(f"{path} exists and is not a directory.")
                        ids[path] = row.id
            new = [(pid, name, path) for pid, names in under.items() for name, path in names.items()]
            if not new:
                continue
            now = time.time()
            # Ids matched by (parent, name), as for files (_do_create_files).
            got = {(r.parent, r.name): r.id for r in self._bulk_returning(
                conn, inodes.name, _NEW_INODE, [(pid, name, True, 0o755, 0, 2, now, now, None) for pid, name, _ in new],
                ("id", "parent", "name"))}
            for pid, name, path in new:
                ids[path] = got[pid, name]
                fresh.add(ids[path])
            tree_changed(conn, *(DirMade(ids[path], pid, name) for pid, name, path in new))
            conn.execute(U_NLINK, [{"b_id": pid, "b_delta": len(names), "b_now": now}
                                   for pid, names in under.items() if names])
        return {path: ids[path] for path in paths}, fresh

    # -- namespace steps ------------------------------------------------------------------

    def _do_stat(self, path: str) -> Stat:
        return stat_of(path, self._read(lambda c: self._looked_up(c, path)))

    def _do_readdir(self, path: str) -> list[Stat]:
        def run(conn: Connection) -> list[Stat]:
            d = self._looked_up(conn, path)
            if not d.is_dir:
                raise errors.NotADirectory(f"{path} is not a directory.")
            return stats_of(path, conn.execute(Q_CHILDREN, {"b_parent": d.id}))
        return self._read(run)

    def _do_mkdir(self, path: str, mode: int, parents: bool) -> Stat:
        def run(conn: Connection) -> Stat:
            if parents:
                self._make_parents(conn, {path})
                return stat_of(path, self._looked_up(conn, path))
            parent_path, name = path.rsplit("/", 1)
            parent = self._resolve_dir(conn, parent_path or "/")
            if self._child(conn, parent.id, name) is not None:
                raise errors.AlreadyExists(f"{path} already exists.")
            return stat_of(path, self._new_dir(conn, parent.id, name, mode))
        return self._txn(run, SHARED)

    def _do_rename(self, src: str, dst: str) -> Released:
        def run(conn: Connection) -> Released:
            s = self._resolve(conn, src)
            if (dst + "/").startswith(src + "/"):
                raise errors.UsageError(f"cannot move {src!r} into itself.")
            dparent_path, dname = dst.rsplit("/", 1)
            dparent = self._resolve_dir(conn, dparent_path or "/")
            sparent_id = conn.execute(sa.select(inodes.c.parent).where(inodes.c.id == s.id)).scalar_one()
            existing = self._child(conn, dparent.id, dname)
            now = time.time()
            if existing is not None:
                # POSIX rename(2): replace a file by a file, or an empty directory by a directory.
                if s.is_dir and not existing.is_dir:
                    raise errors.NotADirectory(f"{dst} is not a directory.")
                if not s.is_dir and existing.is_dir:
                    raise errors.IsADirectory(f"{dst} is a directory.")
                if existing.is_dir:
                    if conn.execute(sa.select(inodes.c.id).where(inodes.c.parent == existing.id).limit(1)).first():
                        raise errors.DirectoryNotEmpty(f"{dst} is not empty.")
                    conn.execute(inodes.update().where(inodes.c.id == dparent.id).values(nlink=inodes.c.nlink - 1))
                    tree_changed(conn, DirGone(existing.id))
                self._drop_inode(conn, existing.id, dst)
            conn.execute(inodes.update().where(inodes.c.id == s.id).values(
                parent=dparent.id, name=dname, ctime=now))
            if s.is_dir:
                tree_changed(conn, DirMoved(s.id, dparent.id, dname))
            if s.is_dir and sparent_id != dparent.id:
                conn.execute(inodes.update().where(inodes.c.id == sparent_id).values(nlink=inodes.c.nlink - 1))
                conn.execute(inodes.update().where(inodes.c.id == dparent.id).values(nlink=inodes.c.nlink + 1))
            conn.execute(inodes.update().where(inodes.c.id.in_({sparent_id, dparent.id})).values(mtime=now))
            return self._release(conn, {existing.object_key} if existing is not None else set())
        return self._txn(run, EXCLUSIVE)

    def _release(self, conn: Connection, keys: set[str]) -> Released:
        """Forget the objects among ``keys`` that no file references any more.

        Their object, replica and identity rows go in the caller's transaction; the result maps
        each released key to the sites that still hold its bytes, for the caller to delete there.
        """
        keys = {k for k in keys if k}
        if not keys:
            return {}
        # The objects' rows are locked before they are found unused: a commit that links a new
        # name to one of them locks it too (create_files), so one of the two waits for the other
        # and either sees the new name or finds the object gone, never both at once.
        # An object another transaction released first has no row left: it is not released twice.
        held = _locked_objects(conn, keys, share=False)
        used = {r.object_key for r in conn.execute(
            sa.select(inodes.c.object_key).where(inodes.c.object_key.in_(held)).distinct())}
        gone = sorted(held - used)
        if not gone:
            return {}
        out: Released = {k: {} for k in gone}
        for r in conn.execute(sa.select(replicas.c.key, replicas.c.site, replicas.c.gen)
                              .where(replicas.c.key.in_(gone))):
            out[r.key][r.site] = r.gen
        conn.execute(replicas.delete().where(replicas.c.key.in_(gone)))
        conn.execute(repairs.delete().where(repairs.c.key.in_(gone)))
        conn.execute(objects.delete().where(objects.c.key.in_(gone)))
        conn.execute(object_blocks.delete().where(object_blocks.c.key.in_(gone)))
        conn.execute(identities.delete().where(identities.c.object_key.in_(gone)))
        self._note_deleted(conn, [(key, site, gen) for key, sites in out.items() for site, gen in sites.items()])
        conn.info.setdefault("dgf.released", {}).update(out)
        return out

    def _note_deleted(self, conn: Connection, copies: list[tuple[str, str, int | None]]) -> None:
        """Remember the generation of each ``(key, site, gen)`` copy about to be deleted (or
        found gone), for _refuse_released; notes of long ago are forgotten.  A copy of unknown
        generation (recorded before generations were) cannot be named, so it is not noted."""
        now = time.time()
        conn.execute(released_gens.delete().where(released_gens.c.at < now - 2 * RECEIPT_TTL_S))
        noted = [{"key": key, "site": site, "gen": gen, "at": now} for key, site, gen in copies if gen is not None]
        if noted:
            conn.execute(self._upsert(released_gens, ["key", "site"], ["gen", "at"]), noted)

    def note_orphans_deleted(self, site: str, keys: list[str], gens: dict[str, int]) -> set[str]:
        def run(conn: Connection) -> set[str]:
            _lock_keys(conn, keys, shared=False)
            recorded = self._recorded_at(conn, site, keys)
            if not recorded:
                self._note_deleted(conn, [(key, site, gen) for key, gen in gens.items()])
            return recorded
        return self._txn(run)

    def _drop_inode(self, conn: Connection, ino: int, path: str) -> None:
        """Remove inode ``ino`` (found at ``path``) with its attributes and index rows.  On
        PostgreSQL another transaction may have removed it since it was found: then this one
        removed nothing, and says so (two unlinks of one name both succeeded, each releasing
        the object)."""
        conn.execute(xattrs.delete().where(xattrs.c.ino == ino))
        conn.execute(xattr_owners.delete().where(xattr_owners.c.ino == ino))
        self._unindex(conn, [ino])
        if conn.execute(inodes.delete().where(inodes.c.id == ino)).rowcount == 0:
            raise errors.NotFound(f"{path} does not exist.")

    def _do_unlink(self, path: str) -> Released:
        def run(conn: Connection) -> Released:
            row = self._resolve(conn, path)
            if row.is_dir:
                raise errors.IsADirectory(f"{path} is a directory; use rmdir.")
            self._drop_inode(conn, row.id, path)
            parent_path = path.rsplit("/", 1)[0] or "/"
            conn.execute(inodes.update().where(inodes.c.id == self._resolve(conn, parent_path).id)
                         .values(mtime=time.time()))
            return self._release(conn, {row.object_key})
        return self._txn(run)

    def _do_rmdir(self, path: str) -> None:
        def run(conn: Connection) -> None:
            row = self._resolve(conn, path)
            if not row.is_dir:
                raise errors.NotADirectory(f"{path} is not a directory.")
            if conn.execute(sa.select(inodes.c.id).where(inodes.c.parent == row.id).limit(1)).first():
                raise errors.DirectoryNotEmpty(f"{path} is not empty.")
            tree_changed(conn, DirGone(row.id))
            self._drop_inode(conn, row.id, path)
            parent = self._resolve(conn, path.rsplit("/", 1)[0] or "/")
            conn.execute(inodes.update().where(inodes.c.id == parent.id).values(
                nlink=inodes.c.nlink - 1, mtime=time.time()))
        self._txn(run, EXCLUSIVE)

    def _do_rmtree(self, path: str) -> tuple[int, Released]:
        def run(conn: Connection) -> tuple[int, Released]:
            top = self._resolve(conn, path)
            if not top.is_dir:
                raise errors.NotADirectory(f"{path} is not a directory.")
            files: list[int] = []
            dirs: list[int] = [top.id]
            keys: set[str] = set()
            frontier = [top.id]
            while frontier:                      # the tree, a level at a time
                below: list[int] = []
                for part in slices(frontier):
                    for r in conn.execute(sa.select(inodes.c.id, inodes.c.is_dir, inodes.c.object_key)
                                          .where(inodes.c.parent.in_(part))):
                        if r.is_dir:
                            below.append(r.id)
                        else:
                            files.append(r.id)
                            keys.add(r.object_key)
                dirs.extend(below)
                frontier = below
            doomed = files + dirs
            tree_changed(conn, *(DirGone(d) for d in dirs))
            self._unindex(conn, files)
            for part in slices(doomed):
                conn.execute(xattrs.delete().where(xattrs.c.ino.in_(part)))
                conn.execute(xattr_owners.delete().where(xattr_owners.c.ino.in_(part)))
            for part in slices(files + dirs[::-1]):     # children first
                conn.execute(inodes.delete().where(inodes.c.id.in_(part)))
            parent = self._resolve(conn, path.rsplit("/", 1)[0] or "/")
            conn.execute(inodes.update().where(inodes.c.id == parent.id).values(
                nlink=inodes.c.nlink - 1, mtime=time.time()))
            return len(files), self._release(conn, keys)
        return self._txn(run, EXCLUSIVE)

    def _do_chmod(self, path: str, mode: int) -> None:
        def run(conn: Connection) -> None:
            row = self._resolve(conn, path)
            conn.execute(inodes.update().where(inodes.c.id == row.id).values(mode=mode, ctime=time.time()))
        self._txn(run)

    def _do_create_files(self, files: list[NewFile], replace: bool) -> tuple[list[Stat], Released]:
        if not files:
            return [], {}          # an empty commit (a client may send one): nothing to write
        # The headers are parsed before the transaction, which then holds the write lock only
        # for the inserts.
        indexed = {f.path: self._parsed(f.xattrs[index.HEADER_XATTR]) for f in files
                   if index.HEADER_XATTR in f.xattrs}

        def run(conn: Connection) -> tuple[list[Stat], Released]:
            # The directory map changes only if a directory is made (_make_parents marks it).
            now = time.time()
            by_parent: dict[str, list[NewFile]] = {}
            if len({f.path for f in files}) != len(files):
                raise errors.UsageError("a commit names the same path twice.")
            for f in files:
                by_parent.setdefault(f.path.rsplit("/", 1)[0] or "/", []).append(f)
            _refuse_files_as_parents({f.path for f in files}, by_parent)
            self._hold_objects(conn, files)
            _refuse_released(conn, [(f.path, f.object_key, site, gen) for f in files if not f.linked
                                    for site, gen in f.gens])
            parents, fresh = self._make_parents(conn, set(by_parent))
            new_rows: list[tuple[Any, ...]] = []
            new_files: list[NewFile] = []
            inos: dict[str, int] = {}
            kept: set[int] = set()          # existing files this commit writes over
            replaced: set[str] = set()
            for parent_path, group in by_parent.items():
                parent_id = parents[parent_path]
                names = [f.path.rsplit("/", 1)[1] for f in group]
                # A directory made by this commit holds nothing yet.
                existing: dict[str, Any] = {} if parent_id in fresh else {r.name: r for r in conn.execute(
                    Q_CHILDREN_NAMED, {"b_parent": parent_id, "b_names": names})}
                for f, name in zip(group, names):
                    old = existing.get(name)
                    if old is None:
                        new_rows.append((parent_id, name, False, f.mode, f.size, 1, now, now, f.object_key))
                        new_files.append(f)
                        existing[name] = InodeRow(0, name, False, f.mode, f.size, 1, now, now, f.object_key)
                        continue
                    if old.is_dir:
                        raise errors.IsADirectory(f"{f.path} is a directory.")
                    if old.object_key != f.object_key:
                        if not replace:
                            raise errors.AlreadyExists(f"{f.path} already exists with other content; remove it first.")
                        replaced.add(old.object_key)
                    if old.id:
                        conn.execute(U_FILE, {"b_id": old.id, "b_key": f.object_key, "b_size": f.size, "b_now": now})
                        inos[f.path] = old.id
                        kept.add(old.id)
            if new_rows:
                # Multi-row INSERT ... RETURNING, each id matched by its (parent, name): asking
                # for parameter order made SQLAlchemy insert row by row on SQLite.
                made = {(r.parent, r.name): r.id for r in self._bulk_returning(
                    conn, inodes.name, _NEW_INODE, new_rows, ("id", "parent", "name"))}
                for f, row in zip(new_files, new_rows):
                    inos[f.path] = made[row[0], row[1]]
            # Tuples by the driver's bulk path (_bulk): a dozen rows a file.
            self._bulk(conn, objects.name, ("key", "size", "created", "seal"),
                       [(f.object_key, f.stored_size or f.size, now, f.seal) for f in files], IGNORE)
            self._bulk(conn, identities.name, ("object_key", "patient", "sealed", "size"),
                       [(f.object_key, f.patient, f.identity, f.original_size) for f in files
                        if f.identity is not None and f.patient is not None], IGNORE)
            # A fresh receipt proves the site holds verified bytes: a replica quarantined
            # earlier and now re-uploaded is healthy again, and its generation is the one the
            # receipt signed for.  A link brought no receipt: the object's replicas stand.
            self._bulk(conn, replicas.name, ("key", "site", "state", "gen"),
                       [(f.object_key, site, "ok", dict(f.gens).get(site)) for f in files if not f.linked
                        for site in dict.fromkeys((f.site, *f.copies))],
                       'ON CONFLICT ("key", "site") DO UPDATE SET "state" = excluded."state", "gen" = excluded."gen"')
            self._bulk(conn, repairs.name, ("key", "wanted", "since"),
                       [(f.object_key, f.wanted, now) for f in files
                        if f.wanted > len(dict.fromkeys((f.site, *f.copies)))], IGNORE)
            self._bulk(conn, object_blocks.name, ("key", "digests"),
                       [(f.object_key, f.blocks) for f in files if f.blocks], IGNORE)
            xa_rows = [(inos[f.path], xname, value) for f in files for xname, value in f.xattrs.items()]
            if xa_rows:
                # A new inode has no attributes or index rows (every removal takes them with
                # it): only files written over have old ones to clear.
                over = [r for r in xa_rows if r[0] in kept]
                if over:
                    conn.execute(xattrs.delete().where(xattrs.c.ino.in_({r[0] for r in over}),
                                                       xattrs.c.name.in_({r[1] for r in over})))
                self._bulk(conn, xattrs.name, ("ino", "name", "value"), xa_rows)
                headers = [(inos[path], parsed) for path, parsed in indexed.items()]
                self._unindex(conn, [ino for ino, _ in headers if ino in kept])
                self._index(conn, headers)
            if parents:           # the files' directories; those made here have this mtime already
                conn.execute(U_MTIME, [{"b_id": pid, "b_now": now} for pid in parents.values()])
            out = [Stat(f.path, inos[f.path], False, f.mode, f.size, now, now, 1, f.object_key) for f in files]
            return out, self._release(conn, replaced)
        return self._txn(run, SHARED)

    @staticmethod
    def _hold_objects(conn: Connection, files: list[NewFile]) -> None:
        """Lock the stored objects this commit names against their release until it commits
        (the other side of :meth:`_release`'s lock); refuse a link to one released meanwhile.

        A link was checked before the transaction (``up.check``, the service's replica check),
        and an unlink in another transaction may have freed its object since: its bytes are
        being deleted at the sites, so the name would lead nowhere."""
        held = _locked_objects(conn, {f.object_key for f in files}, share=True)
        gone = [f.path for f in files if f.linked and f.object_key not in held]
        if gone:
            raise errors.NotFound(f"{gone[0]} was to be one more name of a stored object, which was removed "
                                  f"meanwhile ({len(gone)} such file(s)); nothing was published: upload again.")

    def check_files(self, files: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
        """What the archive already holds for ``(path, object key, SOP Instance UID)`` entries,
        before their bytes are sent, one ``(state, detail)`` each:

        - ``new``: nothing; send it.
        - ``stored``: the path holds this object, with a healthy replica.
        - ``conflict``: the path holds something else (detail: why).
        - ``link``: the object is stored (another path holds the same bytes); detail: the site
          with a healthy replica.  The path is published as a second name of that object.
        - ``instance``: another version of the instance (same SOP Instance UID, other bytes)
          is stored; detail: its path."""
        def run(conn: Connection) -> list[tuple[str, str]]:
            at_path: dict[str, Any] = {}
            by_parent: dict[str, list[str]] = {}
            for path, _, _ in files:
                path = norm_path(path)
                by_parent.setdefault(path.rsplit("/", 1)[0] or "/", []).append(path)
            # Parents from the directory map (one query for its version), not one query per
            # path component: an upload into new series names dozens of new directories per
            # batch.  A directory the map lacks holds nothing yet; the check only advises (the
            # commit decides), so one made meanwhile by another writer costs nothing here.
            dir_ids = self._dir_ids(conn)
            for parent_path, paths in by_parent.items():
                parent_id = dir_ids.get(parent_path)
                if parent_id is None:
                    continue
                names = {p.rsplit("/", 1)[1]: p for p in paths}
                for row in conn.execute(Q_CHILDREN_NAMED, {"b_parent": parent_id, "b_names": list(names)}):
                    at_path[names[row.name]] = row
            keys = sorted({key for _, key, _ in files})
            healthy: dict[str, str] = {}
            for part in slices(keys):
                for r in conn.execute(_Q_HEALTHY, {"b_keys": part}):
                    healthy.setdefault(r.key, r.site)
            uids = sorted({uid for _, key, uid in files if uid and key not in healthy})
            instances: dict[str, str] = {}       # uid -> path of a stored version
            hkey = conn.execute(sa.select(keys_t.c.id).where(
                keys_t.c.path == "/DicomHeader/SOPInstanceUID")).scalar() if uids else None
            if hkey is not None:
                found = [r for part in slices(uids)
                         for r in conn.execute(_Q_VERSIONS, {"b_key": hkey, "b_uids": part})]
                if found:
                    dirs = self._dir_paths(conn)
                    for text, parent_id, name in found:
                        instances.setdefault(text, join_path(dirs.get(parent_id, "/"), name))
            out: list[tuple[str, str]] = []
            for path, key, uid in files:
                path = norm_path(path)
                hit: Any = at_path.get(path)
                if hit is not None and hit.is_dir:
                    out.append(("conflict", f"{path} is a directory"))
                elif hit is not None and hit.object_key != key:
                    out.append(("conflict", f"{path} already exists with other content"))
                elif key in healthy:
                    out.append(("stored", "") if hit is not None else ("link", healthy[key]))
                elif uid in instances and instances[uid] != path:
                    out.append(("instance", instances[uid]))
                else:
                    out.append(("new", ""))
            return out
        return self._read(run)

    # -- xattrs ---------------------------------------------------------------------------

    def _do_getxattr(self, path: str, name: str) -> bytes:
        def run(conn: Connection) -> bytes:
            row = self._resolve(conn, path)
            value = conn.execute(sa.select(xattrs.c.value).where(
                xattrs.c.ino == row.id, xattrs.c.name == name)).scalar()
            if value is None:
                raise errors.NoAttribute(f"{path} has no extended attribute {name!r}.")
            return bytes(value)
        return self._read(run)

    def _do_listxattr(self, path: str) -> list[str]:
        def run(conn: Connection) -> list[str]:
            row = self._resolve(conn, path)
            return [r.name for r in conn.execute(sa.select(xattrs.c.name).where(
                xattrs.c.ino == row.id).order_by(xattrs.c.name))]
        return self._read(run)

    def _do_setxattr(self, path: str, name: str, value: bytes, owner: str | None = None,
                     quota: tuple[int, int] | None = None, guard: bool = False) -> None:
        parsed = self._parsed(value) if name == index.HEADER_XATTR else None

        def run(conn: Connection) -> None:
            row = self._resolve(conn, path)
            if guard:
                self._check_owner(conn, row.id, path, name, owner, "change")
            if owner is not None:
                self._charge(conn, row.id, name, len(value), owner, quota)
            conn.execute(xattrs.delete().where(xattrs.c.ino == row.id, xattrs.c.name == name))
            conn.execute(xattrs.insert().values(ino=row.id, name=name, value=value))
            if parsed is not None:
                self._unindex(conn, [row.id])
                self._index(conn, [(row.id, parsed)])
        self._txn(run)

    def _do_removexattr(self, path: str, name: str, by: str | None = None) -> None:
        def run(conn: Connection) -> None:
            row = self._resolve(conn, path)
            if by is not None:
                self._check_owner(conn, row.id, path, name, by, "remove")
            if conn.execute(xattrs.delete().where(xattrs.c.ino == row.id, xattrs.c.name == name)).rowcount == 0:
                raise errors.NoAttribute(f"{path} has no extended attribute {name!r}.")
            conn.execute(xattr_owners.delete().where(xattr_owners.c.ino == row.id, xattr_owners.c.name == name))
            if name == index.HEADER_XATTR:
                self._unindex(conn, [row.id])
        self._txn(run)

    @staticmethod
    def _check_owner(conn: Connection, ino: int, path: str, name: str, who: str | None, doing: str) -> None:
        """Refuse to let ``who`` change an attribute another principal set."""
        setter = conn.execute(sa.select(xattr_owners.c.owner).where(
            xattr_owners.c.ino == ino, xattr_owners.c.name == name)).scalar()
        if setter is not None and setter != who:
            raise errors.PermissionDenied(f"{name} on {path} was set by {setter!r}; only they or an admin "
                                          f"may {doing} it.")

    def _charge(self, conn: Connection, ino: int, name: str, size: int, owner: str,
                quota: tuple[int, int] | None) -> None:
        """Record ``owner`` as the setter of (ino, name), within its quota of (count, bytes)."""
        old = conn.execute(sa.select(xattr_owners.c.size).where(
            xattr_owners.c.ino == ino, xattr_owners.c.name == name, xattr_owners.c.owner == owner)).scalar()
        if quota is not None:
            count, total = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(xattr_owners.c.size), 0))
                                        .where(xattr_owners.c.owner == owner)).one()
            count += 0 if old is not None else 1
            total += size - (old or 0)
            if count > quota[0]:
                raise errors.LimitExceeded(f"principal {owner!r} would hold {count} extended attributes; "
                                           f"the limit xattrs_per_principal is {quota[0]}.")
            if total > quota[1]:
                raise errors.LimitExceeded(f"principal {owner!r} would hold {total} bytes of extended attributes; "
                                           f"the limit xattr_bytes_per_principal is {quota[1]}.")
        conn.execute(xattr_owners.delete().where(xattr_owners.c.ino == ino, xattr_owners.c.name == name))
        conn.execute(xattr_owners.insert().values(ino=ino, name=name, owner=owner, size=size))

    # -- objects and query ----------------------------------------------------------------

    def object_blocks(self, keys: list[str]) -> dict[str, bytes]:
        """The hash lists of those of ``keys`` that have one (objects over one block)."""
        def run(conn: Connection) -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            for part in slices(keys):
                for r in conn.execute(sa.select(object_blocks.c.key, object_blocks.c.digests).where(
                        object_blocks.c.key.in_(part))):
                    out[r.key] = bytes(r.digests)
            return out
        return self._read(run)

    def set_replica_state(self, site: str, keys: list[str], state: str) -> int:
        """Mark ``site``'s replicas of ``keys`` (e.g. quarantined: readers stop using them)."""
        def run(conn: Connection) -> int:
            n = 0
            for part in slices(keys):
                n += conn.execute(replicas.update().where(replicas.c.site == site, replicas.c.key.in_(
                    part)).values(state=state)).rowcount
            return n
        return self._txn(run)

    def replica_states(self, key: str) -> list[tuple[str, str]]:
        return self._read(lambda c: [(r.site, r.state) for r in c.execute(
            sa.select(replicas.c.site, replicas.c.state).where(replicas.c.key == key).order_by(replicas.c.site))])

    def replica_rows(self, keys: list[str]) -> dict[str, list[tuple[str, str]]]:
        return self._read(lambda conn: self._replica_rows(conn, keys))

    def replica_gens(self, keys: list[str]) -> dict[str, dict[str, int]]:
        def run(conn: Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for part in slices(keys):
                for r in conn.execute(sa.select(replicas.c.key, replicas.c.site, replicas.c.gen).where(
                        replicas.c.key.in_(part), replicas.c.gen.is_not(None))):
                    out.setdefault(r.key, {})[r.site] = int(r.gen)
            return out
        return self._read(run)

    @staticmethod
    def _replica_rows(conn: Connection, keys: list[str]) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {k: [] for k in keys}
        for part in slices(keys):
            for r in conn.execute(sa.select(replicas.c.key, replicas.c.site, replicas.c.state).where(
                    replicas.c.key.in_(part)).order_by(replicas.c.site)):
                out[r.key].append((r.site, r.state))
        return out

    def add_replica(self, key: str, site: str, gen: int | None = None) -> bool:
        """Record a verified copy of object ``key`` at ``site`` (generation ``gen``, as its
        receipt signed); False if the object was released meanwhile (its row is locked
        against that, as a commit locks it)."""
        def run(conn: Connection) -> bool:
            if not _locked_objects(conn, {key}, share=True):
                return False
            if gen is not None:
                _refuse_released(conn, [(f"object {key[:16]}...", key, site, gen)])
            conn.execute(self._upsert(replicas, ["key", "site"], ["state", "gen"]),
                         [{"key": key, "site": site, "state": "ok", "gen": gen}])
            return True
        return self._txn(run)

    def object_header(self, key: str) -> bytes | None:
        """The XML header on record for object ``key`` (any of its paths'), if any."""
        def run(conn: Connection) -> bytes | None:
            value = conn.execute(sa.select(xattrs.c.value).join(inodes, inodes.c.id == xattrs.c.ino).where(
                inodes.c.object_key == key, xattrs.c.name == index.HEADER_XATTR).limit(1)).scalar()
            return bytes(value) if value is not None else None
        return self._read(run)

    def repair_queue(self, limit: int) -> list[tuple[str, int, int, list[tuple[str, str]]]]:
        """The oldest queued repairs: (key, size, copies wanted, [(site, state)])."""
        def run(conn: Connection) -> list[tuple[str, int, int, list[tuple[str, str]]]]:
            rows = conn.execute(sa.select(repairs.c.key, repairs.c.wanted, objects.c.size).join(
                objects, objects.c.key == repairs.c.key).order_by(repairs.c.since, repairs.c.key).limit(limit)).all()
            copies = self._replica_rows(conn, [r.key for r in rows])
            return [(r.key, int(r.size), int(r.wanted), copies[r.key]) for r in rows]
        return self._read(run)

    def repairs_done(self, keys: list[str]) -> None:
        def run(conn: Connection) -> None:
            for part in slices(keys):
                conn.execute(repairs.delete().where(repairs.c.key.in_(part)))
        if keys:
            self._txn(run)

    def drop_replica(self, key: str, site: str) -> bool:
        def run(conn: Connection) -> bool:
            _lock_keys(conn, [key], shared=False)         # not while a commit records this copy
            dropped = conn.execute(replicas.delete().where(replicas.c.key == key, replicas.c.site == site)
                                   .returning(replicas.c.gen)).first()
            if dropped is None:
                return False
            self._note_deleted(conn, [(key, site, dropped.gen)])
            return True
        return self._txn(run)

    def objects_at(self, site: str, after: str, limit: int) -> list[tuple[str, int, list[tuple[str, str]]]]:
        def run(conn: Connection) -> list[tuple[str, int, list[tuple[str, str]]]]:
            rows = conn.execute(sa.select(objects.c.key, objects.c.size).join(
                replicas, replicas.c.key == objects.c.key).where(
                replicas.c.site == site, objects.c.key > after).order_by(objects.c.key).limit(limit)).all()
            copies = self._replica_rows(conn, [r.key for r in rows])
            return [(r.key, int(r.size), copies[r.key]) for r in rows]
        return self._read(run)

    def recorded_at(self, site: str, keys: list[str]) -> set[str]:
        return self._read(lambda conn: self._recorded_at(conn, site, keys))

    @staticmethod
    def _recorded_at(conn: Connection, site: str, keys: list[str]) -> set[str]:
        out: set[str] = set()
        for part in slices(keys):
            out.update(r.key for r in conn.execute(sa.select(replicas.c.key).where(
                replicas.c.site == site, replicas.c.key.in_(part))))
        return out

    def object_replicas(self, keys: list[str]) -> dict[str, list[str]]:
        def run(conn: Connection) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {k: [] for k in keys}
            for part in slices(keys):
                for r in conn.execute(sa.select(replicas.c.key, replicas.c.site).where(
                        replicas.c.key.in_(part), replicas.c.state == "ok")
                        .order_by(replicas.c.site)):
                    out[r.key].append(r.site)
            return out
        return self._read(run)

    def walk_files(self, root: str) -> Iterator[tuple[str, str, int]]:
        """(path, object key, size) of every file at or under ``root``, in path order."""
        for path, row in self._subtree(root, sa.select(inodes.c.object_key, inodes.c.size)
                                       .where(inodes.c.is_dir.is_(False))):
            yield path, row.object_key, row.size

    def walk_files_many(self, roots: list[str]) -> Iterator[tuple[str, str, int]]:
        """``walk_files`` of each root in turn.  Roots that name files (a series' instances, as a
        viewer or ``dgf_down`` asks for them) resolve in one query per directory, not in one
        recursive query each."""
        named: dict[str, Any] = {}
        by_parent: dict[str, list[str]] = {}
        for root in roots:
            parent, _, name = root.rpartition("/")
            if name and (parent == "" or parent.startswith("/")):
                by_parent.setdefault(parent or "/", []).append(name)
        with self._connect() as conn:
            ids = self._dir_ids(conn)
            for parent, names in by_parent.items():
                pid = ids.get(parent)
                if pid is None:
                    continue                             # named when the root itself is walked
                for part in slices(sorted(set(names))):
                    for row in conn.execute(Q_CHILDREN_NAMED, {"b_parent": pid, "b_names": part}):
                        named[join_path(parent, row.name)] = row
        for root in roots:
            found = named.get(root)
            if found is not None and not found.is_dir:
                yield root, found.object_key, found.size
            else:
                yield from self.walk_files(root)

    def _subtree(self, root: str, extra: Any) -> Iterator[tuple[str, Any]]:
        """Stream (path, row) of the inodes under ``root`` selected by ``extra`` (a select whose
        FROM is ``inodes``), with paths built by a recursive CTE in the database."""
        with self._connect() as conn:
            top = self._resolve(conn, root)
            base = "" if root == "/" else root
            # Both terms cast to TEXT: PostgreSQL wants one type across a recursive CTE.
            sub = sa.select(inodes.c.id, sa.cast(sa.literal(base), sa.Text).label("path")).where(
                inodes.c.id == top.id).cte("sub", recursive=True)
            child = inodes.alias("child")
            sub = sub.union_all(sa.select(child.c.id, sa.cast(sub.c.path + "/" + child.c.name, sa.Text))
                                .where(child.c.parent == sub.c.id))
            query = extra.add_columns(sub.c.path).join_from(inodes, sub, sub.c.id == inodes.c.id) \
                .order_by(sub.c.path)
            for row in conn.execution_options(stream_results=True).execute(query):
                yield (row.path or "/"), row

    # -- object seals ---------------------------------------------------------------------

    def object_seals(self, keys: list[str]) -> dict[str, str]:
        """The seals ("SALT_HEX:STUDY") of those of ``keys`` that are sealed objects."""
        def run(conn: Connection) -> dict[str, str]:
            out: dict[str, str] = {}
            for part in slices(keys):
                for r in conn.execute(sa.select(objects.c.key, objects.c.seal).where(
                        objects.c.key.in_(part), objects.c.seal.isnot(None))):
                    out[r.key] = r.seal
            return out
        return self._read(run)
