"""FDK (Feldkamp, Davis & Kress 1984) composed of the pure steps: weight, filter, back-project.

``partial_fdk`` reconstructs from some of the projections (one site's share); the sum of the
partial volumes over a partition of the projections equals ``fdk`` of all of them, because
every step is per projection and the back-projection is a sum.
"""

from __future__ import annotations

import numpy as np

from dgf import errors
from ioserver.recon import weights
from ioserver.recon.backproject import backproject
from ioserver.recon.filters import filter_rows
from ioserver.recon.geometry import Geometry


def _check(projections: np.ndarray, g: Geometry, n: int) -> None:
    nu, nv = g.detector_shape
    if projections.shape != (n, nv, nu):
        raise errors.UsageError(f"projections have shape {projections.shape}; the geometry expects "
                                f"({n}, {nv}, {nu}) as (projections, rows nv, columns nu).")


def partial_fdk(projections: np.ndarray, g: Geometry, indices: list[int], window: str = "ram-lak",
                chunk: int = 16) -> np.ndarray:
    """The contribution of projections ``indices`` of scan ``g`` (``projections`` holds just
    those, in that order) to the FDK volume, float32 [z, y, x]."""
    _check(projections, g, len(indices))
    a, _ = weights.iso_coordinates(g)
    da = float(a[1] - a[0])
    cos_w = weights.cosine(g)
    redundancy = weights.redundancy(g)[indices]
    dbeta = weights.angular(g)[indices]
    sub = g.subset(list(indices))
    nx, ny, nz = g.volume_shape
    vol = np.zeros((nz, ny, nx), dtype=np.float32)
    # Projections are weighted and filtered a few at a time, so memory stays bounded too.
    for start in range(0, len(indices), chunk):
        stop = min(len(indices), start + chunk)
        p = projections[start:stop].astype(np.float32) * cos_w[None]
        p *= redundancy[start:stop, None, :]
        q = filter_rows(p, da, window)
        part = sub.subset(list(range(start, stop)))
        backproject(q, part, dbeta[start:stop], out=vol)
    return vol


def fdk(projections: np.ndarray, g: Geometry, window: str = "ram-lak") -> np.ndarray:
    """FDK reconstruction of a whole scan, float32 volume indexed [z, y, x]."""
    return partial_fdk(projections, g, list(range(g.n_projections)), window)
