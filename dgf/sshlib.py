"""paramiko, imported without invoke and without importlib.metadata.

paramiko 5 imports invoke (with asyncio and unittest.mock: 40 ms, a sixth of a CLI command's
fixed cost) only to run ``Match exec`` lines of an OpenSSH client config.  dgf reads no OpenSSH
config, so the first import of paramiko here skips it; ``import invoke`` works as usual after.

It also asks ``importlib.metadata`` for its own version (for its SSH banner): 15 ms of imports
(email, zipfile, ...) and a scan of every distribution on the path.  The first import here
answers from the name of paramiko's ``dist-info`` directory instead.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def _version_of_paramiko() -> types.ModuleType:
    """A stand-in for ``importlib.metadata`` that knows paramiko's version, and only that."""
    stub = types.ModuleType("importlib.metadata")
    spec = importlib.util.find_spec("paramiko")
    found = sorted(Path(spec.origin).parent.parent.glob("paramiko-*.dist-info")) \
        if spec is not None and spec.origin else []
    version = found[-1].name[len("paramiko-"):-len(".dist-info")] if found else "unknown"

    def of(name: str) -> str:
        if name != "paramiko":
            raise LookupError(name)
        return version

    stub.version = of  # type: ignore[attr-defined]
    return stub


if "paramiko" not in sys.modules and "invoke" not in sys.modules:
    sys.modules["invoke"] = None  # type: ignore[assignment]   # ImportError for paramiko.config
    stand_in = "importlib.metadata" not in sys.modules
    if stand_in:
        sys.modules["importlib.metadata"] = _version_of_paramiko()
    try:
        import paramiko
    finally:
        del sys.modules["invoke"]
        if stand_in:
            del sys.modules["importlib.metadata"]

import paramiko  # noqa: E402  (the module imported above, or as it was)

__all__ = ["paramiko"]
