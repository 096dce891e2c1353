"""The labelled GPU corpora (``tests/data/corpus/manifest.yaml``) judged as production judges them.

One place, shared by ``tests/plugins/gpu_health/test_corpus.py`` and
``bench/corpus.py``. Each case becomes the wire messages an agent would send,
and those are replayed through the controller with the shipped default rules
(``vetd rules test``'s path, :func:`vetd.controller.replay.replay`); the case's
action is what those rules decide:

* ``kmsg``: each line of the log as the agent's ``gpu_kmsg`` source reads it
  (:func:`~vetd.plugins.gpu_health.xid.parse_line`) and turns it into an event
  (``GpuRuntime._event_outcome``, with its de-duplication);
* ``capture`` / ``scenario``, one sample: ``vetd check`` in process
  (:func:`vetd.agent.oneshot.main`) with the shipped ``agent.toml`` and the
  case's profile and environment (``SLURM_JOB_GPUS`` …);
* several samples (``samples:`` times in one scenario, or a list of sources,
  as for a driver reload): the agent's periodic ``gpu_health``, one
  ``GpuRuntime`` evaluator across the samples, each sample's results sent.

The action: ``drain`` when the rules drain (or mark the node failed),
``alert`` when they only alert, ``none`` otherwise.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "corpus"
MANIFEST = CORPUS / "manifest.yaml"
SHIPPED_AGENT_CONFIG = REPO / "packaging" / "config" / "agent.toml"
ACTIONS = ("drain", "alert", "none")
KINDS = ("kmsg", "capture", "scenario")
NODE = "corpus01"
START = 1_700_000_000.0


@dataclass(frozen=True)
class Case:
    case: str
    corpus: str  # "fault" or "no-fault"
    kind: str
    sources: tuple[str, ...]
    expected: str
    why: str
    ref: str
    profile: str = "periodic"
    env: dict[str, str] = field(default_factory=dict)
    samples: tuple[float, ...] = ()
    #: A known product defect: the case is kept, marked xfail(strict) with this reason.
    product_bug: str = ""


@dataclass
class Judged:
    case: Case
    got: str
    decisions: list[str]

    @property
    def ok(self) -> bool:
        return self.got == self.case.expected


def load_cases(path: Path = MANIFEST) -> list[Case]:
    from vetd.core.durations import parse_duration

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    cases = []
    for entry in data["cases"]:
        source = entry["source"]
        case = Case(case=entry["case"], corpus=entry["corpus"], kind=entry["kind"],
                    sources=tuple(source) if isinstance(source, list) else (source,),
                    expected=entry["expected"], why=" ".join(entry["why"].split()), ref=entry["ref"],
                    profile=entry.get("profile", "periodic"), env=dict(entry.get("env", {})),
                    samples=tuple(parse_duration(str(s)) for s in entry.get("samples", [])),
                    product_bug=entry.get("product_bug", ""))
        if case.corpus not in ("fault", "no-fault") or case.kind not in KINDS or case.expected not in ACTIONS:
            raise ValueError(f"{path}: case {case.case}: bad corpus, kind or expected")
        if case.corpus == "no-fault" and case.expected == "drain":
            raise ValueError(f"{path}: case {case.case}: a no-fault case never expects a drain")
        for source in case.sources:
            if not (CORPUS / source).is_file() and not (REPO / source).is_file():
                raise ValueError(f"{path}: case {case.case}: no file {source}")
        cases.append(case)
    names = [c.case for c in cases]
    if len(names) != len(set(names)):
        raise ValueError(f"{path}: case names repeat")
    return cases


def source_path(source: str) -> Path:
    """A source names a file of the corpus, or one elsewhere in the repository (``tests/data/…``)."""
    return CORPUS / source if (CORPUS / source).is_file() else REPO / source


@contextmanager
def job_environment(env: dict[str, str]) -> Iterator[None]:
    """The case's job variables and no others (the machine running the tests may set CUDA_VISIBLE_DEVICES)."""
    from vetd.plugins.gpu_health.runtime import JOB_GPU_VARIABLES

    saved = {name: os.environ.get(name) for name in {*JOB_GPU_VARIABLES, *env}}
    try:
        for name in JOB_GPU_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(env)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _gpu_config(case: Case, source: str) -> dict[str, Any]:
    path = str(source_path(source))
    if case.kind == "capture":
        return {"source": "capture", "capture": path}
    return {"source": "scenario", "scenario": path, "scenario_at": 1e9}  # as `vetd check --scenario`


def _agent_config(case: Case, source: str) -> Any:
    from vetd.agent.config import load_agent_config

    config = load_agent_config(SHIPPED_AGENT_CONFIG, environ={})
    config.plugins.setdefault("gpu_health", {}).update(_gpu_config(case, source))
    return config


def _checks(case: Case) -> list[str]:
    return ["gpu_health", "gpu_idle"] if case.profile == "prolog" else ["gpu_health"]


