from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess, build_test_repository


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_repository(tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="session")
def server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server on the shared test repository for the whole session (no strict readiness:
    the repository deliberately holds broken models)."""
    log_path = tmp_path_factory.mktemp("logs") / "server.log"
    process = ServerProcess(model_repository, "--no-strict-readiness", log_path=log_path)
    yield process
    process.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """Start extra servers with custom flags; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def start(repository: Path, *args: str, wait_ready: bool = True) -> ServerProcess:
        process = ServerProcess(repository, *args, log_path=tmp_path / f"server{len(started)}.log",
                                wait_ready=wait_ready)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
