"""Administrative storage: principals, sites, grants, settings, the identity vault's rows
(patient and study keys, identity records) and database backups."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError as SAIntegrityError

from dgf import crypto, errors
from dgf.types import Principal, Site
from metaserver.engine import UploadFacts
from metaserver.schema import (
    REPLICAS_ONLY,
    grants_t,
    identities,
    objects,
    patients,
    principals_t,
    replicas,
    settings_t,
    sites_t,
    study_keys,
)
from metaserver.sqlbase import SqlBase, inserted_id, slices


class AdminStore(SqlBase):
    """Principals, sites, grants, settings, vault rows and backups."""

    def add_principal(self, p: Principal) -> None:
        def run(conn: Connection) -> None:
            try:
                conn.execute(principals_t.insert().values(name=p.name, role=p.role,
                                                          public_key=p.public_key, fingerprint=p.fingerprint))
            except SAIntegrityError as exc:
                raise errors.AlreadyExists(f"principal {p.name!r} or its key is already enrolled.") from exc
        self._txn(run)

    def remove_principal(self, name: str) -> None:
        def run(conn: Connection) -> None:
            if conn.execute(principals_t.delete().where(principals_t.c.name == name)).rowcount == 0:
                raise errors.NotFound(f"no principal named {name!r}.")
        self._txn(run)

    def principals(self) -> list[Principal]:
        return self._read(lambda c: [Principal(r.name, r.role, r.public_key, r.fingerprint) for r in
                                     c.execute(sa.select(principals_t).order_by(principals_t.c.name))])

    def principal_by_fingerprint(self, fp: str) -> Principal | None:
        row = self._read(lambda c: c.execute(sa.select(principals_t).where(
            principals_t.c.fingerprint == fp)).first())
        return None if row is None else Principal(row.name, row.role, row.public_key, row.fingerprint)

    def register_site(self, site: Site, pin: bool = False) -> None:
        def run(conn: Connection) -> None:
            old = conn.execute(sa.select(sites_t).where(sites_t.c.name == site.name)).first()
            if old is not None and old.pinned and not pin:
                if old.host_key.split()[:2] != site.host_key.split()[:2]:
                    raise errors.PermissionDenied(
                        f"site {site.name} presents host key {crypto.fingerprint(site.host_key)}, not the "
                        f"key {crypto.fingerprint(old.host_key)} an admin pinned; if the site was rebuilt, "
                        f"add it again with 'dgf admin site add {site.name} {old.host}:{old.port}'.")
                if not old.zone and site.zone:           # the admin's zone, if given, stands
                    conn.execute(sites_t.update().where(sites_t.c.name == site.name).values(zone=site.zone))
                return
            conn.execute(sites_t.delete().where(sites_t.c.name == site.name))
            # Only an admin says a site is untrusted; a site registering again cannot undo it.
            untrusted = bool(old is not None and old.untrusted) or (pin and site.untrusted)
            conn.execute(sites_t.insert().values(name=site.name, host=site.host, port=site.port,
                                                 host_key=site.host_key, zone=site.zone or None, pinned=pin,
                                                 untrusted=untrusted))
        self._txn(run)

    def sites(self) -> list[Site]:
        return self._read(lambda c: [Site(r.name, r.host, r.port, r.host_key, r.zone or "", bool(r.untrusted))
                                     for r in c.execute(sa.select(sites_t).order_by(sites_t.c.name))])

    def set_site_trust(self, name: str, untrusted: bool) -> None:
        """Mark a site untrusted (it may hold sealed objects only) or trusted again."""
        def run(conn: Connection) -> None:
            if conn.execute(sa.select(sites_t.c.name).where(sites_t.c.name == name)).first() is None:
                raise errors.NotFound(f"no site named {name!r}; see 'dgf admin site list'.")
            if untrusted:
                plain = conn.execute(sa.select(sa.func.count()).select_from(replicas).join(
                    objects, objects.c.key == replicas.c.key).where(
                    replicas.c.site == name, objects.c.seal.is_(None))).scalar() or 0
                if plain:
                    raise errors.UsageError(f"site {name} holds {plain} unsealed objects; drain it first "
                                            f"('dgf admin site drain {name}'), then mark it untrusted.")
            conn.execute(sites_t.update().where(sites_t.c.name == name).values(untrusted=untrusted))
        self._txn(run)

    def remove_site(self, name: str) -> int:
        def run(conn: Connection) -> int:
            n = conn.execute(replicas.delete().where(replicas.c.site == name)).rowcount
            if conn.execute(sites_t.delete().where(sites_t.c.name == name)).rowcount == 0:
                raise errors.NotFound(f"no site named {name!r} is registered.")
            return n
        return self._txn(run)

    def add_grant(self, principal: str, query: str, xpath: str, until: float, by: str,
                  sign: Callable[[int], str]) -> int:
        """Record a grant; ``sign(id)`` makes its signature once the id is known."""
        def run(conn: Connection) -> int:
            gid = inserted_id(conn.execute(grants_t.insert().values(
                principal=principal, query=query, xpath=xpath, until=until, granted_by=by,
                created=time.time(), token="")))
            conn.execute(grants_t.update().where(grants_t.c.id == gid).values(token=sign(gid)))
            return gid
        return self._txn(run)

    def grants(self, principal: str | None = None) -> list[dict[str, Any]]:
        def run(conn: Connection) -> list[dict[str, Any]]:
            q = sa.select(grants_t).order_by(grants_t.c.id)
            if principal is not None:
                q = q.where(grants_t.c.principal == principal)
            return [dict(r._mapping) for r in conn.execute(q)]
        return self._read(run)

    def remove_grant(self, gid: int) -> None:
        def run(conn: Connection) -> None:
            if conn.execute(grants_t.delete().where(grants_t.c.id == gid)).rowcount == 0:
                raise errors.NotFound(f"no grant with id {gid}.")
        self._txn(run)

    def get_setting(self, name: str) -> str | None:
        return self._read(lambda c: c.execute(sa.select(settings_t.c.value).where(
            settings_t.c.name == name)).scalar())

    def upload_facts(self, settings: tuple[str, ...]) -> UploadFacts:
        # In the driver's own SQL: read for every upload, SQLAlchemy's statement handling cost
        # twice what the three queries do (229 against 80 us on SQLite).
        mark = "?" if self.is_sqlite else "%s"

        def run(conn: Connection) -> UploadFacts:
            values = conn.exec_driver_sql(f"SELECT name, value FROM settings WHERE name IN "
                                          f"({', '.join([mark] * len(settings))})", tuple(settings)).all()
            sites = [Site(name, host, int(port), key, zone or "", bool(untrusted)) for name, host, port, key, zone,
                     untrusted in conn.exec_driver_sql("SELECT name, host, port, host_key, zone, untrusted FROM "
                                                       "sites ORDER BY name")]
            return UploadFacts(sites, {name: value for name, value in values}, self._overrides(conn))
        return self._read(run)

    def set_setting(self, name: str, value: str) -> None:
        def run(conn: Connection) -> None:
            conn.execute(settings_t.delete().where(settings_t.c.name == name))
            conn.execute(settings_t.insert().values(name=name, value=value))
        self._txn(run)

    def add_patient_keys(self, wrapped: dict[str, bytes]) -> None:
        """Store the wrapped data keys of new patients in one transaction (existing ones win)."""
        if wrapped:
            now = time.time()
            self._txn(lambda c: c.execute(self._insert_ignore(patients), [
                {"pseudonym": k, "wrapped_key": v, "created": now} for k, v in wrapped.items()]))

    def patient_keys(self, names: list[str]) -> dict[str, bytes]:
        def run(conn: Connection) -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            for i in range(0, len(names), 500):
                for r in conn.execute(sa.select(patients.c.pseudonym, patients.c.wrapped_key).where(
                        patients.c.pseudonym.in_(names[i:i + 500]))):
                    out[r.pseudonym] = bytes(r.wrapped_key)
            return out
        return self._read(run)

    def patient_key(self, patient: str) -> bytes | None:
        value = self._read(lambda c: c.execute(sa.select(patients.c.wrapped_key).where(
            patients.c.pseudonym == patient)).scalar())
        return None if value is None else bytes(value)

    def add_patient_key(self, patient: str, wrapped: bytes) -> bytes:
        def run(conn: Connection) -> bytes:
            conn.execute(self._insert_ignore(patients), [{"pseudonym": patient, "wrapped_key": wrapped,
                                                          "created": time.time()}])
            return bytes(conn.execute(sa.select(patients.c.wrapped_key).where(
                patients.c.pseudonym == patient)).scalar_one())
        return self._txn(run)

    def rewrap_patient_keys(self, rewrap: Callable[[bytes, bytes], bytes], kek_id: str) -> int:
        """Re-wrap every patient's data key with ``rewrap(wrapped, label)`` and record the new
        key-encryption key's id, in one transaction: all or nothing."""
        def run(conn: Connection) -> int:
            rows = conn.execute(sa.select(patients.c.pseudonym, patients.c.wrapped_key)).all()
            for r in rows:
                conn.execute(patients.update().where(patients.c.pseudonym == r.pseudonym).values(
                    wrapped_key=rewrap(bytes(r.wrapped_key), r.pseudonym.encode())))
            conn.execute(settings_t.delete().where(settings_t.c.name == "vault.kek_id"))
            conn.execute(settings_t.insert().values(name="vault.kek_id", value=kek_id))
            return len(rows)
        return self._txn(run)

    def erase_patient(self, patient: str) -> int:
        def run(conn: Connection) -> int:
            n = conn.execute(identities.delete().where(identities.c.patient == patient)).rowcount
            conn.execute(study_keys.delete().where(study_keys.c.patient == patient))
            conn.execute(patients.delete().where(patients.c.pseudonym == patient))
            return n
        return self._txn(run)

    def study_keys(self, studies: list[str]) -> dict[str, tuple[str, bytes]]:
        """(patient, wrapped key) of those of ``studies`` that have a data key."""
        def run(conn: Connection) -> dict[str, tuple[str, bytes]]:
            out: dict[str, tuple[str, bytes]] = {}
            for part in slices(studies):
                for r in conn.execute(sa.select(study_keys).where(study_keys.c.study.in_(part))):
                    out[r.study] = (r.patient, bytes(r.wrapped))
            return out
        return self._read(run)

    def add_study_keys(self, rows: dict[str, tuple[str, bytes]]) -> None:
        """Store new studies' wrapped data keys in one transaction (existing ones win)."""
        if rows:
            now = time.time()
            self._txn(lambda c: c.execute(self._insert_ignore(study_keys), [
                {"study": k, "patient": p, "wrapped": w, "created": now} for k, (p, w) in rows.items()]))

    def backup_to(self, path: str) -> None:
        if not self.is_sqlite:
            raise errors.UsageError("this metaserver keeps its data in PostgreSQL: back it up with pg_dump "
                                    "(README, 'Backup'), which is online and consistent.")
        import sqlite3

        raw = self.engine.raw_connection()
        try:
            target = sqlite3.connect(path)
            try:
                # SQLite's online backup API: pages copied in steps, writers not blocked for long.
                raw.driver_connection.backup(target, pages=1024)  # type: ignore[union-attr]
            finally:
                target.close()
        finally:
            raw.close()

    def identity(self, object_key: str) -> tuple[str, bytes, bytes] | None:
        def run(conn: Connection) -> tuple[str, bytes, bytes] | None:
            row = conn.execute(sa.select(identities.c.patient, identities.c.sealed, patients.c.wrapped_key)
                               .join(patients, patients.c.pseudonym == identities.c.patient)
                               .where(identities.c.object_key == object_key)).first()
            return None if row is None else (row.patient, bytes(row.wrapped_key), bytes(row.sealed))
        return self._read(run)

    def identified_sizes(self, keys: list[str]) -> dict[str, int]:
        def run(conn: Connection) -> dict[str, int]:
            rows = conn.execute(sa.select(identities.c.object_key, identities.c.size).where(
                identities.c.object_key.in_(keys), identities.c.size.is_not(None)))
            return {r.object_key: int(r.size) for r in rows}
        return self._read(run) if keys else {}

    def replication_overrides(self) -> dict[str, int]:
        return self._read(self._overrides)

    def _overrides(self, conn: Connection) -> dict[str, int]:
        rows = conn.exec_driver_sql(f"SELECT ino, value FROM xattrs WHERE {REPLICAS_ONLY}").all()
        if not rows:
            return {}                  # the usual case: no directory map needed
        dirs = self._dir_paths(conn)
        out = {}
        for r in rows:
            try:
                n = int(bytes(r[1]))
            except ValueError:
                continue
            if r[0] in dirs:
                out[dirs[r[0]]] = n
        return out