def _one_check(case: Case) -> list[dict[str, Any]]:
    """``vetd check CHECKS --profile P --capture|--scenario FILE --json``, in process."""
    from vetd.agent import oneshot

    out = io.StringIO()
    with job_environment(case.env):
        oneshot.main(_agent_config(case, case.sources[0]), _checks(case), case.profile, True, out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _periodic(case: Case) -> list[list[dict[str, Any]]]:
    """The agent's periodic gpu_health: one evaluator across samples (scenario times, or sources in turn)."""
    from vetd.agent.checks import PROFILE
    from vetd.core.configfile import convert
    from vetd.plugins.gpu_health.config import GpuHealthConfig
    from vetd.plugins.gpu_health.runtime import GpuRuntime

    shipped = _agent_config(case, case.sources[0]).plugins["gpu_health"]
    evaluator = None
    batches = []
    steps = [(case.sources[0], at) for at in case.samples] or [(source, None) for source in case.sources]
    token = PROFILE.set(case.profile)
    try:
        with job_environment(case.env):
            for source, at in steps:
                table = {**shipped, **_gpu_config(case, source)}
                if at is not None:
                    table["scenario_at"] = at
                runtime = GpuRuntime(convert(table, GpuHealthConfig, path=SHIPPED_AGENT_CONFIG))
                if evaluator is not None:
                    runtime.evaluator = evaluator  # the same agent, a later sample
                evaluator = runtime.evaluator
                batches.append([{"check": "gpu_health", "entity": o.entity, "status": o.status,
                                 "codes": list(o.codes), "metrics": dict(o.metrics), "message": o.message}
                                for o in runtime.health()])
    finally:
        PROFILE.reset(token)
    return batches


def _kmsg_events(case: Case) -> list[dict[str, Any]]:
    """The events the agent's gpu_kmsg source sends for this log, in order."""
    from vetd.plugins.gpu_health.config import GpuHealthConfig
    from vetd.plugins.gpu_health.kernlog import split_stamp
    from vetd.plugins.gpu_health.runtime import GpuRuntime
    from vetd.plugins.gpu_health.xid import parse_line

    runtime = GpuRuntime(GpuHealthConfig())
    events = []
    for raw in source_path(case.sources[0]).read_text(encoding="utf-8").splitlines():
        parsed = parse_line(split_stamp(raw)[2])
        if parsed is None or not runtime.dedupe.first(parsed.event):
            continue
        outcome = runtime._event_outcome(parsed.event, "kmsg")
        events.append({"name": outcome.name, "entity": outcome.entity, "severity": outcome.severity,
                       "codes": list(outcome.codes), "metrics": dict(outcome.metrics), "message": outcome.message})
    return events


def messages(case: Case) -> list[dict[str, Any]]:
    """The case as ``vetd rules test`` lines (the wire messages the agent would send)."""
    lines: list[dict[str, Any]] = [{"kind": "state", "ts": START, "node": NODE, "online": True,
                                    "labels": {"partition": "gpu"}}]
    if case.kind == "kmsg":
        batches = [[{"kind": "event", **event} for event in _kmsg_events(case)]]
    elif case.samples or len(case.sources) > 1:
        batches = [[{"kind": "result", **r} for r in batch] for batch in _periodic(case)]
    else:
        batches = [[{"kind": "result", **{k: r[k] for k in ("check", "entity", "status", "codes", "metrics",
                                                              "message")}} for r in _one_check(case)]]
    for n, batch in enumerate(batches, start=1):
        for message in batch:
            message["metrics"] = {k: v for k, v in message["metrics"].items() if v is not None}
            lines.append({**message, "ts": START + 60 * n, "node": NODE})
    return lines


def default_rules() -> str:
    """The rules a controller runs when given none (``vetd up``, ``vetd rules test`` without --rules)."""
    return str(resources.files("vetd.controller").joinpath("default_rules.yaml"))


def judge(case: Case) -> Judged:
    from vetd.controller.replay import read_events, replay

    lines = messages(case)
    with tempfile.TemporaryDirectory(prefix="vetd-corpus-") as tmp:
        events = Path(tmp) / f"{case.case}.jsonl"
        events.write_text("".join(json.dumps(line) + "\n" for line in lines))
        decisions = replay([default_rules()], read_events(events))
    actions = {d.action for d in decisions}
    got = "drain" if actions & {"drain", "mark_failed"} else "alert" if "alert" in actions else "none"
    return Judged(case, got, [f"{d.action}:{d.rule}" for d in decisions if d.action in ("drain", "alert",
                                                                                          "mark_failed")])


def judge_all(cases: list[Case] | None = None) -> list[Judged]:
    return [judge(case) for case in (load_cases() if cases is None else cases)]


def figures(judged: list[Judged]) -> dict[str, Any]:
    """Recall (faults drained or alerted as expected) and false drains (no-fault cases drained)."""
    faults = [j for j in judged if j.case.corpus == "fault"]
    clean = [j for j in judged if j.case.corpus == "no-fault"]
    caught = [j for j in faults if j.ok]
    return {"fault_cases": len(faults), "faults_as_expected": len(caught),
            "recall_pct": round(100.0 * len(caught) / len(faults), 1) if faults else 0.0,
            "missed": [j.case.case for j in faults if not j.ok],
            "no_fault_cases": len(clean), "no_fault_as_expected": sum(j.ok for j in clean),
            "false_drains": sum(j.got == "drain" for j in clean),
            "false_drain_cases": [j.case.case for j in clean if j.got == "drain"]}
