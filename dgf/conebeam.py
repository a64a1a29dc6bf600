"""Circular cone-beam geometry: a frozen record, validated on creation.

Conventions (the same as RTK's ``ThreeDCircularProjectionGeometry`` without tilts, so projections
and volumes can be exchanged with RTK as they are):

- World coordinates in mm, right-handed; the isocenter is the origin; the **rotation axis is y**.
- At gantry angle ``theta`` the source sits at ``S = SID * (sin theta, 0, cos theta)``; angles grow
  counter-clockwise seen from +y (from +z towards +x).
- The flat detector is perpendicular to the central ray, ``SDD`` from the source (so
  ``SDD - SID`` beyond the isocenter).  Its axes are ``u = (cos theta, 0, -sin theta)`` and
  ``v = (0, 1, 0)``.  Detector pixel ``(i, j)`` (column ``i`` along u, row ``j`` along v) has its
  centre at ``u = (i - (nu - 1) / 2) * du + offset_u`` and likewise for v.  Projection arrays are
  indexed ``[projection, row j, column i]``.
- A world point ``P`` projects to ``u = SDD * (P . u_hat) / (SID - P . s_hat)`` and
  ``v = SDD * P_y / (SID - P . s_hat)`` with ``s_hat = (sin theta, 0, cos theta)``.
- Volumes are indexed ``[z, y, x]`` (numpy and ITK order); voxel ``(k, j, i)`` has its centre at
  ``origin + (i * dx, j * dy, k * dz)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dgf import errors


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise errors.UsageError(f"geometry field {name!r} must be a positive number, got {value!r}.")


@dataclass(frozen=True)
class Geometry:
    """Circular cone-beam scan and reconstruction grid (see the module docstring for axes)."""

    sid: float  # source to isocenter, mm
    sdd: float  # source to detector, mm
    detector_shape: tuple[int, int]  # (nu columns, nv rows)
    pixel_size: tuple[float, float]  # (du, dv) mm
    angles: tuple[float, ...]  # gantry angles, radians
    volume_shape: tuple[int, int, int]  # (nx, ny, nz)
    voxel_size: tuple[float, float, float]  # (dx, dy, dz) mm
    volume_origin: tuple[float, float, float] | None = None  # centre of voxel (0,0,0); None: centred
    detector_offset: tuple[float, float] = (0.0, 0.0)  # (offset_u, offset_v) mm

    def __post_init__(self) -> None:
        _positive("sid", self.sid)
        _positive("sdd", self.sdd)
        if self.sdd <= self.sid:
            raise errors.UsageError(f"geometry field 'sdd' ({self.sdd}) must exceed 'sid' ({self.sid}).")
        for name, seq, n in (("detector_shape", self.detector_shape, 2), ("volume_shape", self.volume_shape, 3)):
            if len(seq) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in seq):
                raise errors.UsageError(f"geometry field {name!r} must be {n} positive integers, got {seq!r}.")
        for name, sizes, n in (("pixel_size", self.pixel_size, 2), ("voxel_size", self.voxel_size, 3)):
            if len(sizes) != n:
                raise errors.UsageError(f"geometry field {name!r} must have {n} values, got {sizes!r}.")
            for v in sizes:
                _positive(name, v)
        if len(self.angles) < 1:
            raise errors.UsageError("geometry field 'angles' needs at least 1 projection angle.")
        if not all(math.isfinite(a) for a in self.angles):
            raise errors.UsageError("geometry field 'angles' contains a value that is not finite.")
        if self.volume_origin is not None and (len(self.volume_origin) != 3 or
                                               not all(math.isfinite(v) for v in self.volume_origin)):
            raise errors.UsageError(f"geometry field 'volume_origin' must be 3 finite numbers, got {self.volume_origin!r}.")
        if len(self.detector_offset) != 2 or not all(math.isfinite(v) for v in self.detector_offset):
            raise errors.UsageError("geometry field 'detector_offset' must be 2 finite numbers.")
        half = max(abs(c) for c in self.volume_corners().ravel())
        if half >= self.sid:
            raise errors.UsageError(f"geometry field 'volume_shape' puts voxels {half:.1f} mm from the "
                                    f"isocenter, beyond the source at 'sid' {self.sid} mm.")

    # -- derived values ---------------------------------------------------------------------

    @property
    def origin(self) -> tuple[float, float, float]:
        if self.volume_origin is not None:
            return self.volume_origin
        return tuple(-(n - 1) * d / 2 for n, d in zip(self.volume_shape, self.voxel_size))  # type: ignore[return-value]

    @property
    def n_projections(self) -> int:
        return len(self.angles)

    def axis(self, which: int) -> np.ndarray:
        """Voxel centre coordinates along x (0), y (1) or z (2), float64."""
        n, d, o = self.volume_shape[which], self.voxel_size[which], self.origin[which]
        return o + d * np.arange(n, dtype=np.float64)

    def detector_u(self) -> np.ndarray:
        nu, du = self.detector_shape[0], self.pixel_size[0]
        return (np.arange(nu) - (nu - 1) / 2) * du + self.detector_offset[0]

    def detector_v(self) -> np.ndarray:
        nv, dv = self.detector_shape[1], self.pixel_size[1]
        return (np.arange(nv) - (nv - 1) / 2) * dv + self.detector_offset[1]

    def volume_corners(self) -> np.ndarray:
        lo = np.array(self.origin, dtype=np.float64)
        hi = lo + (np.array(self.volume_shape) - 1) * np.array(self.voxel_size)
        return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])

    def is_short_scan(self) -> bool:
        """True when the angles leave a gap wider than 20 degrees: less than a full turn, so
        Parker weighting is needed.  (Irregular spacing with smaller gaps is still a full scan.)"""
        a = np.sort(np.mod(np.asarray(self.angles), 2 * np.pi))
        gaps = np.diff(np.concatenate([a, a[:1] + 2 * np.pi]))
        return bool(gaps.max() > np.radians(20.0))

    def subset(self, indices: list[int]) -> Geometry:
        """The same scan restricted to some projections (one site's share)."""
        return Geometry(self.sid, self.sdd, self.detector_shape, self.pixel_size,
                        tuple(self.angles[i] for i in indices), self.volume_shape, self.voxel_size,
                        self.volume_origin, self.detector_offset)

    # -- (de)serialisation ------------------------------------------------------------------

    def to_json(self) -> str:
        d = asdict(self)
        d["angles_deg"] = [math.degrees(a) for a in d.pop("angles")]
        return json.dumps(d, indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        d = dict(d)
        if "angles_deg" in d:
            d["angles"] = [math.radians(a) for a in d.pop("angles_deg")]
        try:
            return cls(
                sid=float(d["sid"]), sdd=float(d["sdd"]),
                detector_shape=tuple(int(v) for v in d["detector_shape"]),  # type: ignore[arg-type]
                pixel_size=tuple(float(v) for v in d["pixel_size"]),  # type: ignore[arg-type]
                angles=tuple(float(a) for a in d["angles"]),
                volume_shape=tuple(int(v) for v in d["volume_shape"]),  # type: ignore[arg-type]
                voxel_size=tuple(float(v) for v in d["voxel_size"]),  # type: ignore[arg-type]
                volume_origin=tuple(float(v) for v in d["volume_origin"]) if d.get("volume_origin") else None,  # type: ignore[arg-type]
                detector_offset=tuple(float(v) for v in d.get("detector_offset", (0.0, 0.0))),  # type: ignore[arg-type]
            )
        except KeyError as exc:
            raise errors.UsageError(f"geometry field {exc.args[0]!r} is missing.") from exc
        except (TypeError, ValueError) as exc:
            raise errors.UsageError(f"the geometry has a malformed field ({exc}).") from exc

    @classmethod
    def from_json(cls, text: str) -> Geometry:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise errors.UsageError(f"the geometry is not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
        if not isinstance(d, dict):
            raise errors.UsageError("the geometry JSON must be an object.")
        return cls.from_dict(d)


def circular(n_projections: int, sid: float, sdd: float, detector_shape: tuple[int, int],
             pixel_size: tuple[float, float], volume_shape: tuple[int, int, int],
             voxel_size: tuple[float, float, float], arc_deg: float = 360.0, first_deg: float = 0.0,
             **kw: Any) -> Geometry:
    """Equally spaced angles over ``arc_deg`` (a full scan excludes the end point)."""
    if arc_deg >= 360.0:
        angles = np.radians(first_deg + np.arange(n_projections) * 360.0 / n_projections)
    else:
        angles = np.radians(first_deg + np.linspace(0.0, arc_deg, n_projections))
    return Geometry(sid, sdd, detector_shape, pixel_size, tuple(float(a) for a in angles), volume_shape,
                    voxel_size, **kw)
