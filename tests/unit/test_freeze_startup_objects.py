"""`freeze_startup_objects`: the collector's permanent generation gets what lives at ready."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
import trio.testing

from fabricai_trio.server import freeze_startup_objects


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the suite collects as usual


async def test_objects_alive_at_ready_are_frozen(unfrozen: None) -> None:
    app = cast(Any, SimpleNamespace(ready=trio.Event()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(freeze_startup_objects, app)
        await trio.testing.wait_all_tasks_blocked()
        assert gc.get_freeze_count() == 0  # not before the models are ready
        app.ready.set()
    assert gc.get_freeze_count() > 1000


async def test_cancelled_before_ready_it_freezes_nothing(unfrozen: None) -> None:
    app = cast(Any, SimpleNamespace(ready=trio.Event()))
    with trio.move_on_after(0.01):
        await freeze_startup_objects(app)
    assert gc.get_freeze_count() == 0
