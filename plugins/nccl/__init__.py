"""``nccl``: all-reduce bandwidth across the node's GPUs (profiles ``prolog``, ``full``).

Check ``nccl_allreduce``, one result for the node: every local GPU in one
worker process (:mod:`vetd.plugins.nccl.collective` says why one), a size sweep
(``prolog`` 1 MiB…1 GiB, ``full`` to 8 GiB), algbw and busbw per size with
nccl-tests' definitions, the peak busbw as the headline metric and the size
table in the message. Judged against ``[plugins.nccl] min_busbw_gbps`` or the
SKU table's floor for that many GPUs (``busbw_low``); a wrong sum fails
(``nccl_wrong``). One GPU: ``skip`` (``single_gpu``) unless ``single_rank``.

Pair test ``nccl_pairs`` (``vetd vet``, :mod:`vetd.plugins.nccl.pairs`): NCCL
between two nodes' GPUs, in the pair rounds every pair test shares.

The worker launcher, GPU inventory and SKU table are gpu_compute's: one
implementation of "a killable process per run" for every GPU check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from vetd.agent.api import Check, Outcome, PairTest, Status, current_profile, hookimpl
from vetd.plugins.gpu_compute.launch import Job, run_workers
from vetd.plugins.gpu_compute.runtime import PROFILES, cupy_missing, gpu_targets
from vetd.plugins.gpu_compute.skus import lookup
from vetd.plugins.nccl.config import NcclConfig

if TYPE_CHECKING:
    from vetd.agent.api import CheckRegistry, PairTestRegistry, PluginConfigs


@hookimpl
def vetd_config_tables() -> Mapping[str, type[msgspec.Struct]]:
    return {"nccl": NcclConfig}


@hookimpl
def vetd_register_checks(registry: CheckRegistry, configs: PluginConfigs) -> None:
    config = configs.typed("nccl", NcclConfig)
    timeout = float(max(config.timeout_prolog, config.timeout_full)) + 30.0
    registry.add(Check("nccl_allreduce", lambda: allreduce(config, configs), timeout, profiles=PROFILES,
                       description="NCCL all-reduce busbw over the node's GPUs (size sweep)"))


@hookimpl
def vetd_register_pair_tests(registry: PairTestRegistry, configs: PluginConfigs) -> None:
    from vetd.plugins.nccl import pairs

    config = configs.typed("nccl", NcclConfig)
    registry.add(PairTest("nccl_pairs", lambda: pairs.NcclPairEndpoint(config),
                          unavailable=lambda: pairs.unavailable(config), seconds=float(config.pair_seconds),
                          overhead_s=float(config.pair_overhead), priority=10,
                          description="NCCL send/recv between the nodes' first GPUs, both directions at once"))


def size_label(size: int) -> str:
    for unit, scale in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def allreduce(config: NcclConfig, configs: PluginConfigs) -> Outcome:
    if config.array_backend == "numpy":
        return Outcome(status="skip", codes=["cpu_backend"], message="NCCL needs CUDA: not run on the numpy backend")
    if why := cupy_missing():
        return Outcome(status="skip", codes=["no_cuda"], message=why)
    targets = gpu_targets(configs)
    if isinstance(targets, Outcome):
        return targets
    busy = [f"{t.entity}: {t.busy}" for t in targets if t.busy]
    if busy:
        return Outcome(status="skip", codes=["gpu_busy"], message="compute processes on " + "; ".join(busy))
    if len(targets) < 2 and not config.single_rank:
        return Outcome(status="skip", codes=["single_gpu"], metrics={"gpus": float(len(targets))},
                       message=f"{len(targets)} GPU on this node: nothing to all-reduce across "
                       "([plugins.nccl] single_rank = true runs one rank)")
    full = current_profile() == "full"
    spec = {"test": "nccl", "min_bytes": config.min_bytes,
            "max_bytes": config.max_bytes_full if full else config.max_bytes_prolog,
            "warmup": config.warmup_iters, "iters": config.iters_full if full else config.iters_prolog}
    deadline = float(config.timeout_full if full else config.timeout_prolog)
    visible = ",".join(str(t.index) for t in targets)
    result = run_workers([Job("node", visible)], [spec], "cupy", deadline)["node"][0]
    return judge(result, config, targets[0].name if targets else "")


def judge(result: Mapping[str, Any], config: NcclConfig, gpu_name: str) -> Outcome:
    if "failed" in result:
        return Outcome(status=result["failed"], codes=[result["code"]], message=result["message"])
    if "skip" in result:
        return Outcome(status="skip", codes=[result["skip"]], message=result.get("message", ""))
    if "error" in result:
        return Outcome(status="error", codes=["worker_error"], message=result["error"])
    data = result["result"]
    ranks, sizes = int(data["ranks"]), data["sizes"]
    peak_bus = max(row["busbw_gbps"] for row in sizes)
    peak_alg = max(row["algbw_gbps"] for row in sizes)
    metrics = {"busbw_gbps": round(peak_bus, 2), "algbw_gbps": round(peak_alg, 2), "ranks": float(ranks)}
    metrics.update({f"busbw_gbps_{size_label(row['bytes'])}": round(row["busbw_gbps"], 2) for row in sizes})
    table = " ".join(f"{size_label(r['bytes'])}:{r['algbw_gbps']:.1f}/{r['busbw_gbps']:.1f}" for r in sizes)
    message = f"{ranks} ranks, peak busbw {peak_bus:.1f} GB/s; size:algbw/busbw GB/s {table}"
    if data["wrong_elements"]:
        metrics["wrong_elements"] = float(data["wrong_elements"])
        return Outcome(status="fail", codes=["nccl_wrong"], metrics=metrics,
                       message=f"{int(data['wrong_elements'])} wrong elements in the all-reduce result; {message}")
    if ranks == 1:
        # busbw is 0 by definition with one rank: not a measurement, so not a metric (a
        # rule comparing busbw with peers must not see a 0 from a one-GPU node).
        single = {key: value for key, value in metrics.items() if not key.startswith("busbw_gbps")}
        single.update({f"algbw_gbps_{size_label(row['bytes'])}": round(row["algbw_gbps"], 2) for row in sizes})
        return Outcome(status="pass", codes=["single_rank", "no_reference"], metrics=single,
                       message=f"one rank (a local copy, no link measured): {message}")
    floor = config.min_busbw_gbps
    if not floor:
        sku = lookup(gpu_name) if gpu_name else None
        if sku is not None and int(sku.floor.get("nccl_gpus", 0)) == ranks:
            floor = sku.floor.get("nccl_busbw_gbps", 0.0)
    if not floor:
        return Outcome(status="pass", codes=["no_reference"], metrics=metrics, message=message)
    metrics["floor_gbps"] = floor
    if peak_bus < floor:
        status: Status = "fail" if peak_bus < floor * config.fail_fraction_of_floor else "warn"
        return Outcome(status=status, codes=["busbw_low"], metrics=metrics,
                       message=f"peak busbw {peak_bus:.1f} < floor {floor:g} GB/s; {message}")
    return Outcome(status="pass", metrics=metrics, message=message)
