"""Hook specifications of the controller: what a plugin may add to what the controller does.

Built-ins (:mod:`vetd.controller.builtins`) are registered exactly as
third-party plugins are, from the ``vetd`` entry-point group (the same
modules may implement agent hooks too). Hooks register; objects do the work:
a backend's methods do the I/O, on the executor's side, never in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from vetd.controller.actions import AlertBackend, SchedulerBackend
    from vetd.controller.config import ControllerConfig, SchedulerSection

#: The controller's own healing steps (phases of the ladder, not agent commands).
OWN_STEPS = ("revet", "reboot")


@dataclass(frozen=True)
class HealingStep:
    """A step of a ``heal:`` ladder that sends the node one agent command.

    ``args(arg, gpu)`` builds the command's arguments from the step's argument
    (``restart_service nvidia-fabricmanager`` → ``nvidia-fabricmanager``) and
    the GPU the rule matched (``gpu3`` → ``3``, else ``all``).
    """

    action: str
    args: Callable[[str, str], dict[str, str]]
    needs_arg: bool = False
    example: str = ""
    description: str = ""


hookspec = pluggy.HookspecMarker("vetd")
hookimpl = pluggy.HookimplMarker("vetd")


@hookspec
def vetd_scheduler_backends() -> Mapping[str, Callable[[SchedulerSection], SchedulerBackend]]:
    """Return ``{name: factory}``: scheduler backends ``[scheduler] backend = NAME`` may choose.

    Called once when the controller starts. The factory gets the ``[scheduler]``
    section and returns an object with ``name`` and async ``drain(node,
    reason)``, ``resume(node)``, ``reboot(node, reason)``, each answering an
    :class:`~vetd.controller.actions.ActionOutcome`; ``resume`` must touch only
    vetd's own drains. Two plugins naming one backend is an error. Not ``firstresult``.
    """
    raise NotImplementedError


@hookspec
def vetd_alert_sinks(config: ControllerConfig) -> Iterable[AlertBackend]:
    """Return the alert sinks this plugin sends alerts to with this config (none: ``[]``).

    Called once when the controller starts. A sink has ``enabled`` and async
    ``send(alerts)``, ``alerts`` a list of Alertmanager API v2 alerts
    (:func:`~vetd.controller.actions.alert_payload`); every alert goes to every
    enabled sink. Not ``firstresult``.
    """
    raise NotImplementedError


@hookspec
def vetd_healing_steps() -> Mapping[str, HealingStep]:
    """Return ``{name: HealingStep}``: steps a rule's ``heal:`` ladder may name.

    A step sends one agent command (which the node's ``[commands] allow`` must
    list, and an agent plugin must provide) and succeeds when the node answers
    ok. ``revet PROFILE`` and ``reboot`` are the controller's own. Called when
    rules load (so ``vetd rules check`` knows them). Not ``firstresult``.
    """
    raise NotImplementedError
