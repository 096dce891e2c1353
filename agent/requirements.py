"""What a container's annotations need from the node, checked before it starts.

A :class:`~vetd.agent.config.Requirement` is data (``[hooks.annotations."NAME"]``):
paths or globs that must exist, libraries that must load, programs that must
succeed, endpoints that must answer, ports that must be free, environment
variables. :func:`evaluate` checks the requirements a container's annotations
switch on, all at once, within a deadline; every item that does not hold is
one line in the answer. Nothing here blocks the event loop: globs run in a
thread, libraries are loaded by a child process (a library that crashes or
hangs on load takes the child down, never the agent), programs run under
:func:`vetd.core.proc.run`.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import os
import re
import socket
import sys
import time
from collections.abc import Mapping

from vetd.agent.checks import CheckTimeout, in_thread
from vetd.agent.config import PARAM_PATTERN, Requirement
from vetd.core import proc

TRUE_VALUES = frozenset({"true", "1", "yes", "on"})
_PARAM = re.compile(PARAM_PATTERN)
_PLACEHOLDER = re.compile(r"\{(\w+)\}")

#: The child that loads libraries: each argument in turn, the first failure on stderr.
_DLOPEN = ("import ctypes, sys\n"
           "for name in sys.argv[1:]:\n"
           "    try:\n"
           "        ctypes.CDLL(name)\n"
           "    except OSError as exc:\n"
           "        sys.stderr.write(str(exc).splitlines()[0] if str(exc) else name)\n"
           "        sys.exit(1)\n")


class Unfilled(ValueError):
    """A ``{param}`` with no value, or an annotation value that is not a plain word."""


def switched_on(requirements: Mapping[str, Requirement], annotations: Mapping[str, str]) -> list[str]:
    """The requirement names a container's annotations switch on, in the config's order."""
    return [name for name in requirements if annotations.get(name, "").strip().lower() in TRUE_VALUES]


def params_of(name: str, requirement: Requirement, annotations: Mapping[str, str]) -> dict[str, str]:
    """``params`` with the annotations beside ``name`` over them (``com.hooks.X.variant`` for ``com.hooks.X.enabled``)."""
    prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
    values = dict(requirement.params)
    for key in list(values):
        given = annotations.get(prefix + key)
        if given is not None:
            if not _PARAM.search(given):
                raise Unfilled(f"annotation {prefix + key}={given[:64]!r} is not a plain word "
                               "(letters, digits, '_.+-')")
            values[key] = given
    return values


def fill(template: str, params: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in params:
            raise Unfilled(f"{template!r} uses {{{key}}}, which neither params nor an annotation sets")
        return params[key]
    return _PLACEHOLDER.sub(one, template)


async def evaluate(requirements: Mapping[str, Requirement], annotations: Mapping[str, str],
                   deadline: float) -> tuple[list[str], list[str]]:
    """Check every requirement the annotations switch on; ``(names checked, problems)``.

    A problem is one short sentence per annotation: its name, what it is, and every
    item that does not hold. An annotation still unanswered at ``deadline`` seconds
    is a problem too ("did not answer").
    """
    names = switched_on(requirements, annotations)
    problems: list[str] = []
    tasks: dict[str, asyncio.Task[list[str]]] = {}
    for name in names:
        requirement = requirements[name]
        try:
            # each item stops itself a little before the whole (and says what it waited for)
            checks = _checks(requirement, params_of(name, requirement, annotations), deadline * 0.9)
        except Unfilled as exc:
            problems.append(f"{_label(name, requirement)}: {exc}")
            continue
        tasks[name] = asyncio.ensure_future(_gather(checks))
    if tasks:
        done, pending = await asyncio.wait(tasks.values(), timeout=deadline)
        for name, task in tasks.items():
            if task in done and task.result():
                problems.append(f"{_label(name, requirements[name])}: {', '.join(task.result())}")
            elif task in pending:
                task.cancel()
                problems.append(f"{_label(name, requirements[name])}: did not answer within {deadline:.1f}s")
    return names, problems


def _label(name: str, requirement: Requirement) -> str:
    return f"{name} ({requirement.description})" if requirement.description else name


async def _gather(checks: list[asyncio.Future[str | None]]) -> list[str]:
    return [problem for problem in await asyncio.gather(*checks) if problem]


def _checks(requirement: Requirement, params: Mapping[str, str], deadline: float) -> list[asyncio.Future[str | None]]:
    """One awaitable per item of ``requirement``; each answers None (holds) or what is wrong."""
    checks: list[asyncio.Future[str | None]] = []
    paths = [fill(p, params) for p in requirement.paths]
    if paths:
        checks.append(asyncio.ensure_future(_paths(paths, deadline)))
    libraries = [fill(p, params) for p in requirement.libraries]
    if libraries:
        checks.append(asyncio.ensure_future(_libraries(libraries, deadline)))
    for argv in requirement.commands:
        checks.append(asyncio.ensure_future(_command([fill(a, params) for a in argv], deadline)))
    for endpoint in requirement.tcp:
        checks.append(asyncio.ensure_future(_tcp(fill(endpoint, params), deadline)))
    for port in requirement.ports_free:
        checks.append(asyncio.ensure_future(_port_free(fill(port, params))))
    for key, value in requirement.env.items():
        checks.append(asyncio.ensure_future(_env(key, value)))
    return checks


async def _paths(patterns: list[str], deadline: float) -> str | None:
    def missing() -> list[str]:
        return [p for p in patterns if not glob.glob(p)]  # noqa: PTH207 - absolute patterns, /dev/cxi*
    try:
        absent = await in_thread(missing, deadline, name="vetd.hooks.paths")
    except CheckTimeout:
        return f"looking for {', '.join(patterns)} did not finish within {deadline:.1f}s"
    return f"missing {', '.join(absent)}" if absent else None


#: Libraries that loaded, by (name, file identity) → when: a child process costs tens of milliseconds
#: on every container start, so a success is trusted for LOADED_TTL_S while the file is unchanged.
_loaded: dict[tuple[str, tuple[int, int, int, int]], float] = {}
LOADED_TTL_S = 300.0


def _identity(name: str) -> tuple[int, int, int, int]:
    try:
        info = os.stat(name)  # noqa: PTH116 - a name or a path, as the loader takes it
    except OSError:
        return (0, 0, 0, 0)  # a name the loader searches for: cached by name
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


async def _libraries(names: list[str], deadline: float) -> str | None:
    now = time.monotonic()
    keys = [(name, _identity(name)) for name in names]
    if all(now - _loaded.get(key, -LOADED_TTL_S) < LOADED_TTL_S for key in keys):
        return None
    try:
        done = await proc.run([sys.executable, "-I", "-S", "-c", _DLOPEN, *names], deadline)
    except proc.ProcError as exc:
        return f"loading {', '.join(names)}: {exc}"
    if done.returncode != 0:
        return f"cannot load library: {done.stderr.strip()[:300] or f'exit {done.returncode}'}"
    if len(_loaded) > 1024:
        _loaded.clear()
    _loaded.update(dict.fromkeys(keys, now))
    return None


async def _command(argv: list[str], deadline: float) -> str | None:
    try:
        done = await proc.run(argv, deadline, merge_stderr=True)
    except proc.ProcError as exc:
        return str(exc)
    if done.returncode != 0:
        output = " ".join(done.stdout.split())[:200]
        return f"`{' '.join(argv)}` exited {done.returncode}" + (f": {output}" if output else "")
    return None


async def _tcp(endpoint: str, deadline: float) -> str | None:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        return f"{endpoint!r} is not host:port"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), deadline)
    except TimeoutError:
        return f"nothing answers on {endpoint} within {deadline:.1f}s"
    except OSError as exc:
        return f"nothing answers on {endpoint} ({exc.strerror or exc})"
    writer.close()
    return None


async def _port_free(port: str) -> str | None:
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"{port!r} is not a port"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is free
        try:
            sock.bind(("", int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is in use"
            return f"cannot check port {port}: {exc.strerror or exc}"
    return None


async def _env(key: str, value: str) -> str | None:
    if key not in os.environ:
        return f"{key} is not set"
    if value and os.environ[key] != value:
        return f"{key}={os.environ[key]!r}, expected {value!r}"
    return None
