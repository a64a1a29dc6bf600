"""``Client``: the Python API that does the work; the CLI, the FUSE layer and the gateways are
thin shells.

The client is a facade: connections (the metaserver link, one link per site, the one object
reader), the namespace, extended attributes, queries and administration live here; uploads in
:mod:`dgf.upload`, downloads in :mod:`dgf.download` and reconstruction near the data in
:mod:`dgf.reconstruct`, each reached through this class's methods of the same names.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, BinaryIO

from dgf import errors
from dgf.config import ClientConfig
from dgf.reports import DownloadReport, Failure, Progress, UploadReport
from dgf.transport import KEPT, UNREACHABLE_S, MetaLink, SiteLink
from dgf.types import HEADER_XATTR, Site, Stat

if TYPE_CHECKING:
    from concurrent.futures import Future
    from pathlib import Path

    from dgf.dicom.profile import Options
    from dgf.download import Downloads
    from dgf.mux import Sharing
    from dgf.reader import ObjectReader
    from dgf.reconstruct import ReconResult, Reconstruction
    from dgf.sshlib import paramiko
    from dgf.upload import BATCH, Uploads

__all__ = ["BATCH", "HEADER_XATTR", "Client", "DownloadReport", "Failure", "ReconResult", "UploadReport"]



def __getattr__(name: str) -> Any:
    """``dgf.client.BATCH`` and ``dgf.client.ReconResult``, from the modules they live in, which
    a command that moves no object never imports."""
    if name == "BATCH":
        from dgf.upload import BATCH

        return BATCH
    if name == "ReconResult":
        from dgf.reconstruct import ReconResult

        return ReconResult
    raise AttributeError(f"module 'dgf.client' has no attribute {name!r}")

log = logging.getLogger("dgf.client")

#: The metaserver's longest query (seconds); the client waits that long for a query's reply.
QUERY_LIMIT_S = 300.0
#: Where in the config's cache a client opening links ahead keeps the sites it used, and how
#: many of them the next one connects to before the metaserver names them.
SITES_CACHE = "sites.json"
AHEAD_SITES = 4
#: The archive's de-identification options as the last client learnt them, by archive.
OPTIONS_CACHE = "deid-options.json"
#: Principal checks that matched, by metaserver, host key, client key and name (check_principal).
PRINCIPAL_CACHE = "principal.json"
#: How long a matched check stands for the next commands on their own connections: it warns of
#: a config naming another principal than its key's (the key decides who acts), so a renamed
#: enrolment is told within a day, and each command spares a round trip.
PRINCIPAL_CHECK_S = 24 * 3600.0
#: Entries a cache file of the client keeps (by archive, or by archive and key).
CACHE_ENTRIES = 32
#: Paths per ``xattr.get_many`` request (the metaserver's list_items is 10,000 by default).
XATTRS_ASKED = 1000


def _close_unused(pending: Future[SiteLink]) -> None:
    """Close a link opened ahead that no one took (one that failed to open has nothing to close)."""
    if not pending.cancelled() and pending.exception() is None:
        pending.result().close()


def _read_private(path: Path) -> dict[str, Any]:
    """A cache file of the client's holding a JSON object ({} when missing or unreadable)."""
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def _write_private(path: Path, value: object) -> None:
    """A cache file of the client's (JSON), written whole, then renamed, readable by the user
    only; not written at all when it cannot be (a cache: the next command does without)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(value, fh)
        os.replace(tmp, path)
    except OSError:
        pass


class Client:
    """A connection to one dgf federation as one principal.

    Parameters
    ----------
    config
        A :class:`ClientConfig`, a config file path, or None for ``$DGF_CONFIG``.
    options
        De-identification options for uploads (defaults: :class:`Options`).
    shared
        Reach the metaserver through a connection master (:mod:`dgf.mux`) when one runs for
        this config, and start one for the next command when none does: what the CLI's short
        commands do.  Off by default: a program that holds its client keeps its own connection.
    links_ahead
        Connect to the sites the last such client of this config used while the metaserver
        connection is made, and remember the sites this one used (``cache_dir/sites.json``):
        what ``dgf_up`` and ``dgf_down`` do, six round trips less on a long link.  A link
        opened ahead is used only if the metaserver names its site the same way.
    """

    def __init__(self, config: ClientConfig | str | os.PathLike[str] | None = None,
                 options: Options | None = None, shared: bool = False, links_ahead: bool = False) -> None:
        self.config = config if isinstance(config, ClientConfig) else ClientConfig.load(config)
        #: What the caller asked for; the archive's policy decides (see upload_options).
        self.requested = options
        self._archive_options: Options | None = None
        self._archive_names: list[str] | None = None
        #: The options in use are the archive's as it said them (not only remembered).
        self.options_confirmed = False
        self._sharing: Sharing | None = None
        if shared:
            from dgf.mux import Sharing

            self._sharing = Sharing(self.config)
        self._links: dict[str, SiteLink] = {}
        self._site_info: dict[str, Site] = {}
        self._unreachable: dict[str, tuple[float, errors.TransportError]] = {}
        self._lock = threading.Lock()
        self._links_ahead = links_ahead
        self._ahead: dict[str, tuple[Site, Future[SiteLink]]] = {}
        if links_ahead:
            self._open_links_ahead()
        try:
            self.meta = MetaLink(self.config.metaserver, lambda: self._key, self.config.metaserver_host_key,
                                 read_timeout=self.config.timeout,
                                 shared=self._sharing.attach if self._sharing is not None else None)
        except BaseException:
            for _, pending in self._ahead.values():
                pending.add_done_callback(_close_unused)
            raise

    @functools.cached_property
    def _key(self) -> paramiko.PKey:
        """The principal's key, loaded for a connection of this client's own (a command whose
        metaserver link goes through a connection master never loads paramiko)."""
        from dgf import crypto

        return crypto.load_paramiko_key(self.config.key)

    # A command that reads or writes no object (ls, stat, find) imports none of these (17 ms).

    @functools.cached_property
    def uploads(self) -> Uploads:
        from dgf.upload import Uploads

        return Uploads(self)

    @functools.cached_property
    def reconstruction(self) -> Reconstruction:
        from dgf.reconstruct import Reconstruction

        return Reconstruction(self)

    @functools.cached_property
    def reader(self) -> ObjectReader:
        """Every object read (download, read_file, the mount) goes through this one reader."""
        from dgf.reader import ObjectReader

        return ObjectReader(self)

    @functools.cached_property
    def downloads(self) -> Downloads:
        from dgf.download import Downloads

        return Downloads(self)

    def upload_options(self) -> Options:
        """The archive's de-identification options (set by an admin), with this client's
        per-upload burned-in acknowledgement.  Asking for other options is refused: they are
        the archive's policy, not each uploader's.  Fetched once, or taken from what the last
        client of this archive learnt (``cache_dir``): every batch's ``up.prepare`` names the
        archive's options, and a batch analysed with others is done again
        (:meth:`archive_options_are`)."""
        if self._archive_options is not None:
            return self._archive_options
        names = self._remembered_options()
        if names is not None:
            try:
                return self._learn_options(names)
            except errors.UsageError:
                pass                         # perhaps changed since: the archive says
        names = list(self.meta.call("deid.options")[0]["options"])
        self._remember_options(names)
        self.options_confirmed = True
        return self._learn_options(names)

    def archive_options_are(self, names: list[str]) -> bool:
        """Whether this client de-identifies with the archive's options ``names`` (as a batch's
        ``up.prepare`` names them); when not, it learns them for what follows."""
        self.options_confirmed = True
        if self._archive_names is not None and sorted(self._archive_names) == sorted(names):
            return True
        self._learn_options(names)
        self._remember_options(names)
        return False

    def _learn_options(self, names: list[str]) -> Options:
        from dgf.dicom.profile import Options

        wanted = self.requested
        archive = Options.archive(names, allow_burned_in=bool(wanted and wanted.allow_burned_in),
                                  allow_truncated=bool(wanted and wanted.allow_truncated))
        if wanted is not None and wanted.enabled() != archive.enabled() and wanted != Options(
                allow_burned_in=wanted.allow_burned_in, allow_truncated=wanted.allow_truncated):
            raise errors.UsageError(
                f"de-identification options are set per archive ({', '.join(names) or 'basic profile only'}); "
                "an admin changes them with 'dgf admin deid set'.")
        self._archive_options, self._archive_names = archive, list(names)
        return archive

    def _archive_memo(self) -> str:
        """What is remembered of this archive is filed under: its metaserver and host key."""
        where = ",".join(f"{h}:{p}" for h, p in self.config.metaserver)
        return hashlib.sha256(f"{where}\0{self.config.metaserver_host_key}".encode()).hexdigest()[:32]

    def _remembered_options(self) -> list[str] | None:
        got = _read_private(self.config.cache_dir / OPTIONS_CACHE).get(self._archive_memo())
        return [str(n) for n in got] if isinstance(got, list) else None

    def _remember_options(self, names: list[str]) -> None:
        known = _read_private(self.config.cache_dir / OPTIONS_CACHE)
        if known.get(self._archive_memo()) == names:
            return
        known[self._archive_memo()] = names
        _write_private(self.config.cache_dir / OPTIONS_CACHE, dict(list(known.items())[-CACHE_ENTRIES:]))

    def close(self) -> None:
        connected = self.meta.conn.alive
        if "reader" in self.__dict__:
            self.reader.close()
        if self._links_ahead:
            # The sites used now, then those opened ahead and not needed this time (a download
            # from one site after an upload to two) that answered where the cache said.
            keep = [self._site_info[n] for n in self._links if n in self._site_info]
            keep += [site for name, (site, pending) in self._ahead.items()
                     if name not in self._links and pending.done() and pending.exception() is None
                     and self._site_info.get(name, site) == site]
            if keep:
                self._remember_sites(keep[:AHEAD_SITES])
        for _, pending in self._ahead.values():
            pending.add_done_callback(_close_unused)
        for link in self._links.values():
            link.close()
        self.meta.close()
        if self._sharing is not None:
            self._sharing.close(connected)   # none answered: one starts for the next command

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sites ----------------------------------------------------------------------------

    def whoami(self) -> dict[str, str]:
        return self.meta.call("whoami")[0]

    def check_principal(self) -> str | None:
        """A sentence when the config's ``principal`` is not the name its key is enrolled
        under (the key decides who acts; a config saying otherwise misleads its reader)."""
        # Through a connection master, as it learnt when it connected; on a connection of its
        # own, as a check in the last PRINCIPAL_CHECK_S found it: a round trip less either way.
        me, asked = self.meta.conn.who, None
        if me is None and "_key" in vars(self):   # a connection of its own, which loaded the key
            memo = self._principal_memo()
            me = self._remembered_principal(memo)
            if me is None:
                me, asked = self.whoami(), memo
        if me is None:
            me = self.whoami()
        if me.get("name") == self.config.principal:
            if asked is not None:
                self._remember_principal(asked, me)
            return None
        return (f"config file {self.config.path} names principal {self.config.principal!r}, but its key "
                f"{self.config.key} is enrolled as {me.get('name')!r} (role {me.get('role')}); "
                f"acting as {me.get('name')!r}.")

    def _principal_memo(self) -> str:
        """What a remembered check is filed under: this metaserver, its host key, this client's
        key and the name its config gives."""
        from dgf import crypto

        text = f"{self._archive_memo()}\0{crypto.fingerprint(self._key)}\0{self.config.principal}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _remembered_principal(self, memo: str) -> dict[str, str] | None:
        entry = _read_private(self.config.cache_dir / PRINCIPAL_CACHE).get(memo)
        if not isinstance(entry, dict) or not isinstance(entry.get("at"), (int, float)) or \
                not 0 <= time.time() - entry["at"] < PRINCIPAL_CHECK_S or entry.get("name") != self.config.principal:
            return None
        return {"name": str(entry["name"]), "role": str(entry.get("role", ""))}

    def _remember_principal(self, memo: str, me: dict[str, str]) -> None:
        """File a matched check (written whole, then renamed, readable by the user only)."""
        checks = _read_private(self.config.cache_dir / PRINCIPAL_CACHE)
        checks[memo] = {"name": me.get("name"), "role": me.get("role"), "at": time.time()}
        newest = sorted(checks.items(), key=lambda kv: -float(kv[1].get("at", 0)) if isinstance(kv[1], dict) else 0)
        _write_private(self.config.cache_dir / PRINCIPAL_CACHE, dict(newest[:CACHE_ENTRIES]))

    def sites(self) -> list[Site]:
        sites = [Site.from_wire(s) for s in self.meta.call("site.list")[0]["sites"]]
        self._learn_sites(sites)
        return sites

    def _learn_sites(self, sites: Iterable[Site]) -> None:
        with self._lock:
            for s in sites:
                old = self._site_info.get(s.name)
                if old is not None and old != s and s.name in self._links:
                    self._links.pop(s.name).close()  # the site moved or restarted elsewhere
                self._site_info[s.name] = s

    def site_link(self, name: str) -> SiteLink:
        with self._lock:
            link = self._links.get(name)
            if link is not None and link.conn.transport.is_active():
                return link
            site = self._site_info.get(name)
            ahead = self._ahead.pop(name, None)
        if site is None:
            self.sites()
            site = self._site_info.get(name)
            if site is None:
                raise errors.NotFound(f"site {name!r} is not registered at the metaserver.")
        failed = self._unreachable.get(name)
        if failed is not None and time.monotonic() - failed[0] < UNREACHABLE_S:
            raise failed[1]                  # a site that just failed to answer fails fast
        try:
            if ahead is not None and ahead[0] == site:
                link = ahead[1].result()     # opened ahead, to the address and host key named now
            else:
                if ahead is not None:
                    ahead[1].add_done_callback(_close_unused)    # the site moved: not this one
                link = SiteLink(site, self._key, read_timeout=self.config.timeout)
        except errors.TransportError as exc:
            self._unreachable[name] = (time.monotonic(), exc)
            raise
        self._unreachable.pop(name, None)
        with self._lock:
            self._links[name] = link
        return link

    def _open_links_ahead(self) -> None:
        """Start connecting, while the metaserver connection is made, to the sites the last
        client of this config with ``links_ahead`` used (its cache's SITES_CACHE, at most
        AHEAD_SITES): a site's TCP and SSH handshakes and its channel are six round trips a
        command otherwise waits for after the metaserver has named the site.  A link opened
        ahead is used only if the metaserver then names its site at the same address with the
        same host key (before any capability or byte goes on it); any other is closed unused."""
        try:
            cached = [Site.from_wire(s) for s in json.loads((self.config.cache_dir / SITES_CACHE).read_text())]
        except (OSError, ValueError, KeyError, TypeError):
            return                           # none yet, or unreadable: connect when named
        cached = cached[:AHEAD_SITES]
        if not cached:
            return
        from concurrent.futures import Future

        key = self._key
        for site in cached:
            pending: Future[SiteLink] = Future()

            # A daemon thread: a handshake still waiting on a site that does not answer must
            # not keep a finished command from exiting.
            def connect(site: Site = site, pending: Future[SiteLink] = pending) -> None:
                try:
                    pending.set_result(SiteLink(site, key, read_timeout=self.config.timeout))
                except BaseException as exc:         # noqa: BLE001 - handed to whoever takes the link
                    pending.set_exception(exc)
            threading.Thread(target=connect, name=f"dgf-ahead-{site.name}", daemon=True).start()
            self._ahead[site.name] = (site, pending)

    def _remember_sites(self, sites: list[Site]) -> None:
        """Keep ``sites`` for the next client's links ahead."""
        _write_private(self.config.cache_dir / SITES_CACHE, [s.to_wire() for s in sites])

    def _drop_link(self, name: str, why: errors.DgfError | None = None) -> None:
        """Forget the link to a site after a failure; a transport failure (the site died or
        hangs) also marks the site unreachable for a while, so copies are placed elsewhere."""
        with self._lock:
            link = self._links.pop(name, None)
            if isinstance(why, errors.TransportError):
                self._unreachable[name] = (time.monotonic(), why)
        if link is not None:
            link.close()

    # -- namespace ------------------------------------------------------------------------

    def stat(self, path: str) -> Stat:
        return Stat.from_wire(self.meta.call("ns.stat", path=path)[0])

    def ls(self, path: str = "/") -> list[Stat]:
        return [Stat.from_wire(d) for d in json.loads(self.meta.call("ns.readdir", path=path)[1])]

    def identified_sizes(self, keys: list[str]) -> dict[str, int]:
        """Object key -> size of its identified original (principals who may see identity)."""
        out: dict[str, int] = {}
        for i in range(0, len(keys), 5000):
            out.update(self.meta.call("identity.sizes", keys=keys[i:i + 5000])[0]["sizes"])
        return out

    def mkdir(self, path: str, parents: bool = False, mode: int = 0o755) -> Stat:
        return Stat.from_wire(self.meta.call("ns.mkdir", path=path, parents=parents, mode=mode)[0])

    def mv(self, src: str, dst: str) -> None:
        self._free(*self.meta.call("ns.rename", src=src, dst=dst))

    def rm(self, path: str, recursive: bool = False) -> int:
        """Remove a file (or, with ``recursive``, a tree); return the number of files removed."""
        st = self.stat(path)
        if not st.is_dir:
            self._free(*self.meta.call("ns.unlink", path=path))
            return 1
        if not recursive:
            raise errors.IsADirectory(f"{path} is a directory; use -r to remove it and its contents.")
        result, payload = self.meta.call("ns.rmtree", path=path)       # one transaction on the server
        self._free(result, payload)
        return int(result["files"])

    def rmdir(self, path: str) -> None:
        self.meta.call("ns.rmdir", path=path)

    def chmod(self, path: str, mode: int) -> None:
        self.meta.call("ns.chmod", path=path, mode=mode)

    def _free(self, reply: dict[str, Any], payload: bytes = b"") -> None:
        """Delete the objects a reply released at their sites (its ``release``, in its header or,
        when large, its payload); failures only leave garbage, never data loss."""
        release = reply.get("release") or (json.loads(payload).get("release") if payload else None) or {}
        for site, grant in release.items():
            try:
                left = self.site_link(site).delete_many(grant["keys"], grant["cap"])
            except errors.DgfError as exc:
                log.warning("could not free released objects at site %s: %s", site, exc)
                continue
            refused = {key: why for key, why in left.items() if why != KEPT}
            if refused:
                key, why = next(iter(refused.items()))
                log.warning("site %s did not delete %d released object(s), %s... among them: %s",
                            site, len(refused), key[:16], why)

    # -- xattrs ---------------------------------------------------------------------------

    def getxattr(self, path: str, name: str) -> bytes:
        return self.meta.call("xattr.get", path=path, name=name)[1]

    def getxattrs(self, paths: list[str], name: str) -> list[bytes]:
        """Attribute ``name`` of each of ``paths``, in order, in as few round trips as the
        metaserver's reply size allows (``xattrs_reply_bytes``)."""
        out: list[bytes] = []
        while len(out) < len(paths):
            reply, payload = self.meta.call("xattr.get_many", paths=paths[len(out):len(out) + XATTRS_ASKED],
                                            name=name)
            sizes = [int(n) for n in reply.get("sizes") or []]
            if not sizes or sum(sizes) != len(payload):
                raise errors.TransportError("the metadata server's reply to xattr.get_many does not add up.")
            at = 0
            for n in sizes:
                out.append(payload[at:at + n])
                at += n
        return out

    def listxattr(self, path: str) -> list[str]:
        return list(self.meta.call("xattr.list", path=path)[0]["names"])

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self.meta.call("xattr.set", value, path=path, name=name)

    def removexattr(self, path: str, name: str) -> None:
        self.meta.call("xattr.remove", path=path, name=name)

    # -- query ----------------------------------------------------------------------------

    def find(self, xpath: str, root: str = "/", show: Iterable[str] = (), limit: int = 0,
             timeout: float = 0.0, level: str = "instance",
             on_warning: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
        """Files under ``root`` whose XML header matches ``xpath`` (XPath 1.0, or @NAME)."""
        return list(self.find_iter(xpath, root, show, limit, timeout, level, on_warning))

    def find_iter(self, xpath: str, root: str = "/", show: Iterable[str] = (), limit: int = 0,
                  timeout: float = 0.0, level: str = "instance",
                  on_warning: Callable[[str], None] | None = None, page: int = 0, after: int = 0
                  ) -> Generator[dict[str, Any], None, None]:
        """Stream the matches page by page (results larger than memory never gather anywhere).

        Each row: ``path`` (or, with ``level``, the group's UID, ``files`` and ``path``),
        ``values`` (text, multi-values joined by backslashes) and ``vr`` (each present value's
        VR).  What the server noticed about the expression (a name that is no DICOM keyword, an
        ISO date read as a DICOM date) goes to ``on_warning``, else to this module's log.
        ``page``: rows in the first page, doubling after, and each row's ``ino`` (for a caller
        that may stop early); ``after``: the scan starts after that inode."""
        more: dict[str, Any] = {k: v for k, v in (("page", page), ("after", after)) if v}
        result, body = self.meta.call("find", wait_s=self._query_wait(timeout), xpath=xpath, root=root,
                                      show=list(show), limit=limit, timeout=timeout, level=level, **more)
        for w in result.get("warnings") or []:
            (on_warning or log.warning)(str(w))
        cursor = result.get("cursor")
        try:
            while True:
                for line in body.splitlines():
                    if line:
                        yield json.loads(line)
                if not cursor:
                    return
                result, body = self.meta.call("find.next", wait_s=self._query_wait(timeout), cursor=cursor)
                cursor = result.get("cursor")
        finally:
            if cursor:                       # stopped early: free the server's cursor
                try:
                    self.meta.call("find.close", cursor=cursor)
                except errors.DgfError:
                    pass

    def find_count(self, xpath: str, root: str = "/", timeout: float = 0.0, level: str = "instance",
                   on_warning: Callable[[str], None] | None = None) -> int:
        """How many files match (or, with ``level``, how many patients, studies or series)."""
        result, _ = self.meta.call("find", wait_s=self._query_wait(timeout), xpath=xpath, root=root,
                                   timeout=timeout, count=True, level=level)
        for w in result.get("warnings") or []:
            (on_warning or log.warning)(str(w))
        return int(result["count"])

    def _query_wait(self, timeout: float) -> float:
        """How long to wait for a query's reply: its own time limit (the server's is 300 s), plus
        the usual read deadline; a query is the one verb that may compute that long."""
        return (timeout if timeout > 0 else QUERY_LIMIT_S) + self.config.timeout

    def explain(self, xpath: str, root: str = "/") -> dict[str, Any]:
        """How the metadata server would answer ``xpath``: which predicates use the index."""
        result, _ = self.meta.call("find", xpath=xpath, root=root, explain=True)
        return {**result["explain"], "warnings": list(result.get("warnings") or [])}

    def save_query(self, name: str, xpath: str) -> str:
        """Save ``xpath`` as this principal's query ``name``; returns the full name
        (``principal/name``, or a shared bare name when an admin saves it)."""
        return str(self.meta.call("query.save", name=name, xpath=xpath)[0].get("name", name))

    def saved_queries(self) -> dict[str, str]:
        result, _ = self.meta.call("query.list")
        return dict(result["queries"])

    def remove_query(self, name: str) -> str:
        return str(self.meta.call("query.remove", name=name)[0].get("name", name))

    # -- upload (dgf/upload.py) ---------------------------------------------------------

    def upload(self, paths: Iterable[str | os.PathLike[str]], to: str | None = None,
               site: str | None = None, recursive: bool = False, progress: Progress | None = None,
               batch: int | None = None, replace: bool = False, spread: bool = False,
               on_total: Progress | None = None) -> UploadReport:
        """De-identify and upload files (directories with ``recursive``), ``batch`` files at a
        time (default ``dgf.upload.BATCH``). See :meth:`dgf.upload.Uploads.upload`."""
        return self.uploads.upload(paths=paths, to=to, site=site, recursive=recursive, progress=progress,
                                   replace=replace, spread=spread, on_total=on_total,
                                   **({} if batch is None else {"batch": batch}))

    def upload_bytes(self, data: bytes, path: str, site: str | None = None, replace: bool = True) -> None:
        """De-identify one file's bytes and publish it at ``path`` (the FUSE write path). See
        :meth:`dgf.upload.Uploads.upload_bytes`."""
        return self.uploads.upload_bytes(data=data, path=path, site=site, replace=replace)

    # -- download (dgf/download.py) -----------------------------------------------------

    def resolve(self, paths: list[str], identified: bool = False, xpath: str | None = None) -> dict[str, Any]:
        """Files under ``paths`` (with ``xpath``: whose header matches) with replicas, hash lists,
        capabilities (and identities when asked), gathered over as many requests and pages as
        the server's limits call for. See :meth:`dgf.download.Downloads.resolve`."""
        return self.downloads.resolve(paths=paths, identified=identified, xpath=xpath)

    def download(self, paths: list[str], out_dir: str | os.PathLike[str], identified: bool = False,
                 xpath: str | None = None, progress: Progress | None = None,
                 on_total: Progress | None = None) -> DownloadReport:
        """Fetch files (directories recursively) into ``out_dir``, mirroring names like ``cp -r``;
        with ``xpath``, the files under ``paths`` whose header matches, at their full paths. See
        :meth:`dgf.download.Downloads.download`."""
        return self.downloads.download(paths=paths, out_dir=out_dir, identified=identified, xpath=xpath,
                                       progress=progress, on_total=on_total)

    def fetch(self, paths: list[str], on_file: Callable[[str, bytes], None], identified: bool = False,
              progress: Progress | None = None) -> DownloadReport:
        """Fetch files (directories recursively) and hand each one's verified bytes to
        ``on_file(path, data)`` instead of writing them; called from transfer threads. See
        :meth:`dgf.download.Downloads.fetch`."""
        return self.downloads.fetch(paths=paths, on_file=on_file, identified=identified, progress=progress)

    def fetch_streams(self, paths: list[str], on_file: Callable[[str, bytes | BinaryIO], None],
                      identified: bool = False, progress: Progress | None = None,
                      stop: threading.Event | None = None) -> DownloadReport:
        """Fetch files, large ones as open, unlinked files ``on_file`` closes, until ``stop``. See
        :meth:`dgf.download.Downloads.fetch_streams`."""
        return self.downloads.fetch_streams(paths=paths, on_file=on_file, identified=identified, progress=progress,
                                            stop=stop)

    def read_file(self, path: str, identified: bool = False) -> bytes:
        """The whole content of one file (re-identified if asked and allowed), verified. See
        :meth:`dgf.download.Downloads.read_file`."""
        return self.downloads.read_file(path=path, identified=identified)

    def read_original(self, path: str, spool: Path) -> bytes | BinaryIO:
        """The exact original of one file, in memory or (large) as an open, unlinked file. See
        :meth:`dgf.download.Downloads.read_original`."""
        return self.downloads.read_original(path=path, spool=spool)

    def identity_summary(self, path: str) -> dict[str, Any]:
        """What de-identification removed from one file (clinicians; the release is audited). See
        :meth:`dgf.download.Downloads.identity_summary`."""
        return self.downloads.identity_summary(path=path)

    # -- reconstruction near the data (dgf/reconstruct.py) ------------------------------

    def recon_import(self, projections: Any, geometry: Any, to: str,
                     patient: dict[str, str] | None = None, progress: Progress | None = None) -> UploadReport:
        """Store a projection stack (n, nv, nu) with its geometry as a DICOM projection series under
        ``to``, de-identified like any upload and spread over the sites by instance. See
        :meth:`dgf.reconstruct.Reconstruction.recon_import`."""
        return self.reconstruction.recon_import(projections=projections, geometry=geometry, to=to,
                                                patient=patient, progress=progress)

    def recon(self, series: str, out: str, shape: tuple[int, int, int] | None = None,
              window: str = "hann", progress: Callable[[str], None] | None = None,
              replace: bool = False) -> ReconResult:
        """FDK of the projection series under ``series``, map-reduce over the sites that hold it.
        See :meth:`dgf.reconstruct.Reconstruction.recon`."""
        return self.reconstruction.recon(series=series, out=out, shape=shape, window=window,
                                         progress=progress, replace=replace)

    # -- administration -------------------------------------------------------------------

    def principal_add(self, name: str, role: str, public_key: str) -> dict[str, Any]:
        return self.meta.call("admin.principal.add", name=name, role=role, public_key=public_key)[0]

    def principal_remove(self, name: str) -> None:
        self.meta.call("admin.principal.remove", name=name)

    def principals(self) -> list[dict[str, Any]]:
        return list(self.meta.call("admin.principal.list")[0]["principals"])

    def audit_log(self, limit: int = 100, after: int = 0) -> list[dict[str, Any]]:
        """The newest ``limit`` audit records, or the oldest ``limit`` after record id ``after``."""
        if after:
            return list(self.meta.call("admin.audit", limit=limit, after=after)[0]["entries"])
        return list(self.meta.call("admin.audit", limit=limit)[0]["entries"])

    def audit_verify(self) -> dict[str, Any]:
        return dict(self.meta.call("admin.audit.verify")[0])

