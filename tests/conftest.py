"""Suite-wide guards: warnings are errors (pyproject) and no test may leave a task behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest


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
