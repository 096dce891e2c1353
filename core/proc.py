"""A subprocess with a deadline, for both sides (agent commands, the controller's scontrol)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import msgspec


class ProcError(Exception):
    """The program could not be started, or did not finish within its deadline."""


class ProcTimeout(ProcError):
    """The program overran its deadline and was killed."""


class Finished(msgspec.Struct, frozen=True):
    returncode: int
    stdout: str
    stderr: str
    seconds: float


async def run(argv: Sequence[str], timeout: float, *, env: Mapping[str, str] | None = None,
              merge_stderr: bool = False) -> Finished:
    """Run ``argv`` (no shell) and wait at most ``timeout`` seconds; a program still running then is killed.

    Raises :class:`ProcError` when it cannot start or overruns; a non-zero exit is
    a :class:`Finished` like any other, for the caller to judge.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
            env=None if env is None else dict(env))
    except OSError as exc:
        raise ProcError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ProcTimeout(f"{argv[0]} did not finish within {timeout:g}s") from None
    return Finished(returncode=process.returncode if process.returncode is not None else -1,
                    stdout=out.decode(errors="replace"), stderr=(err or b"").decode(errors="replace"),
                    seconds=loop.time() - started)
