"""FDK weights: the cosine weight of each detector pixel and Parker's short-scan weights.

Both use detector coordinates scaled to the isocenter plane, ``a = u * SID / SDD`` (and b).
"""

from __future__ import annotations

import numpy as np

from ioserver.recon.geometry import Geometry


def iso_coordinates(g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): detector column and row centres scaled to the isocenter plane, mm."""
    scale = g.sid / g.sdd
    return g.detector_u() * scale, g.detector_v() * scale


def cosine(g: Geometry) -> np.ndarray:
    """Feldkamp's cosine weight SID / sqrt(SID^2 + a^2 + b^2), shape (nv, nu)."""
    a, b = iso_coordinates(g)
    weight: np.ndarray = (g.sid / np.sqrt(g.sid ** 2 + a[None, :] ** 2 + b[:, None] ** 2)).astype(np.float32)
    return weight


def angular(g: Geometry) -> np.ndarray:
    """Each projection's share of the angular integral, radians: half the gap to its neighbours
    (so irregular spacing is handled), shape (n_projections,)."""
    beta = np.unwrap(np.asarray(g.angles, dtype=np.float64))
    order = np.argsort(beta)
    b = beta[order]
    if g.is_short_scan():
        gaps = np.diff(b)
        d = np.empty_like(b)
        d[1:-1] = (gaps[:-1] + gaps[1:]) / 2
        d[0], d[-1] = gaps[0] / 2, gaps[-1] / 2
    else:
        ext = np.concatenate([b[-1:] - 2 * np.pi, b, b[:1] + 2 * np.pi])
        d = (ext[2:] - ext[:-2]) / 2
    out = np.empty_like(d)
    out[order] = d
    return out


def redundancy(g: Geometry) -> np.ndarray:
    """Weight of each ray for the redundancy of the scan, shape (n_projections, nu).

    A full scan sees every ray twice: 1/2.  A short scan (less than a full turn) gets Parker's
    weights (Parker 1982, Med. Phys. 9:254), smooth in the angle and summing to 1 over each pair
    of redundant rays; the scan must cover at least pi plus the fan angle.
    """
    n, nu = g.n_projections, g.detector_shape[0]
    if not g.is_short_scan():
        return np.full((n, nu), 0.5, dtype=np.float32)
    a, _ = iso_coordinates(g)
    gamma = np.arctan(a / g.sid)  # fan angle of each column; positive towards +u
    delta = float(np.max(np.abs(gamma)))
    beta = np.unwrap(np.asarray(g.angles, dtype=np.float64))
    start = beta.min()
    span = beta.max() - start
    if span < np.pi + 2 * delta - 1e-6:
        from dgf import errors

        raise errors.UsageError(
            f"geometry field 'angles' covers {np.degrees(span):.1f} degrees; a short scan needs at "
            f"least 180 + fan angle = {np.degrees(np.pi + 2 * delta):.1f} degrees.")
    bp = (beta - start)[:, None]
    # Parker's weights are written for a scan of exactly pi + 2 delta; a longer one is treated
    # as pi + 2 delta' with delta' = (span - pi) / 2.
    d = (span - np.pi) / 2
    g_ = -gamma[None, :]  # with these axes the redundant ray of (beta, gamma) is at beta + pi - 2 gamma
    w = np.ones((n, nu))
    rise = bp < 2 * (d - g_)
    fall = bp > np.pi - 2 * g_
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(rise, np.sin(np.pi / 4 * bp / (d - g_)) ** 2, w)
        w = np.where(fall, np.sin(np.pi / 4 * (np.pi + 2 * d - bp) / (d + g_)) ** 2, w)
    return np.nan_to_num(w).astype(np.float32)
