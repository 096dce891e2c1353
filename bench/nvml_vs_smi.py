"""On a GPU node: does vetd's NVML source read what nvidia-smi reads?

Takes an ``nvidia-smi -q -x`` capture and an NVML snapshot a moment apart and
prints, per GPU, every snapshot field where the two differ, and every field
one of them leaves unreported. Fields that move on their own (temperature,
power, utilisation, clocks...) are marked ``~`` and differ harmlessly; any
other difference is a misreading by one of the two readers.

    python bench/nvml_vs_smi.py                  # runs nvidia-smi -q -x itself
    python bench/nvml_vs_smi.py --capture F.xml  # a capture taken just before
    python bench/nvml_vs_smi.py --capture F.xml --simulate   # no GPU: NVML from F

Exit status: 0 when the stable fields agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vetd.plugins.gpu_health.capture import parse_capture
from vetd.plugins.gpu_health.model import GpuSnapshot
from vetd.plugins.gpu_health.nvml import NvmlSource

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
        mark = "~" if field in MOVING or rounded else "!"
        if a is None or b is None:
            lines.append(f"  {mark} {field}: only {'nvidia-smi' if a is None else 'NVML'} reports it ({a if b is None else b!r})")
        else:
            lines.append(f"  {mark} {field}: NVML {a!r} / nvidia-smi {b!r}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture", type=Path, help="nvidia-smi -q -x output (default: run nvidia-smi now)")
    parser.add_argument("--simulate", action="store_true",
                        help="NVML answers from the capture through the simulated library (tries this script "
                        "without a GPU)")
    args = parser.parse_args()
    if args.simulate:
        if not args.capture:
            parser.error("--simulate needs --capture")
        from vetd.plugins.gpu_health.nvmlsim import SimulatedNvml, install
        from vetd.plugins.gpu_health.replay import CaptureSource

        install(SimulatedNvml.of(CaptureSource(str(args.capture))))
    xml = args.capture.read_bytes() if args.capture else subprocess.run(
        ["nvidia-smi", "-q", "-x"], check=True, capture_output=True).stdout
    smi = parse_capture(xml, "nvidia-smi")
    nvml = NvmlSource(process_names=False).snapshot()
    print(f"driver: NVML {nvml.driver_version} / nvidia-smi {smi.driver_version}; "
          f"CUDA: NVML {nvml.cuda_version} / nvidia-smi {smi.cuda_version}")
    stable_differences = int(nvml.driver_version != smi.driver_version)
    by_bus = {gpu.pci_bus_id.lower(): gpu for gpu in smi.gpus}
    for gpu in nvml.gpus:
        other = by_bus.get(gpu.pci_bus_id.lower())
        if other is None:
            print(f"{gpu.entity} {gpu.pci_bus_id}: not in the nvidia-smi capture")
            stable_differences += 1
            continue
        lines = compare(gpu, other)
        stable_differences += sum(line.startswith("  !") for line in lines)
        print(f"{gpu.entity} {gpu.pci_bus_id} {gpu.name}: {'differs' if lines else 'agrees'}")
        for line in lines:
            print(line)
    print(f"{stable_differences} difference(s) in fields that should not move")
    return 0 if stable_differences == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
