"""Suite-wide guards: warnings are errors (pyproject) and no test may leave a task behind."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from simulator.controlplane.cluster import KubeTestCluster


@pytest.fixture(autouse=True)
async def _no_asyncio_pending_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running: they would leak into the next test."""
    before = asyncio.all_tasks()
    yield
    # Give callbacks scheduled by the test's last await one turn to settle.
    await asyncio.sleep(0)
    remains = {t for t in asyncio.all_tasks() - before if not t.done()}
    remains.discard(asyncio.current_task())  # type: ignore[arg-type]
    if remains:
        for task in remains:
            task.cancel()
        pytest.fail(f"Unattended asyncio tasks detected: {remains!r}")


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeTestCluster]:
    """A real etcd + kube-apiserver on loopback for the whole session (built once, cached).

    ``scripts/test.sh`` prebuilds the binary and exports KUBE_TESTENV_BINARY; without it
    the fixture builds on first use.
    """
    binary = os.environ.get("KUBE_TESTENV_BINARY")
    cluster = KubeTestCluster.start(tmp_path_factory.mktemp("kube"),
                                    Path(binary) if binary else None)
    try:
        asyncio.run(cluster.install_crds())
        yield cluster
    finally:
        cluster.stop()
