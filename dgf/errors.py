"""One exception tree for dgf, rooted at :class:`DgfError`.

Each class carries the errno a FUSE adapter returns and the exit status the CLI uses, so errors are
translated exactly once at each boundary (FUSE, SSH wire, server reply, CLI).  Messages are one
sentence a person can act on, and never contain a patient-identifying value.
"""

from __future__ import annotations

import errno as _errno


class DgfError(Exception):
    """Base of every error dgf raises on purpose."""

    errno: int = _errno.EIO
    exit_code: int = 1

    def __init__(self, message: str, group: str = "", detail: str = "", hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        #: For summaries of many files: what kind of failure (``group``), what varies between
        #: files (``detail``, e.g. a modality) and what to do about it (``hint``).
        self.group = group
        self.detail = detail
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(DgfError):
    """The caller asked for something malformed (bad argument, bad XPath, bad option)."""

    errno = _errno.EINVAL
    exit_code = 2


class ConfigError(DgfError):
    """A configuration file or key is missing or malformed."""

    errno = _errno.EINVAL
    exit_code = 2


class NotFound(DgfError):
    errno = _errno.ENOENT
    exit_code = 3


class AlreadyExists(DgfError):
    errno = _errno.EEXIST
    exit_code = 3


class NotADirectory(DgfError):
    errno = _errno.ENOTDIR
    exit_code = 3


class IsADirectory(DgfError):
    errno = _errno.EISDIR
    exit_code = 3


class DirectoryNotEmpty(DgfError):
    errno = _errno.ENOTEMPTY
    exit_code = 3


class NoAttribute(DgfError):
    """An extended attribute that is not set."""

    errno = _errno.ENODATA
    exit_code = 3


class PermissionDenied(DgfError):
    """The principal lacks the authority for this operation (always audited where it matters)."""

    errno = _errno.EACCES
    exit_code = 4


class PolicyRefused(PermissionDenied):
    """The archive's de-identification policy refuses this file (e.g. burned-in annotation);
    an option the policy names can admit it."""

    errno = _errno.EPERM
    exit_code = 4


class AuthenticationFailed(DgfError):
    """The server refused our key, or the server's host key did not match the pinned one."""

    errno = _errno.EACCES
    exit_code = 4


class InvalidDicom(DgfError):
    """A file that is not DICOM, is truncated, or cannot be de-identified safely."""

    errno = _errno.EINVAL
    exit_code = 5


class IntegrityError(DgfError):
    """Bytes whose checksum does not match their key or recorded checksum."""

    errno = _errno.EIO
    exit_code = 6


class TransportError(DgfError):
    """A server could not be reached, or the connection broke mid-operation."""

    errno = _errno.EIO
    exit_code = 7


class ServerError(DgfError):
    """A server failed on a request it should have handled; the message says what failed."""

    errno = _errno.EIO
    exit_code = 8


class QueryTimeout(DgfError):
    errno = _errno.ETIMEDOUT
    exit_code = 9


class LimitExceeded(UsageError):
    """A request went past one of a server's limits (size, count, fan-out, quota); the message
    names the limit and its value, so the caller can split the request or ask an admin."""

    errno = _errno.E2BIG
    exit_code = 2


class StorageFull(ServerError):
    """A site has no room left for an object, or the metaserver's database for a write (ENOSPC,
    a quota): nothing of the request is kept."""

    errno = _errno.ENOSPC


class Busy(ServerError):
    """The server is at capacity (database connections, channels); retrying shortly succeeds."""

    errno = _errno.EAGAIN
    exit_code = 8


#: Wire name -> class, so a server reply turns back into the same exception on the client.
BY_NAME: dict[str, type[DgfError]] = {
    cls.__name__: cls
    for cls in (
        DgfError, UsageError, ConfigError, NotFound, AlreadyExists, NotADirectory, IsADirectory,
        DirectoryNotEmpty, NoAttribute, PermissionDenied, PolicyRefused, AuthenticationFailed, InvalidDicom,
        IntegrityError, TransportError, ServerError, QueryTimeout, LimitExceeded, Busy, StorageFull,
    )
}


def from_wire(name: str, message: str) -> DgfError:
    """Rebuild an error a server sent; unknown names become :class:`ServerError`."""
    return BY_NAME.get(name, ServerError)(message)
