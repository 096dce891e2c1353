"""The job events' contract: what an agent publishes when a job starts and ends on its node.

Both sides build and read these events through this module: the agent's
control socket (``job_start``/``job_end`` requests, which ``vetd slurm
prolog``/``epilog`` send) publishes them, the controller keeps its jobs from
them (:mod:`vetd.controller.jobs`), and ``vetd rules test`` makes the same
events from an events file's ``job`` lines.

``job_start``: ``data`` ``user`` and ``gpus`` (the node's GPUs as the scheduler
gave them: ``0,1`` or ``0-3``; either left out when not known).
``job_end``: ``data`` ``state`` (the scheduler's word: ``COMPLETED``,
``FAILED``, ``NODE_FAIL``…), also the event's one code, as agents before
``data`` sent it; metrics ``exit_code`` and ``runtime_s`` (the node's, when
its start was announced). Both carry the job id in ``job_id``. A controller
before ``data`` skips the field (decoders skip unknown fields); a controller
reading an agent before it finds the state in the codes and no user or GPUs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

JOB_START: Final = "job_start"
JOB_END: Final = "job_end"

#: What no code, label or state may hold (the wire's identifiers forbid control characters).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Longest state kept (Slurm's longest is ``OUT_OF_MEMORY``; ``CANCELLED by 1234`` as sacct prints it).
MAX_STATE = 64
#: Longest user or GPU list kept (what the control socket takes for them).
MAX_VALUE = 256


def one_line(text: str, limit: int = MAX_VALUE) -> str:
    """``text`` as a job event carries it: no control characters, one line, at most ``limit`` characters."""
    return " ".join(_CONTROL.sub(" ", text).split())[:limit]


def clean_state(state: str) -> str:
    """A job state as it travels (also the event's code: at most :data:`MAX_STATE` characters)."""
    return one_line(state, MAX_STATE)


def start_fields(job_id: str, user: str = "", gpus: str = "") -> dict[str, Any]:
    """The fields of a ``job_start`` event (besides the envelope and ``job_id``)."""
    user, gpus = one_line(user), one_line(gpus)  # one line each: they reach terminals and alerts
    return {
        "name": JOB_START,
        "message": f"job {job_id} started" + (f" for {user}" if user else "") + (f" on GPUs {gpus}" if gpus else ""),
        "data": {key: value for key, value in (("user", user), ("gpus", gpus)) if value},
    }


def end_fields(job_id: str, state: str = "", exit_code: int | None = None, runtime_s: float | None = None,
               *, announced: bool = True) -> dict[str, Any]:
    """The fields of a ``job_end`` event; ``announced``: whether the node had announced the job's start."""
    state = clean_state(state)
    metrics: dict[str, float] = {}
    if exit_code is not None:
        metrics["exit_code"] = float(exit_code)
    if runtime_s is not None:
        metrics["runtime_s"] = round(runtime_s, 3)
    return {
        "name": JOB_END,
        "codes": [state] if state else [],
        "metrics": metrics,
        "message": f"job {job_id} ended" + (f" ({state})" if state else "")
                   + ("" if announced else "; its start was not announced"),
        "data": {"state": state} if state else {},
    }


def reported_state(data: Mapping[str, str], codes: list[str]) -> str:
    """The state a ``job_end`` reports, upper case (``""``: none); from ``data``, else its code."""
    return clean_state(data.get("state") or (codes[0] if codes else "")).upper()


def reported_exit_code(metrics: Mapping[str, float]) -> int | None:
    """The exit code a ``job_end`` reports (None: none)."""
    value = metrics.get("exit_code")
    return None if value is None else int(value)
