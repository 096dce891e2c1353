"""``vetd slurm prolog`` / ``vetd slurm epilog``: Slurm's Prolog= and Epilog=, through the agent.

Both read the job from the environment slurmd gives them (``SLURM_JOB_ID``,
``SLURMD_NODENAME``, ``SLURM_JOB_USER``, the job's GPUs from ``SLURM_JOB_GPUS``
or ``CUDA_VISIBLE_DEVICES``) and ask the node's agent over its control socket,
so the checks run in the agent (warm NVML, its XID watch), their results reach
the controller like any others (it keeps the rules and the circuit breaker),
and results and events during the job carry its id.

- **prolog**: tells the agent the job started (``job_start``), runs the
  ``[slurm] prolog_profile`` under ``prolog_deadline`` and exits 1 on a node
  fault: a check that failed on the node or one of the job's GPUs, or the
  controller having taken the node out of service. It first sets the drain
  reason (``scontrol update … State=DRAIN Reason="vetd: prolog NODE: …"``);
  Slurm then drains the node and requeues the job (held, unless
  ``SchedulerParameters=nohold_on_prolog_fail``).
- **epilog**: runs the ``epilog_profile`` (stray processes, GPU memory not
  freed, a GPU that needs a reset), tells the agent the job ended with its exit
  state (``job_end``: exit code and signal from ``SLURM_JOB_EXIT_CODE2``, else
  ``SLURM_JOB_EXIT_CODE``; the steps' highest from ``SLURM_JOB_DERIVED_EC``) and
  exits 1 on a node fault: a failed check, or a critical event (an XID the
  catalog says needs a reset or reboot) on the node or the job's GPUs while it
  ran. Slurm drains the node.

vetd's own failure never drains: no agent, no socket, the deadline passed, a
check that errored or timed out, a bad config. The job runs (the node stays in
service) and why is logged to syslog (tag ``vetd-slurm``: ``journalctl -t
vetd-slurm``) and stderr (which slurmd discards). Neither drains while the
controller says the node's partition has its circuit breaker open.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vetd.agent.config import AgentConfig, load_agent_config
from vetd.agent.controlclient import ControlError, ask, log_local
from vetd.core.configfile import ConfigError
from vetd.core.slurm import REASON_PREFIX, clean_reason, find_program

TAG = "vetd-slurm"
STAGES = ("prolog", "epilog")
#: Longest wait for a job start or end (the agent answers those at once).
QUICK_S = 2.0
#: Of the time left, the share the checks get; the rest is for scontrol and the job's end.
RUN_SHARE = 0.8
#: Least time scontrol gets to set the drain reason, even past the deadline (Slurm's own timeout is longer).
SCONTROL_MIN_S = 2.0
#: Bad verdicts named in a reason or a log line.
NAMED = 3


class JobError(ValueError):
    """The environment is not a Slurm job's (run by hand?)."""


@dataclass(frozen=True)
class Job:
    """What slurmd tells a prolog or epilog about the job, in its environment."""

    id: str
    node: str
    user: str = ""
    gpus: str = ""
    exit_code: int | None = None
    signal: int | None = None
    derived_exit_code: int | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Job:
        job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or ""
        if not job_id:
            raise JobError("SLURM_JOB_ID is not set: this runs as slurm.conf's Prolog= or Epilog=, not by hand")
        gpus = environ.get("SLURM_JOB_GPUS")
        exit_code, signal = _exit_status(environ)
        derived = _int(environ.get("SLURM_JOB_DERIVED_EC"))
        return cls(id=job_id, node=environ.get("SLURMD_NODENAME", ""), user=environ.get("SLURM_JOB_USER", ""),
                   gpus=gpus if gpus is not None else environ.get("CUDA_VISIBLE_DEVICES", ""),
                   exit_code=exit_code, signal=signal,
                   derived_exit_code=None if derived is None else _wait_status(derived)[0])

    @property
    def state(self) -> str:
        """``completed``, ``failed`` (non-zero exit), ``signaled``, or ``""`` when Slurm did not say."""
        if self.signal:
            return "signaled"
        if self.exit_code is None:
            return ""
        return "completed" if self.exit_code == 0 else "failed"


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


