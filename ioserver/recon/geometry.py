"""The cone-beam geometry used by the reconstruction.

The record itself lives in the shared core (:mod:`dgf.conebeam`) because it crosses layers: the
client validates it and coordinates jobs with it, the I/O servers reconstruct with it.
"""

from dgf.conebeam import Geometry, circular

__all__ = ["Geometry", "circular"]
