"""Configuration files (INI), for the client and both servers.

A client config names the principal, its key, and the metaserver with its pinned host key; the
I/O sites (addresses and host keys) are learned from the metaserver, which the client trusts by
that pin.  Relative paths in a config file are relative to the file's directory.
"""

from __future__ import annotations

import configparser
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dgf import errors
from dgf.limits import Limits

ENV_CONFIG = "DGF_CONFIG"

log = logging.getLogger("dgf.config")

#: The keys each section understands; any other key is named in a warning (a typo such as
#: ``cahce_dir`` silently falling back to a default is worse than a line on stderr).
KNOWN = {
    "dgf": ("principal", "key", "metaserver", "metaserver_host_key", "cache_dir", "timeout",
            "shared_connection"),
    "metaserver": ("listen", "db", "host_key", "vault_key"),
    "ioserver": ("site", "listen", "store", "host_key", "key", "metaserver", "metaserver_host_key", "zone"),
    "dicom": ("ae_title", "listen", "spool", "callers", "identified", "destinations", "max_spool_mb",
              "max_memory_mb", "find_limit", "max_associations", "associations_per_address", "defer_upload_s",
              "certificate", "private_key", "client_ca"),
    "web": ("listen", "tokens", "spool", "viewer", "certificate", "private_key", "max_body_mb", "find_limit",
            "max_connections", "connections_per_address", "header_timeout_s"),
}
SECTIONS = (*KNOWN, "limits")


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not host:
        raise errors.ConfigError(f"{what} must be HOST:PORT, got {text!r}.")
    return host, int(port)


def parse_addresses(text: str, what: str) -> tuple[tuple[str, int], ...]:
    """One or more HOST:PORT, comma-separated: several metaserver processes over one
    PostgreSQL database, tried in the order given."""
    parts = [t for t in text.split(",") if t.strip()]
    if not parts:
        raise errors.ConfigError(f"{what} must be HOST:PORT (several comma-separated), got {text!r}.")
    return tuple(parse_address(t, what) for t in parts)


def read_section(path: Path, section: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError as exc:
        raise errors.ConfigError(f"config file {path} does not exist.") from exc
    except configparser.Error as exc:
        raise errors.ConfigError(f"config file {path} is not valid INI ({exc.message}).") from exc
    if not parser.has_section(section):
        raise errors.ConfigError(f"config file {path} has no [{section}] section.")
    values = dict(parser.items(section))
    for key in values:
        if key not in KNOWN[section]:
            log.warning("config file %s: unknown key %r in [%s] is ignored%s.", path, key, section,
                        _nearest(key, KNOWN[section]))
    for other in parser.sections():
        if other not in SECTIONS:
            log.warning("config file %s: unknown section [%s] is ignored%s.", path, other,
                        _nearest(other, SECTIONS))
    return values


def _nearest(word: str, known: tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(word.lower(), known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"


def read_limits(path: Path) -> Limits:
    """The optional ``[limits]`` section of a server config (defaults: :mod:`dgf.limits`)."""
    parser = configparser.ConfigParser(interpolation=None)
    with open(path, encoding="utf-8") as fh:
        parser.read_file(fh)
    if not parser.has_section("limits"):
        return Limits()
    return Limits.from_section(dict(parser.items("limits")), f"config file {path}")


def write_section(path: Path, section: str, values: dict[str, str]) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser[section] = values
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        parser.write(fh)
    os.replace(tmp, path)


def _need(values: dict[str, str], key: str, path: Path, section: str) -> str:
    if not values.get(key):
        raise errors.ConfigError(f"config file {path} lacks '{key}' in [{section}].")
    return values[key]


def _seconds(text: str, path: Path, key: str = "timeout", zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise errors.ConfigError(f"config file {path}: {key!r} must be a "
                                 f"{'non-negative' if zero else 'positive'} number of seconds, got {text!r}.")
    return value


def _rel(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


@dataclass(frozen=True)
class ClientConfig:
    path: Path
    principal: str
    key: Path
    #: Every metaserver process this client may use (one database behind them), in order.
    metaserver: tuple[tuple[str, int], ...]
    metaserver_host_key: str
    cache_dir: Path
    #: Seconds to wait for a server's next bytes before naming it as hung (``timeout`` key).
    timeout: float = 30.0
    #: Seconds a short command's shared metaserver connection (:mod:`dgf.mux`) outlives the
    #: last channel through it; 0: every command connects by itself.
    shared_connection: float = 300.0

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> ClientConfig:
        if path is None:
            path = os.environ.get(ENV_CONFIG)
        if not path:
            raise errors.ConfigError(
                "no client config given; pass --config FILE or set DGF_CONFIG "
                "(for a local federation: DIR/clinician.conf from 'dgf local up DIR')."
            )
        p = Path(path).resolve()
        v = read_section(p, "dgf")
        base = p.parent
        cache = v.get("cache_dir") or str(Path.home() / ".cache" / "dgf")
        return cls(
            path=p,
            principal=_need(v, "principal", p, "dgf"),
            key=_rel(base, _need(v, "key", p, "dgf")),
            metaserver=parse_addresses(_need(v, "metaserver", p, "dgf"), "metaserver"),
            metaserver_host_key=_need(v, "metaserver_host_key", p, "dgf"),
            cache_dir=_rel(base, cache),
            timeout=_seconds(v.get("timeout", "30"), p),
            shared_connection=_seconds(v.get("shared_connection", "300"), p, "shared_connection", zero=True),
        )


def _vault_spec(base: Path, value: str) -> str:
    return value if value.startswith("env:") else str(_rel(base, value))


@dataclass(frozen=True)
class MetaserverConfig:
    path: Path
    listen: tuple[str, int]
    db: str
    host_key: Path
    #: A file path (absolute), or ``env:NAME`` (metaserver/vaultkey.py).
    vault_key: str
    limits: Limits = Limits()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MetaserverConfig:
        p = Path(path).resolve()
        v = read_section(p, "metaserver")
        base = p.parent
        db = _need(v, "db", p, "metaserver")
        return cls(p, parse_address(_need(v, "listen", p, "metaserver"), "listen"), db,
                   _rel(base, _need(v, "host_key", p, "metaserver")),
                   _vault_spec(base, _need(v, "vault_key", p, "metaserver")), read_limits(p))


@dataclass(frozen=True)
class IoserverConfig:
    path: Path
    site: str
    listen: tuple[str, int]
    store: Path
    host_key: Path
    key: Path
    metaserver: tuple[tuple[str, int], ...]
    metaserver_host_key: str
    limits: Limits = Limits()
    #: A failure domain (building, rack, cloud region): copies of an object go to distinct zones.
    zone: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IoserverConfig:
        p = Path(path).resolve()
        v = read_section(p, "ioserver")
        base = p.parent
        return cls(
            p, _need(v, "site", p, "ioserver"),
            parse_address(_need(v, "listen", p, "ioserver"), "listen"),
            _rel(base, _need(v, "store", p, "ioserver")),
            _rel(base, _need(v, "host_key", p, "ioserver")),
            _rel(base, _need(v, "key", p, "ioserver")),
            parse_addresses(_need(v, "metaserver", p, "ioserver"), "metaserver"),
            _need(v, "metaserver_host_key", p, "ioserver"),
            read_limits(p),
            v.get("zone", ""),
        )