def _wait_status(status: int) -> tuple[int, int]:
    """A ``wait(2)`` status as (exit code, signal), as Slurm shows it (``ExitCode=0:15``: killed by SIGTERM)."""
    if os.WIFSIGNALED(status):
        return 0, os.WTERMSIG(status)
    return (os.WEXITSTATUS(status) if os.WIFEXITED(status) else status), 0


def _exit_status(environ: Mapping[str, str]) -> tuple[int | None, int | None]:
    """The job script's exit code and signal: ``SLURM_JOB_EXIT_CODE2`` (``exit:signal``), else
    ``SLURM_JOB_EXIT_CODE`` (a wait status); both only in an epilog."""
    pair = environ.get("SLURM_JOB_EXIT_CODE2", "")
    if ":" in pair:
        code, signal = (_int(part) for part in pair.split(":", 1))
        if code is not None:
            return code, signal or 0
    status = _int(environ.get("SLURM_JOB_EXIT_CODE"))
    if status is None:
        return None, None
    return _wait_status(status)


def process_started() -> float:
    """``time.monotonic()`` when this process started (its interpreter start-up counts against the deadline).

    Its age is read from ``/proc``: its start in clock ticks since boot (``/proc/self/stat``'s 22nd field)
    against the time since boot (``/proc/uptime``), as psutil computes a start time, without psutil's
    import (tens of milliseconds of a prolog that runs before every job)."""
    try:
        fields = Path("/proc/self/stat").read_text(encoding="ascii").rpartition(")")[2].split()
        uptime = float(Path("/proc/uptime").read_text(encoding="ascii").split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):  # no /proc: count from now
        return time.monotonic()
    return time.monotonic() - max(0.0, age)


def main(stage: str, config_path: Path | None, environ: Mapping[str, str] | None = None,
         started: float | None = None) -> int:
    """Run the prolog or the epilog; 0 the job may run (vetd's own failure included), 1 a node fault."""
    started = process_started() if started is None else started
    env = os.environ if environ is None else environ
    try:
        job = Job.from_environ(env)
    except JobError as exc:
        print(f"vetd slurm {stage}: {exc}", file=sys.stderr)
        return 2
    try:
        config = load_agent_config(config_path)
    except ConfigError as exc:
        _note(stage, job, f"config error: {exc}; {_goes_on(stage)}")
        return 0
    deadline = started + float(config.slurm.prolog_deadline if stage == "prolog" else config.slurm.epilog_deadline)
    try:
        return (prolog if stage == "prolog" else epilog)(config, job, deadline)
    except Exception as exc:  # noqa: BLE001 - vetd's own failure never drains a node
        _note(stage, job, f"internal error: {type(exc).__name__}: {exc}; {_goes_on(stage)}")
        return 0


