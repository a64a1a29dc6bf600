"""dgf: a federated PACS file-system layer.

The public entry point is :class:`dgf.client.Client`; the CLI (:mod:`dgf.cli`) and the FUSE layer
are thin shells over it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
