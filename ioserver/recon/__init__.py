"""Cone-beam CT reconstruction (FDK) near the data: geometry, filters, weights, back-projection,
FDK composed of them, and an analytic Shepp-Logan phantom to prove it."""

from ioserver.recon.fdk import fdk, partial_fdk
from ioserver.recon.geometry import Geometry, circular

__all__ = ["Geometry", "circular", "fdk", "partial_fdk"]
