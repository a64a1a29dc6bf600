"""Fixtures: real federations on loopback (metaserver + two I/O sites as processes, generated
keys, free ports), clients per principal, and real DICOM files."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from bench import synth
from dgf import local
from dgf.client import Client
from tests import corpus
from tests.pg import PostgresServer

# CI runs the property tests derandomized: the same examples every run, so a red build is
# reproducible and a green one is not luck (HYPOTHESIS_PROFILE=dev explores new examples).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a disk that really fills up (needs root, as CI has)."""
    where = tmp_path / "small-disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.Federation]:
    """One federation for the read-mostly tests of the session."""
    root = tmp_path_factory.mktemp("federation")
    fed = local.up(root)
    yield fed
    local.down(root)


@pytest.fixture()
def fresh_federation(tmp_path: Path) -> Iterator[local.Federation]:
    """A federation of its own, for tests that stop servers or need an empty namespace."""
    fed = local.up(tmp_path / "fed")
    yield fed
    local.down(fed.root, quiet=True)


def _client(fed: local.Federation, who: str) -> Iterator[Client]:
    client = Client(fed.config(who))
    yield client
    client.close()


@pytest.fixture(scope="session")
def clinician(federation: local.Federation) -> Iterator[Client]:
    yield from _client(federation, "clinician")


@pytest.fixture(scope="session")
def researcher(federation: local.Federation) -> Iterator[Client]:
    yield from _client(federation, "researcher")


@pytest.fixture(scope="session")
def admin(federation: local.Federation) -> Iterator[Client]:
    yield from _client(federation, "admin")


@pytest.fixture(scope="session")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return synth.small_corpus(tmp_path_factory.mktemp("small"), 40, patients=8)


@pytest.fixture()
def ct_small() -> Path:
    return corpus.file("CT_small.dcm")


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


def copy_to(src: Path, dst_dir: Path, name: str | None = None) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    target = dst_dir / (name or src.name)
    shutil.copyfile(src, target)
    return target


@contextlib.contextmanager
def metaserver_calls(client: Client) -> Iterator[list[str]]:
    """The verbs ``client`` sends its metaserver within the block, in order (a spy on the real
    link: every call still goes through)."""
    calls: list[str] = []
    original = client.meta.call

    def counted(verb: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(verb)
        return original(verb, *args, **kwargs)
    client.meta.call = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        client.meta.call = original  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session; tests create their own databases."""
    server = PostgresServer()
    yield server
    server.stop()
