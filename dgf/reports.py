"""What uploads and downloads report: per-file failures, totals, and progress in source bytes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dgf import errors

if TYPE_CHECKING:
    from dgf.dicom import pipeline

Progress = Callable[[int], None]


class Meter:
    """Progress in source bytes, safe from any thread: each file counts once in full, whether
    its bytes were sent in pieces, it was skipped, or it failed (so a bar never goes back or
    past its total)."""

    def __init__(self, progress: Progress | None, sizes: dict[str, int] | None = None) -> None:
        self._progress = progress
        self._sizes = sizes or {}
        self._done: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, source: str, n: int) -> None:
        if self._progress is None:
            return
        with self._lock:
            done = self._done.get(source, 0)
            n = min(n, self._sizes.get(source, 0) - done)
            if n <= 0:
                return
            self._done[source] = done + n
            self._progress(n)

    def finish(self, sources: Iterable[str]) -> None:
        for source in sources:
            self.add(source, self._sizes.get(source, 0))

    def metered(self, source: str, pieces: Callable[[int], Iterator[bytes | memoryview]]
                ) -> Callable[[int], Iterator[bytes | memoryview]]:
        def stream(chunk: int) -> Iterator[bytes | memoryview]:
            for piece in pieces(chunk):
                yield piece
                self.add(source, len(piece))
        return stream


@dataclass
class Failure:
    item: str
    reason: str
    #: The exit status this failure calls for (that of its error class), and its summary
    #: fields: the kind of failure, what varies between files, and what to do.
    code: int = errors.InvalidDicom.exit_code
    group: str = ""
    detail: str = ""
    hint: str = ""

    @classmethod
    def of(cls, item: str, problem: pipeline.Problem | errors.DgfError) -> Failure:
        if isinstance(problem, errors.DgfError):
            from dgf.dicom import pipeline

            problem = pipeline.Problem.of(problem)
        return cls(item, problem.message, problem.code, problem.group, problem.detail, problem.hint)


@dataclass
class UploadReport:
    uploaded: int = 0
    bytes: int = 0
    #: Files whose object the archive already held (verified replica), at their path or, for
    #: the same instance, at another path: nothing was sent for them.
    already: int = 0
    paths: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    warnings: list[Failure] = field(default_factory=list)
    #: Each source in the archive (sent now or held already): its path and its de-identified
    #: study, series and SOP instance UIDs.
    stored: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)


@dataclass
class DownloadReport:
    downloaded: int = 0
    bytes: int = 0
    files: list[Path] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

