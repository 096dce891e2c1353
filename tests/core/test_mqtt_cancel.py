"""A cancellation that ``asyncio.wait_for`` loses (Python 3.11) is raised again (core.mqtt)."""

from __future__ import annotations

import asyncio

import pytest

from vetd.core.mqtt import raise_swallowed_cancel


def test_a_cancel_arriving_as_the_awaited_result_does_still_stops_the_loop() -> None:
    """What aiomqtt's publish does: wait_for on the PUBACK. The PUBACK and the cancel land in the same
    turn of the loop; on 3.11 wait_for returns the PUBACK and drops the cancel, and a publish loop went
    on to wait for its next message for ever."""
    published = []

    async def publish_loop(puback: asyncio.Future[None]) -> None:
        while True:
            await asyncio.wait_for(puback, timeout=10)
            published.append("sent")
            raise_swallowed_cancel()
            await asyncio.Event().wait()  # the next message, which never comes

    async def main() -> None:
        loop = asyncio.get_running_loop()
        puback: asyncio.Future[None] = loop.create_future()
        task = asyncio.create_task(publish_loop(puback))
        await asyncio.sleep(0)  # the loop is in wait_for
        puback.set_result(None)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)  # without the check: TimeoutError, the task still waiting
        assert task.cancelled()

    asyncio.run(main())
    assert published in ([], ["sent"])  # 3.12 raises in wait_for itself; 3.11 gets here and raises after


def test_a_task_not_cancelled_goes_on() -> None:
    async def main() -> str:
        raise_swallowed_cancel()
        return "went on"

    assert asyncio.run(main()) == "went on"
