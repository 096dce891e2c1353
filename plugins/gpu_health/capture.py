"""Parse ``nvidia-smi -q -x`` captures (DTD v10 to v13) into snapshots.

What differs between versions and is handled here:

* clock reasons are ``clocks_throttle_reason_*`` up to v11 and
  ``clocks_event_reason_*`` from v12;
* ECC counts are ``single_bit``/``double_bit`` per location in old dumps,
  ``sram_*``/``dram_*`` later, with v13 splitting SRAM uncorrectable into
  ``_parity`` and ``_secded``;
* power is ``power_readings/power_draw`` (v11), ``gpu_power_readings/power_draw``
  (v12) or ``instant_power_draw`` (v13);
* values carry units in the text (``27 C``, ``67.03 W``, ``16x``, ``65 %``)
  and unsupported ones read ``N/A``, ``Not Supported`` or "Requested
  functionality has been deprecated": all of those become ``None``.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from vetd.plugins.gpu_health.model import (
    CLOCK_REASONS,
    GpuProcess,
    GpuSnapshot,
    NodeSnapshot,
    tlimit_threshold,
)

_MISSING = {"", "n/a", "[n/a]", "not supported", "[not supported]", "unknown error", "none",
            "requested functionality has been deprecated", "insufficient permissions"}
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:[A-Za-z%/]+)?\s*$")


class CaptureError(ValueError):
    """A file that is not a usable ``nvidia-smi -q -x`` capture."""


def _text(node: ET.Element | None, path: str) -> str | None:
    if node is None:
        return None
    found = node.find(path)
    if found is None or found.text is None:
        return None
    value = found.text.strip()
    return None if value.lower() in _MISSING else value


def _num(node: ET.Element | None, path: str) -> float | None:
    value = _text(node, path)
    if value is None:
        return None
    match = _NUMBER.match(value)
    return float(match.group(1)) if match else None


def _int(node: ET.Element | None, path: str) -> int | None:
    value = _num(node, path)
    return None if value is None else int(value)


def _flag(node: ET.Element | None, path: str) -> bool | None:
    value = _text(node, path)
    if value is None:
        return None
    lowered = value.lower()
    if lowered in ("yes", "enabled", "active", "true"):
        return True
    if lowered in ("no", "disabled", "not active", "false"):
        return False
    return None


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _sum(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _ecc(gpu: ET.Element, scope: str) -> dict[str, int | None]:
    base = f"ecc_errors/{scope}"
    sram_unc = _int(gpu, f"{base}/sram_uncorrectable")
    if sram_unc is None:
        sram_unc = _sum(_int(gpu, f"{base}/sram_uncorrectable_parity"),
                        _int(gpu, f"{base}/sram_uncorrectable_secded"))
    counts = {
        "sram_correctable": _int(gpu, f"{base}/sram_correctable"),
        "sram_uncorrectable": sram_unc,
        "dram_correctable": _int(gpu, f"{base}/dram_correctable"),
        "dram_uncorrectable": _int(gpu, f"{base}/dram_uncorrectable"),
    }
    if all(v is None for v in counts.values()):
        # Pre-v11 layout: single_bit/double_bit per location; device_memory is DRAM.
        for kind, bit in (("correctable", "single_bit"), ("uncorrectable", "double_bit")):
            section = gpu.find(f"{base}/{bit}")
            if section is None:
                continue
            counts[f"dram_{kind}"] = _int(section, "device_memory")
            sram = [_int(section, child.tag) for child in section
                    if child.tag not in ("device_memory", "total", "dram")]
            counts[f"sram_{kind}"] = _sum(*sram)
    return counts


def _recovery(gpu: ET.Element) -> str | None:
    """``None`` here is the driver's word for "no action needed", not a missing value."""
    raw = gpu.findtext("gpu_recovery_action")
    if raw is not None and raw.strip().lower() == "none":
        return "None"
    return _text(gpu, "gpu_recovery_action")


def _threshold(gpu: ET.Element, classic: str, tlimit: str) -> float | None:
    """A temperature threshold in °C. nvidia-smi 580 prints Hopper's relative to
    T.Limit instead (``gpu_temp_tlimit``: how far below T.Limit the GPU is now;
    ``gpu_temp_slow_tlimit_threshold``: -2 C, slowdown 2 °C past T.Limit): in °C
    that is now + margin - threshold, which is what the driver answered on an
    H200 (37 + 50 + 2 = 89 °C slowdown, 95 °C shutdown)."""
    value = _num(gpu, f"temperature/{classic}")
    if value is not None:
        return value
    return tlimit_threshold(_num(gpu, "temperature/gpu_temp"), _num(gpu, "temperature/gpu_temp_tlimit"),
                            _num(gpu, f"temperature/{tlimit}"))


def _mig(gpu: ET.Element) -> bool | None:
    return _flag(gpu, "mig_mode/current_mig")


def _clock_reasons(gpu: ET.Element) -> list[str] | None:
    for group, prefix in (("clocks_event_reasons", "clocks_event_reason_"),
                          ("clocks_throttle_reasons", "clocks_throttle_reason_")):
        section = gpu.find(group)
        if section is None:
            continue
        active = [name for name in CLOCK_REASONS if _flag(section, prefix + name)]
        known = any(_flag(section, prefix + name) is not None for name in CLOCK_REASONS)
        return active if known else None
    return None


def _processes(gpu: ET.Element) -> list[GpuProcess] | None:
    section = gpu.find("processes")
    if section is None:
        return None
    processes = []
    for info in section.findall("process_info"):
        pid = _int(info, "pid")
        if pid is None:
            continue
        processes.append(GpuProcess(pid=pid, name=_text(info, "process_name") or "",
                                    type=_text(info, "type") or "C",
                                    used_memory_mib=_num(info, "used_memory")))
    return processes


