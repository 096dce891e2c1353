"""Talk to the agent's control socket: one newline-delimited JSON request, one response.

Standard library only (no msgspec, structlog or pluggy): ``vetd-oci-hook`` runs
before every container and must start in milliseconds. The agent validates every
request against the Structs in :mod:`vetd.agent.control`; this side only sends
dicts and reads the answer. The socket's protocol is described there.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import tomllib

from vetd.core.durations import parse_duration

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs the hook 4 ms
if TYPE_CHECKING:
    from typing import Any

DEFAULT_AGENT_CONFIG = "/etc/vetd/agent.toml"
DEFAULT_CONTROL_SOCKET = "/run/vetd/agent.sock"
DEFAULT_HOOK_DEADLINE_S = 5.0
#: Largest request or response line either side accepts (bytes, newline included).
MAX_LINE = 1024 * 1024


def log_local(tag: str, message: str, *, warning: bool = True) -> None:
    """One line to syslog (facility daemon: the journal, ``journalctl -t TAG``) and stderr, for the
    tools whose output nobody reads (an OCI runtime hook that succeeded, a Slurm prolog)."""
    try:
        import syslog

        syslog.openlog(tag, syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_WARNING if warning else syslog.LOG_INFO, message)
    except OSError:
        pass
    print(f"{tag}: {message}", file=sys.stderr)


class ControlError(Exception):
    """The agent could not be asked: no socket, no agent, a timeout, a garbled answer."""


class LocalSettings:
    """What a local tool needs from the agent config: the socket and the hook's deadline."""

    def __init__(self, socket_path: str = DEFAULT_CONTROL_SOCKET,
                 deadline: float = DEFAULT_HOOK_DEADLINE_S, problem: str = "") -> None:
        self.socket_path, self.deadline, self.problem = socket_path, deadline, problem


def local_settings(environ: dict[str, str] | None = None) -> LocalSettings:
    """Read ``[agent] control_socket`` and ``[hooks] deadline`` from ``$VETD_CONFIG`` or /etc/vetd/agent.toml
    (``$VETD_CONTROL_SOCKET`` overrides the socket, as it does for the agent).

    Never raises: a file that cannot be read keeps the defaults and says why in ``problem``
    (the agent validates the file fully; this reader must not stop a container).
    """
    env = os.environ if environ is None else environ
    path = env.get("VETD_CONFIG") or DEFAULT_AGENT_CONFIG
    settings = LocalSettings()
    try:
        with open(path, encoding="utf-8") as file:  # noqa: PTH123 - pathlib is not worth its import time here
            data = tomllib.loads(file.read())
    except FileNotFoundError:
        settings.socket_path = env.get("VETD_CONTROL_SOCKET") or settings.socket_path
        if env.get("VETD_CONFIG"):
            settings.problem = f"{path}: no such file (VETD_CONFIG); using {settings.socket_path}"
        return settings
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        settings.problem = f"{path}: cannot read: {exc}; using {settings.socket_path}"
        return settings
    agent, hooks = data.get("agent", {}), data.get("hooks", {})
    if isinstance(agent, dict) and isinstance(agent.get("control_socket"), str):
        settings.socket_path = agent["control_socket"]
    settings.socket_path = env.get("VETD_CONTROL_SOCKET") or settings.socket_path
    if isinstance(hooks, dict) and "deadline" in hooks:
        try:
            settings.deadline = min(60.0, max(0.1, float(parse_duration(hooks["deadline"]))))
        except ValueError as exc:
            settings.problem = f"{path}: hooks.deadline: {exc}"
    return settings


def ask(path: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send ``request`` to the socket at ``path`` and return the agent's answer, within ``timeout`` seconds.

    Raises :class:`ControlError` when there is no answer; an answer with ``ok`` false is
    returned as is, for the caller to judge.
    """
    if not path:
        raise ControlError("the control socket is switched off ([agent] control_socket is empty)")
    deadline = time.monotonic() + timeout
    line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ControlError(f"request of {len(line)} bytes exceeds {MAX_LINE}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(max(0.001, timeout))
            sock.connect(path)
            sock.sendall(line)
            chunks: list[bytes] = []
            size = 0
            while not chunks or not chunks[-1].endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_LINE:
                    raise ControlError(f"answer longer than {MAX_LINE} bytes")
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path} (is `vetd agent` running?)") from None
    except ConnectionRefusedError:
        raise ControlError(f"nothing listens on {path} (is `vetd agent` running?)") from None
    except PermissionError:
        raise ControlError(f"not allowed to use {path} (root only, or [agent] control_socket_group)") from None
    except TimeoutError:
        raise ControlError(f"no answer from the agent on {path} within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(f"cannot talk to the agent on {path}: {exc.strerror or exc}") from None
    data = b"".join(chunks)
    if not data.endswith(b"\n"):
        raise ControlError(f"the agent on {path} closed the connection without an answer")
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise ControlError(f"garbled answer from the agent on {path}: {exc}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"garbled answer from the agent on {path}: not an object")
    return answer
