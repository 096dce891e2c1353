"""Does vetd's NVML source read what nvidia-smi reads?

Takes an ``nvidia-smi -q -x`` capture and an NVML snapshot a moment apart and
prints, per GPU, every snapshot field where the two differ, and every field
one of them leaves unreported. Fields that move on their own (temperature,
power, utilisation, clocks...) are marked ``~`` and differ harmlessly; a
field both report with other values is a misreading by one of the two
readers (``!``); a field only one of them reports is listed (``?``: a capture
of this schema does not print it, or NVML does not give it).

Two parts, each checked before its figures (every GPU NVML sees is in the
capture, by PCI bus id): the real driver against ``nvidia-smi -q -x`` run now
(``skip``, with why, without a driver or nvidia-smi), then the simulated
library over a capture (``--capture``, default the H200's in tests/data)
against that same capture: the round trip must agree on every field that
does not move. Writes ``bench/results/nvml_vs_smi.json``.

    python bench/nvml_vs_smi.py                  # on a GPU node: runs nvidia-smi -q -x itself, then the simulation
    python bench/nvml_vs_smi.py --live-capture F.xml   # the driver against a capture taken just before
    python bench/nvml_vs_smi.py --capture F.xml --simulate   # no GPU: the simulation of F against F alone

Exit status: 0 when the stable fields agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import no_gpu_driver, verify, write_results
from vetd.plugins.gpu_health.capture import parse_capture
from vetd.plugins.gpu_health.model import GpuSnapshot, NodeSnapshot
from vetd.plugins.gpu_health.nvml import NvmlSource

CAPTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "nvidia-smi" / "h200.xml"

#: Fields that change between two reads of a healthy, idle GPU.
MOVING = {"temp_c", "temp_memory_c", "power_w", "utilization_pct", "memory_used_mib", "clock_reasons",
          "clock_sm_mhz", "clock_memory_mhz",
          "pcie_gen", "pcie_width", "pcie_replay_counter", "processes", "ecc_volatile_sram_correctable",
          "ecc_volatile_dram_correctable", "ecc_aggregate_sram_correctable", "ecc_aggregate_dram_correctable",
          "ecc_volatile_correctable_total", "nvlinks"}


def compare(nvml: GpuSnapshot, smi: GpuSnapshot) -> list[str]:
    lines = []
    mine, theirs = msgspec.structs.asdict(nvml), msgspec.structs.asdict(smi)
    for field in mine:
        a, b = mine[field], theirs[field]
        if a == b:
            continue
        # nvidia-smi prints whole MiB (an H200's 615.06 MiB reservation shows as 616 MiB)
        rounded = field.endswith("_mib") and isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1.0
        moving = field in MOVING or rounded
        if a is None or b is None:
            mark = "~" if moving else "?"
            lines.append(f"  {mark} {field}: only {'nvidia-smi' if a is None else 'NVML'} reports it ({a if b is None else b!r})")
        else:
            lines.append(f"  {'~' if moving else '!'} {field}: NVML {a!r} / nvidia-smi {b!r}")
    return lines


def side_by_side(nvml: NodeSnapshot, smi: NodeSnapshot, what: str) -> dict[str, Any]:
    """Print the comparison; its figures (after checking both readers saw the same GPUs)."""
    print(f"{what}: driver: NVML {nvml.driver_version} / nvidia-smi {smi.driver_version}; "
          f"CUDA: NVML {nvml.cuda_version} / nvidia-smi {smi.cuda_version}")
    by_bus = {gpu.pci_bus_id.lower(): gpu for gpu in smi.gpus}
    missing = [gpu.pci_bus_id for gpu in nvml.gpus if gpu.pci_bus_id.lower() not in by_bus]
    verify(nvml.gpus, f"{what}: NVML saw no GPU")
    verify(not missing, f"{what}: GPUs {missing} NVML sees are not in the nvidia-smi capture")
    disagree = int(nvml.driver_version != smi.driver_version)
    only_one: list[str] = []
    for gpu in nvml.gpus:
        lines = compare(gpu, by_bus[gpu.pci_bus_id.lower()])
        disagree += sum(line.startswith("  !") for line in lines)
        only_one += [f"{gpu.entity} {line[4:].split(':')[0]}" for line in lines if line.startswith("  ?")]
        print(f"{gpu.entity} {gpu.pci_bus_id} {gpu.name}: {'differs' if lines else 'agrees'}")
        for line in lines:
            print(line)
    print(f"{what}: {disagree} difference(s) in fields that should not move; "
          f"{len(only_one)} field(s) only one reader reports")
    return {"gpus": len(nvml.gpus), "gpu_names": sorted({gpu.name for gpu in nvml.gpus}),
            "driver_version": nvml.driver_version, "stable_fields_differing": disagree,
            "reported_by_one_reader_only": only_one}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture", type=Path, default=CAPTURE,
                        help="the capture the simulated part answers from and is held to (default: %(default)s)")
    parser.add_argument("--simulate", action="store_true", help="the simulated part alone")
    parser.add_argument("--live-capture", type=Path,
                        help="the driver part against this capture, taken just before (default: run nvidia-smi)")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    if args.simulate:
        figures["driver"] = {"status": "skip", "why": "--simulate: the simulated library alone"}
    elif why := no_gpu_driver(nvidia_smi=True):
        figures["driver"] = {"status": "skip", "why": why}
        print(f"driver: skip ({why})")
    else:
        xml = args.live_capture.read_bytes() if args.live_capture else subprocess.run(
            ["nvidia-smi", "-q", "-x"], check=True, capture_output=True).stdout
        figures["driver"] = side_by_side(NvmlSource(process_names=False).snapshot(), parse_capture(xml, "nvidia-smi"),
                                         "driver")

    from vetd.plugins.gpu_health.nvmlsim import SimulatedNvml, install
    from vetd.plugins.gpu_health.replay import CaptureSource

    install(SimulatedNvml.of(CaptureSource(str(args.capture))))
    simulated = side_by_side(NvmlSource(process_names=False).snapshot(),
                             parse_capture(args.capture.read_bytes(), "nvidia-smi"), f"simulated({args.capture.name})")
    verify(simulated["stable_fields_differing"] == 0,
           f"the simulation of {args.capture.name} reads {simulated['stable_fields_differing']} stable field(s) "
           "otherwise than the capture itself")
    figures["simulated"] = simulated
    print(f"written to {write_results('nvml_vs_smi', figures, capture=args.capture.name)}")
    driver = figures["driver"]
    return 1 if driver.get("stable_fields_differing") else 0


if __name__ == "__main__":
    sys.exit(main())
