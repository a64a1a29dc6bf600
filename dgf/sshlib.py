"""paramiko, imported without invoke.

paramiko 5 imports invoke (with asyncio and unittest.mock: 40 ms, a sixth of a CLI command's
fixed cost) only to run ``Match exec`` lines of an OpenSSH client config.  dgf reads no OpenSSH
config, so the first import of paramiko here skips it; ``import invoke`` works as usual after.
"""

from __future__ import annotations

import sys

if "paramiko" not in sys.modules and "invoke" not in sys.modules:
    sys.modules["invoke"] = None  # type: ignore[assignment]   # ImportError for paramiko.config
    try:
        import paramiko
    finally:
        del sys.modules["invoke"]

import paramiko  # noqa: E402  (the module imported above, or as it was)

__all__ = ["paramiko"]
