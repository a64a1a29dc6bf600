"""The 3D Shepp-Logan phantom as ellipsoids: exact cone-beam line integrals and voxel sampling.

Ellipsoids of the modified 3D Shepp-Logan phantom (Kak & Slaney 1988, Table 3.1 extended to 3D
as in Toft 1996 and MATLAB's ``phantom3d``): centre, semi-axes, rotation about the phantom's axial
axis (degrees) and density, in units of the phantom radius.  The phantom's axial axis is laid
along the rotation axis (world y): phantom (X, Y, Z) -> world (x = X, y = Z, z = Y).
"""

from __future__ import annotations

import math

import numpy as np

from ioserver.recon.geometry import Geometry

#: (x0, y0, z0, a, b, c, phi_deg, density) in phantom units.
SHEPP_LOGAN = (
    (0.0, 0.0, 0.0, 0.69, 0.92, 0.90, 0.0, 1.0),
    (0.0, -0.0184, 0.0, 0.6624, 0.874, 0.88, 0.0, -0.8),
    (0.22, 0.0, 0.0, 0.11, 0.31, 0.22, -18.0, -0.2),
    (-0.22, 0.0, 0.0, 0.16, 0.41, 0.28, 18.0, -0.2),
    (0.0, 0.35, -0.15, 0.21, 0.25, 0.41, 0.0, 0.1),
    (0.0, 0.1, 0.25, 0.046, 0.046, 0.05, 0.0, 0.1),
    (0.0, -0.1, 0.25, 0.046, 0.046, 0.05, 0.0, 0.1),
    (-0.08, -0.605, 0.0, 0.046, 0.023, 0.05, 0.0, 0.1),
    (0.0, -0.605, 0.0, 0.023, 0.023, 0.02, 0.0, 0.1),
    (0.06, -0.605, 0.0, 0.023, 0.046, 0.02, 0.0, 0.1),
)


def _world(radius: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(centre, inverse transform to the unit sphere, density) of each ellipsoid, in world mm."""
    out = []
    for x0, y0, z0, a, b, c, phi, rho in SHEPP_LOGAN:
        centre = np.array([x0, z0, y0]) * radius               # world (x, y, z)
        p = math.radians(phi)
        # Rotation about the phantom's axial axis = world y, acting in the world x-z plane.
        rot = np.array([[math.cos(p), 0.0, -math.sin(p)],
                        [0.0, 1.0, 0.0],
                        [math.sin(p), 0.0, math.cos(p)]])
        axes = np.array([a, c, b]) * radius                    # semi-axes along world x, y, z
        inverse = np.diag(1.0 / axes) @ rot.T
        out.append((centre, inverse, rho))
    return out


def project(g: Geometry, radius: float) -> np.ndarray:
    """Exact line integrals through the phantom for every detector pixel centre of the scan,
    float32 (n, nv, nu): chord length of the ray in each ellipsoid times its density."""
    u, v = g.detector_u(), g.detector_v()
    uu, vv = np.meshgrid(u, v)                                  # (nv, nu)
    out = np.zeros((g.n_projections, len(v), len(u)), dtype=np.float64)
    ellipsoids = _world(radius)
    for i, beta in enumerate(g.angles):
        sb, cb = math.sin(beta), math.cos(beta)
        source = g.sid * np.array([sb, 0.0, cb])
        centre = -(g.sdd - g.sid) * np.array([sb, 0.0, cb])
        pix = (centre[None, None, :] + uu[..., None] * np.array([cb, 0.0, -sb])
               + vv[..., None] * np.array([0.0, 1.0, 0.0]))
        d = pix - source
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        for c, inv, rho in ellipsoids:
            p = (source - c) @ inv.T                            # (3,)
            q = d @ inv.T                                       # (nv, nu, 3)
            qq = np.einsum("...k,...k", q, q)
            pq = q @ p
            disc = pq ** 2 - qq * (p @ p - 1.0)
            chord = np.where(disc > 0, 2.0 * np.sqrt(np.maximum(disc, 0.0)) / qq, 0.0)
            out[i] += rho * chord
    return out.astype(np.float32)


def voxelize(g: Geometry, radius: float) -> np.ndarray:
    """The phantom's density at each voxel centre, float32 [z, y, x]."""
    z, y, x = np.meshgrid(g.axis(2), g.axis(1), g.axis(0), indexing="ij")
    pts = np.stack([x, y, z], axis=-1)
    vol = np.zeros(x.shape, dtype=np.float64)
    for c, inv, rho in _world(radius):
        r = (pts - c) @ inv.T
        vol += rho * (np.einsum("...k,...k", r, r) <= 1.0)
    return vol.astype(np.float32)