def prolog(config: AgentConfig, job: Job, deadline: float) -> int:
    sock, node = config.agent.control_socket, job.node or config.agent.node
    try:
        started = ask(sock, {"op": "job_start", "job_id": job.id, "user": job.user, "gpus": job.gpus},
                      _left(deadline, QUICK_S))
        if not started.get("ok"):
            _note("prolog", job, f"the agent did not take the job's start: {started.get('error')}")
        budget = max(0.05, _left(deadline) * RUN_SHARE)
        answer = ask(sock, {"op": "run", "profile": config.slurm.prolog_profile, "deadline": round(budget, 3),
                            "gpus": job.gpus}, budget + 0.2)
    except ControlError as exc:
        _note("prolog", job, f"cannot ask vetd ({exc}); {_goes_on('prolog')}")
        return 0
    if not answer.get("ok"):
        _note("prolog", job, f"the agent could not run the {config.slurm.prolog_profile!r} profile "
                             f"({answer.get('error', '?')}); {_goes_on('prolog')}")
        return 0
    verdicts: list[dict[str, Any]] = answer.get("verdicts") or []
    service: dict[str, Any] = answer.get("service") or {}
    breaker = bool((service.get("controller") or {}).get("breaker_open"))
    summary = _summary(verdicts)
    if service.get("state") in ("excluded", "drained") and service.get("source") == "controller":
        # The controller took the node out of service (its reason is vetd's already): no job here.
        controller = service.get("controller") or {}
        reason = str(controller.get("reason") or f"{REASON_PREFIX} excluded by the vetd controller")
        drained = service["state"] == "drained"  # Slurm has the node drained with vetd's reason already
        return _fault(config, "prolog", job, node, reason, summary, deadline, set_reason=not drained)
    failed = [v for v in verdicts if v.get("status") == "fail"]
    if failed and breaker:
        _note("prolog", job, f"{summary}; the circuit breaker of this node's partition is open, so vetd drains "
                             f"nothing there: {_goes_on('prolog')}")
        return 0
    if failed:
        return _fault(config, "prolog", job, node, f"{REASON_PREFIX} prolog {node}: {_describe(failed)}", summary,
                      deadline)
    clean = summary.endswith("passed")
    _note("prolog", job, summary if clean else f"{summary}; {_goes_on('prolog')}", warning=not clean)
    return 0


def epilog(config: AgentConfig, job: Job, deadline: float) -> int:
    sock, node = config.agent.control_socket, job.node or config.agent.node
    verdicts: list[dict[str, Any]] = []
    service: dict[str, Any] = {}
    notes = []
    try:
        budget = max(0.05, (_left(deadline) - QUICK_S) * RUN_SHARE)
        answer = ask(sock, {"op": "run", "profile": config.slurm.epilog_profile, "deadline": round(budget, 3),
                            "gpus": job.gpus}, budget + 0.2)
        if answer.get("ok"):
            verdicts, service = answer.get("verdicts") or [], answer.get("service") or {}
        else:
            notes.append(f"the agent could not run the {config.slurm.epilog_profile!r} profile "
                         f"({answer.get('error', '?')})")
        ended = ask(sock, {"op": "job_end", "job_id": job.id, "exit_code": job.exit_code, "state": job.state,
                           "signal": job.signal, "derived_exit_code": job.derived_exit_code},
                    _left(deadline, QUICK_S))
    except ControlError as exc:
        _note("epilog", job, "; ".join([*notes, f"cannot ask vetd ({exc})", _goes_on("epilog")]))
        return 0
    if not ended.get("ok"):
        notes.append(f"the agent did not take the job's end: {ended.get('error')}")
    if ended.get("ended") == "prolog_failed":  # the job never ran here; the prolog drained the node for it
        _note("epilog", job, "; ".join([*notes, _summary(verdicts), "its prolog failed here: the node is drained "
                                        "already, with the prolog's reason"]), warning=False)
        return 0
    events = [e for e in ((ended.get("job") or {}).get("events") or []) if e.get("severity") == "critical"]
    summary = "; ".join([*notes, _summary(verdicts)]
                        + ([f"{len(events)} critical events during the job"] if events else []))
    failed = [v for v in verdicts if v.get("status") == "fail"]
    faults = ([_describe(failed)] if failed else []) + (
        [_describe_events(events)] if events and config.slurm.epilog_fails_on_critical_events else [])
    if faults and (service.get("controller") or {}).get("breaker_open"):
        _note("epilog", job, f"{summary}; the circuit breaker of this node's partition is open, so vetd drains "
                             f"nothing there: {_goes_on('epilog')}")
        return 0
    if faults:
        return _fault(config, "epilog", job, node, f"{REASON_PREFIX} epilog {node}: {'; '.join(faults)}", summary,
                      deadline)
    _note("epilog", job, summary, warning=not summary.endswith("passed"))
    return 0


