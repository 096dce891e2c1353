"""What the checks do on the agent's side: find the GPUs, start the workers, judge what they measured."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vetd.agent.api import Outcome, PluginConfigs, current_profile
from vetd.plugins.gpu_compute.config import GpuComputeConfig
from vetd.plugins.gpu_compute.launch import Batcher, Job, run_workers
from vetd.plugins.gpu_compute.skus import Sku, lookup

#: Check name → the worker test it runs.
TESTS = {"gpu_gemm": "gemm", "gpu_memory_bandwidth": "stream", "gpu_memtest": "memtest",
         "gpu_pcie_bandwidth": "pcie"}
#: Profiles the compute checks run in: never ``periodic`` (they load the GPU a job may want).
PROFILES = frozenset({"prolog", "full"})
#: PCIe payload bandwidth per lane and direction after encoding (GB/s), by generation.
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


@dataclass
class Target:
    """One GPU as NVML describes it, before anything touches it."""

    entity: str
    index: int
    name: str = ""
    #: Compute processes on it (``""``: none); None: unknown (no NVML).
    busy: str | None = ""
    pcie_gen_max: int | None = None
    pcie_width_max: int | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None


def cupy_missing() -> str:
    """Why CuPy cannot run here (``""``: it can be imported). Looks, never imports: no CUDA in the agent."""
    return "" if importlib.util.find_spec("cupy") is not None else "CuPy is not installed (pip install 'vetd[cuda]')"


def gpu_targets(configs: PluginConfigs) -> list[Target] | Outcome:
    """The node's GPUs from gpu_health's NVML source (its deadline, capture and scenario support)."""
    from vetd.plugins.gpu_health import runtime_for
    from vetd.plugins.gpu_health.config import GpuHealthConfig
    from vetd.plugins.gpu_health.runtime import GpuRuntime
    from vetd.plugins.gpu_health.sources import nvidia_gpus_in_sysfs

    runtime = runtime_for(configs) if "gpu_health" in configs else GpuRuntime(GpuHealthConfig())
    snapshot = runtime.snapshot()
    if isinstance(snapshot, Outcome):
        present = nvidia_gpus_in_sysfs()
        if present == 0:
            return Outcome(status="skip", codes=["no_cuda"], message=f"no NVIDIA GPU on this node ({snapshot.message})")
        # NVML cannot say whether a job is on a GPU: say so on each result rather than guess.
        return [Target(entity=f"gpu{i}", index=i, busy=None) for i in range(present)]
    targets = []
    for gpu in snapshot.gpus:
        compute = [f"{p.name or '?'} ({p.pid})" for p in gpu.processes or [] if "C" in p.type]
        targets.append(Target(entity=gpu.entity, index=gpu.index, name=gpu.name,
                              busy=None if gpu.processes is None else ", ".join(compute),
                              pcie_gen_max=gpu.pcie_gen_max, pcie_width_max=gpu.pcie_width_max,
                              pcie_gen=gpu.pcie_gen, pcie_width=gpu.pcie_width))
    return targets


class ComputeRuntime:
    """One config load's compute checks: they share a :class:`Batcher`."""

    def __init__(self, config: GpuComputeConfig, configs: PluginConfigs) -> None:
        self.config, self.configs = config, configs
        self.batcher = Batcher(self._run_batch)

    def check(self, name: str) -> list[Outcome]:
        if self.config.array_backend == "cupy" and (why := cupy_missing()):
            return [Outcome(status="skip", codes=["no_cuda"], message=why)]
        outcomes: list[Outcome] = self.batcher.request(TESTS[name])
        return outcomes

    def deadline(self) -> float:
        return float(self.config.timeout_full if current_profile() == "full" else self.config.timeout_prolog)

    def spec(self, test: str) -> dict[str, Any]:
        c, full, cpu = self.config, current_profile() == "full", self.config.array_backend == "numpy"
        if test == "gemm":
            n = c.numpy_gemm_n if cpu else (c.gemm_n_full if full else c.gemm_n_prolog)
            return {"test": test, "dtypes": list(c.gemm_dtypes), "n": n,
                    "repeats": c.gemm_repeats_full if full else c.gemm_repeats_prolog}
        if test == "memtest":
            return {"test": test, "mib": c.numpy_memtest_mib,
                    "fraction": c.memtest_fraction_full if full else c.memtest_fraction_prolog,
                    "passes": c.memtest_passes_full if full else c.memtest_passes_prolog}
        if test == "stream":
            mib = c.numpy_stream_mib if cpu else (c.stream_mib_full if full else c.stream_mib_prolog)
            return {"test": test, "mib": mib, "repeats": c.bandwidth_repeats}
        return {"test": test, "mib": c.pcie_mib_full if full else c.pcie_mib_prolog, "repeats": c.bandwidth_repeats}

    def _run_batch(self, tests: list[str]) -> dict[str, list[Outcome]]:
        out: dict[str, list[Outcome]] = {test: [] for test in tests}
        if self.config.array_backend == "numpy":
            runnable = [t for t in tests if t != "pcie"]
            out.get("pcie", []).append(Outcome(status="skip", entity="cpu", codes=["cpu_backend"],
                                               message="no PCIe link to measure on the numpy backend"))
            if runnable:
                results = run_workers([Job("cpu", None)], [self.spec(t) for t in runnable], "numpy", self.deadline())
                for test, result in zip(runnable, results["cpu"], strict=True):
                    out[test].append(judge(test, Target(entity="cpu", index=-1, name="cpu"), result, self.config))
            return out
        targets = gpu_targets(self.configs)
        if isinstance(targets, Outcome):
            return {test: [targets] for test in tests}
        free = []
        for target in targets:
            if target.busy:
                for test in tests:
                    out[test].append(Outcome(status="skip", entity=target.entity, codes=["gpu_busy"],
                                             message=f"compute processes on the GPU, not touched: {target.busy}"))
            else:
                free.append(target)
        if free:
            specs = [self.spec(test) for test in tests]
            results = run_workers([Job(t.entity, str(t.index)) for t in free], specs, "cupy", self.deadline())
            for target in free:
                for test, result in zip(tests, results[target.entity], strict=True):
                    out[test].append(judge(test, target, result, self.config))
        for test in tests:
            if not out[test]:
                out[test].append(Outcome(status="skip", codes=["no_cuda"], message="no GPU found"))
        return out


