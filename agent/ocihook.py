"""``vetd-oci-hook prestart|createRuntime|poststop``: an OCI runtime hook that asks the agent.

The runtime (runc, crun, podman, CRI-O, enroot-style wrappers) runs it with the
container's state JSON on stdin (``id``, ``pid``, ``bundle``, ``annotations``).

- ``prestart`` / ``createRuntime``: asks the agent over its control socket
  whether the container may start. The agent refuses it when the node is unfit
  or a requirement the container's annotations switch on does not hold; the
  hook then exits 1 with one line on stderr that says why and what to do, and
  the runtime does not start the container.
- ``poststop``: tells the agent the container ended; always exits 0.

vetd's own failure never stops a container: no agent, no socket, no answer
within ``[hooks] deadline`` (default 5 s, the hook's start-up included), a
garbled state: the hook exits 0 and logs why to syslog (the journal) and stderr.

Standard library only, and only what this path needs: the runtime waits for
the hook before every container start.
"""

from __future__ import annotations

import json
import os
import sys
import time

from vetd.agent.controlclient import ControlError, ask, local_settings, log_local

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs the hook 4 ms
if TYPE_CHECKING:
    from typing import Any

START_STAGES = ("prestart", "createRuntime")
STOP_STAGES = ("poststop",)
#: Kept for reading the answer and printing the refusal; the agent answers within the rest.
MARGIN_S = 0.2
#: Annotations longer than this are not sent (a runtime may carry large ones vetd never reads).
MAX_ANNOTATION_CHARS = 4096
MAX_ANNOTATIONS = 256


def _log(message: str) -> None:
    """To syslog (the journal) and stderr: what a runtime keeps of a hook that let a container start."""
    log_local("vetd-oci-hook", message)


def read_state(text: str) -> dict[str, Any]:
    """The OCI state; annotations from the bundle's config.json when the state lacks them (older runtimes)."""
    state = json.loads(text)
    if not isinstance(state, dict) or not isinstance(state.get("id"), str):
        raise ValueError("not an OCI state object (no id)")
    annotations = state.get("annotations")
    if not isinstance(annotations, dict) and isinstance(state.get("bundle"), str):
        try:
            with open(os.path.join(state["bundle"], "config.json"), encoding="utf-8") as file:  # noqa: PTH118,PTH123 - no pathlib import
                annotations = json.load(file).get("annotations")
        except (OSError, ValueError, AttributeError):
            annotations = None
    state["annotations"] = {
        str(key): value for key, value in (annotations if isinstance(annotations, dict) else {}).items()
        if isinstance(value, str) and len(key) <= 256 and len(value) <= MAX_ANNOTATION_CHARS
    }
    if len(state["annotations"]) > MAX_ANNOTATIONS:
        vetd_first = sorted(state["annotations"], key=lambda k: (not k.startswith("com.hooks."), k))
        state["annotations"] = {k: state["annotations"][k] for k in vetd_first[:MAX_ANNOTATIONS]}
    return state


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    started = time.monotonic() if started is None else started
    args = sys.argv[1:] if argv is None else argv
    stage = args[0] if args else ""
    if stage not in START_STAGES + STOP_STAGES:
        _log(f"unknown stage {stage!r} (expected prestart, createRuntime or poststop); "
             "letting the container go on")
        return 0
    settings = local_settings()
    if settings.problem:
        _log(settings.problem)
    try:
        state = read_state(sys.stdin.read(1024 * 1024))
    except ValueError as exc:
        _log(f"{stage}: cannot read the container state on stdin ({exc}); letting the container go on")
        return 0
    left = settings.deadline - (time.monotonic() - started) - MARGIN_S
    if stage in STOP_STAGES:
        request: dict[str, Any] = {"op": "container_end", "id": state["id"]}
    else:
        request = {"op": "container_start", "id": state["id"], "annotations": state["annotations"],
                   "pid": state.get("pid") if isinstance(state.get("pid"), int) else 0,
                   "bundle": str(state.get("bundle", ""))[:4096], "deadline": round(max(0.05, left), 3)}
    try:
        if left <= 0:
            raise ControlError(f"no time left within the {settings.deadline:g}s deadline")
        answer = ask(settings.socket_path, request, left)
    except ControlError as exc:
        _log(f"{stage} {state['id']}: cannot ask vetd ({exc}); letting the container go on")
        return 0
    if not answer.get("ok"):
        _log(f"{stage} {state['id']}: the agent could not answer ({answer.get('error', '?')}); "
             "letting the container go on")
        return 0
    if stage in START_STAGES and answer.get("allowed") is False:
        reason = " ".join(str(answer.get("reason") or "refused by vetd").split())
        print(f"vetd: container refused: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
