"""Voxel-driven cone-beam back-projection, vectorised with numpy, memory bounded by z-slabs.

For a projection at angle beta and a voxel at (x, y, z), with s = x sin b + z cos b and
t = x cos b - z sin b, the magnification to the isocenter plane is m = SID / (SID - s); the voxel
projects to a = m t, b = m y and receives m^2 q(a, b) (Feldkamp's distance weight), with q
interpolated bilinearly.  Because m and a depend on (x, z) only, the interpolation along the
detector row is done once per (x, z) column of the slab and reused for every y.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ioserver.recon.geometry import Geometry
from ioserver.recon.weights import iso_coordinates

#: Voxels per slab.  Small enough that the dozen temporaries of one projection's update stay
#: in the CPU cache: numpy passes over cache-resident arrays run several times faster than over
#: the whole volume, and memory stays bounded (about 20 x this many float32 per slab).
SLAB_VOXELS = 2 ** 16
THREADS = os.cpu_count() or 1


def backproject(filtered: np.ndarray, g: Geometry, scale: np.ndarray,
                out: np.ndarray | None = None) -> np.ndarray:
    """Add ``scale[i] * m^2 * q_i(a, b)`` of every filtered projection into a volume [z, y, x].

    ``filtered`` is (n, nv, nu) float32 in iso-plane units; ``scale`` holds each projection's
    angular weight.  Returns ``out`` (allocated as zeros when None), float32.
    """
    nx, ny, nz = g.volume_shape
    vol = np.zeros((nz, ny, nx), dtype=np.float32) if out is None else out
    a_axis, b_axis = iso_coordinates(g)
    da, db = float(a_axis[1] - a_axis[0]), float(b_axis[1] - b_axis[0])
    nv, nu = g.detector_shape[1], g.detector_shape[0]
    # A zero border around each projection replaces masks: a ray off the detector reads zeros.
    padded = np.zeros((len(g.angles), nv + 2, nu + 2), dtype=np.float32)
    padded[:, 1:-1, 1:-1] = filtered
    top_a, top_b = np.float32(nu + 1 - 1e-3), np.float32(nv + 1 - 1e-3)
    xs = g.axis(0).astype(np.float32)
    ys = g.axis(1).astype(np.float32)[:, None]
    zs = g.axis(2).astype(np.float32)
    sid = np.float32(g.sid)
    planes = max(1, min(nz, SLAB_VOXELS // max(1, nx * ny)))

    def slab(z0: int) -> None:
        z1 = min(nz, z0 + planes)
        xf = np.tile(xs, z1 - z0)                                # (ncols,) x of each (z, x) column
        zf = np.repeat(zs[z0:z1], nx)
        ncols = xf.size
        cols = np.arange(ncols, dtype=np.int64)
        acc = np.zeros((ny, ncols), dtype=np.float32)            # [y, (z, x)] for contiguous rows
        for i, beta in enumerate(g.angles):
            cb, sb = np.float32(math.cos(beta)), np.float32(math.sin(beta))
            m = sid / (sid - (xf * sb + zf * cb))                # magnification to the iso plane
            # Detector column: interpolated once per (z, x), reused for every y.
            pa = (m * (xf * cb - zf * sb) - np.float32(a_axis[0])) * np.float32(1 / da) + 1
            np.clip(pa, 0, top_a, out=pa)
            ia = pa.astype(np.int64)
            wa = pa - ia
            q = padded[i]
            qa = q[:, ia]
            qa += (q[:, ia + 1] - qa) * wa                       # (nv + 2, ncols)
            # Detector row: per voxel.
            pb = ys * (m * np.float32(1 / db)) + np.float32(1 - b_axis[0] / db)   # (ny, ncols)
            np.clip(pb, 0, top_b, out=pb)
            ib = pb.astype(np.int64)
            pb -= ib                                             # now the row weight
            ib *= ncols
            ib += cols
            flat = qa.ravel()
            lo = flat.take(ib)
            ib += ncols
            hi = flat.take(ib)
            hi -= lo
            hi *= pb
            hi += lo
            hi *= m * m * np.float32(scale[i])
            acc += hi
        vol[z0:z1] += acc.reshape(ny, z1 - z0, nx).transpose(1, 0, 2)

    # Slabs are independent (each writes its own planes) and numpy releases the GIL inside its
    # loops, so threads use every core.
    starts = range(0, nz, planes)
    if THREADS > 1 and len(starts) > 1:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(slab, starts))
    else:
        for z0 in starts:
            slab(z0)
    return vol