def floors_for(target: Target, config: GpuComputeConfig, sku: Sku | None) -> dict[str, float]:
    floors = dict(sku.floor) if sku is not None else {}
    floors.update(config.floors)
    if "h2d_gbps" not in floors and target.pcie_gen_max and target.pcie_width_max:
        link = PCIE_LANE_GBPS.get(target.pcie_gen_max, 0.0) * target.pcie_width_max
        if link:
            floors["h2d_gbps"] = floors["d2h_gbps"] = round(link * config.pcie_floor_fraction, 2)
    return floors


def judge(test: str, target: Target, result: Mapping[str, Any], config: GpuComputeConfig) -> Outcome:
    """One worker result → the outcome for one GPU."""
    entity = target.entity
    if "failed" in result:
        return Outcome(status=result["failed"], entity=entity, codes=[result["code"]], message=result["message"])
    if "skip" in result:
        return Outcome(status="skip", entity=entity, codes=[result["skip"]], message=result.get("message", ""))
    if "error" in result:
        return Outcome(status="error", entity=entity, codes=["worker_error"], message=result["error"])
    device = str(result.get("device", target.name))
    cpu = target.index < 0
    sku = None if cpu else lookup(target.name or device, config.sku_file)
    floors = {} if cpu else floors_for(target, config, sku)
    measured: dict[str, float] = {}
    codes: list[str] = []
    worst = "pass"
    data = result["result"]
    if test == "gemm":
        wrong = []
        for dtype, r in data.items():
            measured[f"tflops_{dtype}"] = round(r["tflops"], 3)
            measured[f"checksum_error_{dtype}"] = r["checksum_error"] if r["checksum_error"] != float("inf") else 1e308
            if not r["checksum_error"] <= r["tolerance"]:
                wrong.append(f"{dtype} checksum error {r['checksum_error']:.3g} > {r['tolerance']:.3g}")
        if wrong:
            return Outcome(status="fail", entity=entity, codes=["gemm_wrong"], metrics=measured,
                           message=f"{device}: wrong GEMM result: {'; '.join(wrong)}")
        text = ", ".join(f"{d} {r['tflops']:.3g}" for d, r in data.items()) + " TFLOP/s"
        slow_code = "gemm_slow"
    elif test == "memtest":
        measured = {"bad_words": data["bad_words"], "tested_gib": round(data["tested_bytes"] / 2**30, 3),
                    "passes": data["passes"]}
        if data["bad_words"] > 0:
            return Outcome(status="fail", entity=entity, codes=["memtest_bad_words"], metrics=measured,
                           message=f"{device}: {int(data['bad_words'])} bad words in {measured['tested_gib']} GiB")
        return Outcome(status="pass", entity=entity, metrics=measured, codes=["cpu_backend"] if cpu else [],
                       message=f"{device}: {measured['tested_gib']} GiB × 3 patterns × {int(data['passes'])} passes, "
                       "no bad word")
    elif test == "stream":
        measured = {"copy_gbps": round(data["copy_gbps"], 2), "triad_gbps": round(data["triad_gbps"], 2)}
        if not data["triad_ok"]:
            return Outcome(status="fail", entity=entity, codes=["triad_wrong"], metrics=measured,
                           message=f"{device}: the triad kernel computed wrong values")
        text = f"copy {measured['copy_gbps']:.0f} GB/s, triad {measured['triad_gbps']:.0f} GB/s"
        slow_code = "bandwidth_low"
    else:
        measured = {"h2d_gbps": round(data["h2d_gbps"], 2), "d2h_gbps": round(data["d2h_gbps"], 2)}
        for key in ("pcie_gen", "pcie_width", "pcie_gen_max", "pcie_width_max"):
            if (value := getattr(target, key)) is not None:
                measured[key] = float(value)
        text = f"host→device {measured['h2d_gbps']:.1f} GB/s, device→host {measured['d2h_gbps']:.1f} GB/s"
        slow_code = "pcie_slow"
    judged = [key for key in measured if key in floors]
    low = []
    for key in judged:
        if measured[key] < floors[key]:
            hard = measured[key] < floors[key] * config.fail_fraction_of_floor
            worst = "fail" if hard or worst == "fail" else "warn"
            low.append(f"{key} {measured[key]:g} < floor {floors[key]:g}")
    if low:
        codes.append(slow_code)
    if cpu:
        codes.append("cpu_backend")
    elif not judged:
        codes.append("no_reference")
    if target.busy is None and not cpu:
        codes.append("busy_unknown")
    where = f"{device} ({sku.name})" if sku else device
    note = ("; below floor: " + ", ".join(low)) if low else ("" if judged or cpu else "; no floor for this GPU")
    if target.busy is None and not cpu:
        note += "; NVML unavailable: could not check the GPU was free"
    return Outcome(status=worst, entity=entity, codes=codes, metrics=measured,  # type: ignore[arg-type]
                   message=f"{where}: {text}{note}")
