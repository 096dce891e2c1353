"""The controller's built-in backends and healing steps, registered as a plugin like any other."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from vetd.controller.actions import (
    AlertBackend,
    AlertSender,
    HealingStep,
    NoScheduler,
    SchedulerBackend,
    Slurm,
)
from vetd.controller.config import ControllerConfig, SchedulerSection
from vetd.core.hookspecs import hookimpl


@hookimpl
def vetd_scheduler_backends() -> Mapping[str, Callable[[SchedulerSection], SchedulerBackend]]:
    return {
        "none": lambda _section: NoScheduler(),
        "slurm": lambda section: Slurm(section.scontrol, float(section.timeout)),
    }


@hookimpl
def vetd_alert_sinks(config: ControllerConfig) -> Iterable[AlertBackend]:
    """Alertmanager API v2 (or a webhook taking its body) at every ``[alerts] urls`` entry."""
    return [AlertSender(config.alerts.urls, timeout=float(config.alerts.timeout))] if config.alerts.urls else []


@hookimpl
def vetd_healing_steps() -> Mapping[str, HealingStep]:
    return {
        "gpu_reset": HealingStep("gpu_reset", lambda _arg, gpu: {"gpu": gpu},
                                 description="reset the GPU the rule matched (gpuN), else every GPU"),
        "restart_service": HealingStep("restart_service", lambda arg, _gpu: {"service": arg}, needs_arg=True,
                                       example="nvidia-fabricmanager", description="restart a service"),
    }
