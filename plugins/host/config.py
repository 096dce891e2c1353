"""``[plugins.host]``: the host checks' thresholds (0 switches a threshold off)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from vetd.agent.api import Duration

#: A share of a total, 0 to 1.
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]


class HostConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Available memory below this share of the total: warn / fail (``memory_low``).
    memory_warn_fraction: Fraction = 0.10
    memory_fail_fraction: Fraction = 0.05
    #: In the daemon's ``periodic`` runs, memory below ``memory_fail_fraction`` only warns unless
    #: this is true: a running job may use the memory, and draining its node for it kills the job.
    #: ``prolog`` and ``full`` (no job running) still fail.
    memory_fail_in_periodic: bool = False
    #: A single sample of the host (CPU, memory, load, network) every ``[agent] telemetry_interval``,
    #: for MQTT subscribers of their own: the controller keeps only the telemetry plugin's windows
    #: ([plugins.telemetry], the same and more), so this is off.
    telemetry: bool = False
    #: Paths whose file systems must keep free space.
    disk_paths: list[str] = msgspec.field(default_factory=lambda: ["/", "/tmp"])
    #: Free space below this share of a file system: warn / fail (``disk_low``).
    disk_warn_fraction: Fraction = 0.10
    disk_fail_fraction: Fraction = 0.02
    #: Absolute floor too (GiB); 0 disables it.
    disk_fail_gib: NonNegative = 1.0
    #: Paths that must exist (e.g. ``["/capstor/scratch/cscs"]`` on Alps).
    required_paths: list[str] = []
    #: Paths that must be mount points.
    required_mounts: list[str] = []
    #: Variable → expected value; ``""`` means "must be set, any value" (e.g.
    #: ``{ NCCL_NET = "AWS Libfabric", FI_PROVIDER = "cxi" }`` on Alps). Under
    #: ``vetd check`` in a prolog this is the job's environment (see ``env_file``).
    required_env: dict[str, str] = {}
    #: A file of ``KEY=VALUE`` lines (``export`` and quotes allowed, ``#`` comments): the
    #: environment jobs get, checked instead of the process's. The daemon's own environment
    #: (systemd's) holds none of a job's variables, so in ``periodic`` runs without this file
    #: ``host_env`` reports ``skip`` (``no_job_env``) rather than fail every node.
    env_file: str = ""
    #: Load average (1 min) per logical CPU: warn / fail; 0 disables.
    load_warn_per_core: NonNegative = 2.0
    load_fail_per_core: NonNegative = 0.0
    #: Deadline of each host check.
    timeout: Duration = Duration(10.0)
