"""Where the copies of an object go, and how many there are: one rule for the client that
places them and the metaserver that checks them.

A directory's replication factor is set by an admin (``dgf admin replicas set DIR N``, kept as
the directory's ``user.dgf.replicas`` attribute) and inherited by everything below it; without
one the default is 2 whenever the federation has two or more sites, else 1.  Copies go to
distinct sites: the first chosen by the object's series (so a series stays together), the others
the next sites in name order, in distinct zones where sites declare them (``zone`` in a site's
config: a building, a rack).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping, Sequence

#: Copies kept by default once a federation has at least this many sites.
DEFAULT_COPIES = 2


def default_factor(n_sites: int) -> int:
    return DEFAULT_COPIES if n_sites >= DEFAULT_COPIES else 1


def set_at(path: str, overrides: Mapping[str, int]) -> str | None:
    """The nearest directory above ``path`` that sets a replication factor, if any.  A relative
    path (a caller's bug, or a hostile request) ends at its first component, never loops."""
    d = posixpath.dirname(path) or "/"
    while True:
        if d in overrides:
            return d
        parent = posixpath.dirname(d)
        if parent == d or not parent:
            return None
        d = parent


def factor(path: str, default: int, overrides: Mapping[str, int]) -> int:
    """The replication factor of the file at ``path``: its nearest ancestor's setting."""
    where = set_at(path, overrides)
    return default if where is None else overrides[where]


def choose(basis: str, sites: Sequence[str], n: int, first: str | None = None,
           zones: Mapping[str, str] | None = None, avoid: Sequence[str] = ()) -> list[str]:
    """``n`` distinct sites for an object: ``first`` (a site the uploader named) or one chosen
    by ``basis``, then the following sites in name order, each in a zone no chosen site (nor
    one in ``avoid``, sites that already hold a copy) is in while such sites remain."""
    ring = sorted(sites)
    if not ring:
        return []
    start = ring.index(first) if first in ring else int(hashlib.sha256(basis.encode()).hexdigest()[:8], 16) % len(ring)
    order = [ring[(start + i) % len(ring)] for i in range(len(ring))]
    def zone(site: str) -> str:
        return (zones or {}).get(site) or site                          # no zone: a zone of its own
    chosen: list[str] = []
    used = {zone(s) for s in avoid}
    for s in order:                              # first pass: distinct zones
        if len(chosen) < n and zone(s) not in used:
            chosen.append(s)
            used.add(zone(s))
    for s in order:                              # then any site left, if zones run out
        if len(chosen) < n and s not in chosen:
            chosen.append(s)
    return chosen