def _fault(config: AgentConfig, stage: str, job: Job, node: str, reason: str, summary: str, deadline: float,
           *, set_reason: bool = True) -> int:
    """A node fault: the drain reason set in Slurm, the agent told (a prolog's job will not run here), exit 1."""
    reason = clean_reason(reason)
    notes = [summary]
    if set_reason and config.slurm.set_reason:
        notes.append(_set_reason(config, node, reason, max(SCONTROL_MIN_S, _left(deadline))))
    if stage == "prolog":
        with contextlib.suppress(ControlError):  # the job does not start here (Slurm requeues it): it ended
            ask(config.agent.control_socket, {"op": "job_end", "job_id": job.id, "state": "prolog_failed"},
                max(0.2, _left(deadline, QUICK_S)))
    consequence = "Slurm drains the node" + (" and requeues the job" if stage == "prolog" else "")
    _note(stage, job, f"node fault: {reason}; {'; '.join(n for n in notes if n)}; {consequence}")
    print(f"vetd: node fault on {node}: {reason}", file=sys.stderr)
    return 1


def _set_reason(config: AgentConfig, node: str, reason: str, timeout: float) -> str:
    """``scontrol update NodeName=N State=DRAIN Reason=…`` (argv, no shell); what happened, for the log."""
    if not node:
        return "no node name (SLURMD_NODENAME) to set the drain reason on"
    import asyncio  # only a node fault pays for asyncio's import

    from vetd.core import proc

    argv = [find_program(config.slurm.scontrol), "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}"]
    try:
        done = asyncio.run(proc.run(argv, timeout))
    except proc.ProcError as exc:
        return f"scontrol could not set the drain reason ({exc}): Slurm's own reason stands"
    if done.returncode != 0:
        return (f"scontrol could not set the drain reason ({(done.stderr or done.stdout).strip()[:200]}): "
                "Slurm's own reason stands")
    return "drain reason set"


def _left(deadline: float, cap: float | None = None) -> float:
    left = max(0.05, deadline - time.monotonic())
    return left if cap is None else min(cap, left)


def _describe(verdicts: list[dict[str, Any]]) -> str:
    """``gpu_health[gpu1] ecc_dbe: 2 volatile uncorrectable ECC errors (and 2 more)``."""
    parts = []
    for verdict in verdicts[:NAMED]:
        codes = ",".join(verdict.get("codes") or [])
        message = str(verdict.get("message") or "")
        parts.append(f"{verdict.get('check')}[{verdict.get('entity')}]" + (f" {codes}" if codes else "")
                     + (f": {message}" if message else ""))
    more = f" (and {len(verdicts) - NAMED} more)" if len(verdicts) > NAMED else ""
    return "; ".join(parts) + more


def _describe_events(events: list[dict[str, Any]]) -> str:
    names = [f"{e.get('name')} {','.join((e.get('codes') or [])[:1])} on {e.get('entity')}" for e in events[:NAMED]]
    more = f" (and {len(events) - NAMED} more)" if len(events) > NAMED else ""
    return "critical during the job: " + ", ".join(names) + more


def _summary(verdicts: list[dict[str, Any]]) -> str:
    """``16 checks: 1 failed (gpu_health[gpu1]), 1 error (host_disk[node])`` or ``16 checks passed``."""
    bad: dict[str, list[str]] = {}
    for verdict in verdicts:
        if verdict.get("status") in ("fail", "error", "timeout"):
            bad.setdefault(str(verdict["status"]), []).append(f"{verdict.get('check')}[{verdict.get('entity')}]")
    if not bad:
        return f"{len(verdicts)} results passed"
    words = {"fail": "failed", "error": "errored (vetd's failure)", "timeout": "timed out (vetd's failure)"}
    return f"{len(verdicts)} results: " + ", ".join(
        f"{len(names)} {words[status]} ({', '.join(names[:NAMED])}{', …' if len(names) > NAMED else ''})"
        for status, names in bad.items())


def _goes_on(stage: str) -> str:
    return "the job runs" if stage == "prolog" else "the node stays in service"


def _note(stage: str, job: Job, message: str, *, warning: bool = True) -> None:
    log_local(TAG, f"{stage} job {job.id} on {job.node or '?'}: {message}", warning=warning)