def _gpu(index: int, gpu: ET.Element) -> GpuSnapshot:
    volatile, aggregate = _ecc(gpu, "volatile"), _ecc(gpu, "aggregate")
    remapped = gpu.find("remapped_rows")
    has_remap = remapped is not None and len(remapped) > 0
    link = "pci/pci_gpu_link_info"
    return GpuSnapshot(
        index=index,
        uuid=_text(gpu, "uuid") or "",
        pci_bus_id=_text(gpu, "pci/pci_bus_id") or gpu.get("id") or "",
        name=_text(gpu, "product_name") or "",
        serial=_text(gpu, "serial"),
        vbios=_text(gpu, "vbios_version"),
        ecc_enabled=_flag(gpu, "ecc_mode/current_ecc"),
        ecc_volatile_sram_correctable=volatile["sram_correctable"],
        ecc_volatile_sram_uncorrectable=volatile["sram_uncorrectable"],
        ecc_volatile_dram_correctable=volatile["dram_correctable"],
        ecc_volatile_dram_uncorrectable=volatile["dram_uncorrectable"],
        ecc_aggregate_sram_correctable=aggregate["sram_correctable"],
        ecc_aggregate_sram_uncorrectable=aggregate["sram_uncorrectable"],
        ecc_aggregate_dram_correctable=aggregate["dram_correctable"],
        ecc_aggregate_dram_uncorrectable=aggregate["dram_uncorrectable"],
        retired_pages_sbe=_int(gpu, "retired_pages/multiple_single_bit_retirement/retired_count"),
        retired_pages_dbe=_int(gpu, "retired_pages/double_bit_retirement/retired_count"),
        retired_pages_pending=_flag(gpu, "retired_pages/pending_retirement"),
        remapped_rows_correctable=_int(remapped, "remapped_row_corr") if has_remap else None,
        remapped_rows_uncorrectable=_int(remapped, "remapped_row_unc") if has_remap else None,
        remapped_rows_pending=_flag(remapped, "remapped_row_pending") if has_remap else None,
        remapped_rows_failure=_flag(remapped, "remapped_row_failure") if has_remap else None,
        reset_required=_flag(gpu, "gpu_reset_status/reset_required"),
        drain_and_reset_recommended=_flag(gpu, "gpu_reset_status/drain_and_reset_recommended"),
        recovery_action=_recovery(gpu),
        clock_reasons=_clock_reasons(gpu),
        clock_sm_mhz=_num(gpu, "clocks/sm_clock"),
        clock_memory_mhz=_num(gpu, "clocks/mem_clock"),
        clock_sm_max_mhz=_num(gpu, "max_clocks/sm_clock"),
        pcie_gen=_int(gpu, f"{link}/pcie_gen/current_link_gen"),
        pcie_gen_max=_int(gpu, f"{link}/pcie_gen/max_link_gen"),
        pcie_width=_int(gpu, f"{link}/link_widths/current_link_width"),
        pcie_width_max=_int(gpu, f"{link}/link_widths/max_link_width"),
        pcie_replay_counter=_int(gpu, "pci/replay_counter"),
        nvlinks=None,  # nvidia-smi -q -x does not report NVLink counters
        temp_c=_num(gpu, "temperature/gpu_temp"),
        temp_memory_c=_num(gpu, "temperature/memory_temp"),
        mig_enabled=_mig(gpu),
        temp_slowdown_c=_threshold(gpu, "gpu_temp_slow_threshold", "gpu_temp_slow_tlimit_threshold"),
        temp_shutdown_c=_threshold(gpu, "gpu_temp_max_threshold", "gpu_temp_max_tlimit_threshold"),
        power_w=_first(_num(gpu, "gpu_power_readings/power_draw"),
                       _num(gpu, "gpu_power_readings/instant_power_draw"),
                       _num(gpu, "gpu_power_readings/average_power_draw"),
                       _num(gpu, "power_readings/power_draw")),
        power_limit_w=_first(_num(gpu, "gpu_power_readings/current_power_limit"),
                             _num(gpu, "power_readings/enforced_power_limit"),
                             _num(gpu, "power_readings/power_limit")),
        memory_used_mib=_num(gpu, "fb_memory_usage/used"),
        memory_total_mib=_num(gpu, "fb_memory_usage/total"),
        memory_reserved_mib=_num(gpu, "fb_memory_usage/reserved"),
        utilization_pct=_num(gpu, "utilization/gpu_util"),
        persistence_mode=_flag(gpu, "persistence_mode"),
        processes=_processes(gpu),
    )


def _timestamp(text: str | None) -> float:
    if text:
        try:
            return time.mktime(time.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y"))
        except ValueError:
            pass
    return time.time()


def parse_capture(data: bytes | str, source: str = "capture") -> NodeSnapshot:
    """Parse the XML text of ``nvidia-smi -q -x``."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise CaptureError(f"{source}: not XML: {exc}") from exc
    if root.tag != "nvidia_smi_log":
        raise CaptureError(f"{source}: root element is <{root.tag}>, not <nvidia_smi_log> "
                           "(is this `nvidia-smi -q -x` output?)")
    gpus = [_gpu(index, gpu) for index, gpu in enumerate(root.findall("gpu"))]
    return NodeSnapshot(
        source=source,
        taken=_timestamp(_text(root, "timestamp")),
        gpus=gpus,
        driver_version=_text(root, "driver_version"),
        cuda_version=_text(root, "cuda_version"),
        attached_gpus=_int(root, "attached_gpus"),
    )


def load_capture(path: Path | str) -> NodeSnapshot:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CaptureError(f"{path}: cannot read capture: {exc.strerror or exc}") from exc
    return parse_capture(data, f"capture:{path}")
