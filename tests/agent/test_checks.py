from __future__ import annotations

import asyncio
import threading
import time

from vetd.agent.checks import Check, CheckRunner, Outcome


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_an_exception_becomes_an_error_result() -> None:
    def boom() -> Outcome:
        raise OSError("NVML_ERROR_UNKNOWN")

    result = run(CheckRunner().run(Check("boom", boom, plugin="t")))
    assert [(o.status, o.codes) for o in result.outcomes] == [("error", ["exception"])]
    assert "OSError: NVML_ERROR_UNKNOWN" in result.outcomes[0].message


def test_a_malformed_return_becomes_an_error_result() -> None:
    result = run(CheckRunner().run(Check("odd", lambda: {"status": "pass"})))  # type: ignore[arg-type,return-value]
    assert result.outcomes[0].status == "error"
    assert "not Outcome" in result.outcomes[0].message


def test_a_hung_check_times_out_once_then_reports_still_running_without_new_threads() -> None:
    release = threading.Event()
    calls = []

    def hang() -> Outcome:
        calls.append(1)
        release.wait()
        return Outcome(status="pass")

    async def scenario() -> list[list[str]]:
        runner = CheckRunner()
        check = Check("hang", hang, timeout=0.1)
        started = time.monotonic()
        first = await runner.run(check)
        assert time.monotonic() - started < 2
        second = await runner.run(check)
        release.set()
        await asyncio.sleep(0.1)
        third = await runner.run(check)
        return [[o.status, *o.codes] for o in (*first.outcomes, *second.outcomes, *third.outcomes)]

    assert run(scenario()) == [["timeout", "timeout"], ["timeout", "still_running"], ["pass"]]
    assert len(calls) == 2


def test_outcomes_are_validated_and_metrics_made_float() -> None:
    result = run(CheckRunner().run(Check("m", lambda: [Outcome(status="warn", metrics={"n": 3}),
                                                        Outcome(status="pass", entity="gpu1")])))
    assert [(o.status, o.entity, o.metrics) for o in result.outcomes] == [
        ("warn", "node", {"n": 3.0}), ("pass", "gpu1", {})]
