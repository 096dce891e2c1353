"""Driver deadlines, scenarios and the kernel-log XID reader."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from tests.support.procs import run_vetd
from tests.support.wait import wait_for
from vetd.agent.checks import SourceUnavailable
from vetd.plugins.gpu_health.model import DriverEvent, NodeSnapshot
from vetd.plugins.gpu_health.replay import ScenarioSource
from vetd.plugins.gpu_health.sources import DriverUnresponsive, Guard, nvidia_gpus_in_sysfs
from vetd.plugins.gpu_health.xid import Deduper, follow_kmsg, normalize_pci, parse_line, parse_xid


def test_guard_times_out_shares_in_flight_queries_and_fails_fast_while_stuck() -> None:
    release, calls = threading.Event(), []

    def take() -> NodeSnapshot:
        calls.append(1)
        release.wait()
        return NodeSnapshot(source="t", taken=0.0)

    guard = Guard(take, timeout=0.2)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            guard.snapshot()
        except DriverUnresponsive as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(errors) == 3 and time.monotonic() - started < 2
    started = time.monotonic()
    with pytest.raises(DriverUnresponsive, match="has not returned"):
        guard.snapshot()
    assert time.monotonic() - started < 0.1  # stuck: no new thread, no waiting
    assert len(calls) == 1
    release.set()
    wait_for(lambda: _answers(guard), 5, "the driver to answer again")
    assert len(calls) == 2


def _answers(guard: Guard) -> bool:
    try:
        guard.snapshot()
    except DriverUnresponsive:
        return False
    return True


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return str(path)


def test_scenario_timeline(tmp_path: Path) -> None:
    path = write(tmp_path, """
gpus: 4
base: {temp_c: 33}
timeline:
  - {at: 1s, gpu: 1, set: {ecc_volatile_dram_uncorrectable: 1}}
  - {at: 2s, gpu: 2, vanish: true}
  - {at: 3s, gpu: 0, nvlink_down: [4]}
""")
    assert [g.temp_c for g in ScenarioSource(path, at=0).snapshot().gpus] == [33.0] * 4
    later = ScenarioSource(path, at=2.5).snapshot()
    assert [g.index for g in later.gpus] == [0, 1, 3]
    assert later.gpus[1].volatile_uncorrectable == 1
    end = ScenarioSource(path, at=10).snapshot()
    assert [link.up for link in end.gpus[0].nvlinks or []].count(False) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("timeline:\n  - {at: 1s, gpu: 0, set: {temprature: 3}}\n", r"timeline\[0\]\.set: unknown GPU field\(s\) temprature"),
        ("timeline:\n  - {at: soon, gpu: 0}\n", "expected a duration"),
        ("timeline:\n  - {at: 1s, xid: 79}\n", "`gpu` is required"),
        ("timeline:\n  - {at: 1s, gpu: 0, event: poison}\n",
         r"timeline\[0\]\.event: unknown GPU event 'poison' \(known: gpu_unavailable, fatal_poison"),
        ("gpus: [\n", "invalid YAML"),
        ("timeline:\n  - {at: 1s, gpu: 0, nvml_error: {nvmlDeviceGetName: OOPS}}\n",
         r"timeline\[0\]\.nvml_error: unknown NVML error\(s\) OOPS \(known: INVALID_ARGUMENT"),
    ],
)
def test_bad_scenarios_say_why(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SourceUnavailable, match=message):
        ScenarioSource(write(tmp_path, text))


def test_a_hung_driver_is_driver_unresponsive_not_a_stuck_check(tmp_path: Path) -> None:
    scenario = write(tmp_path, "gpus: 2\ntimeline:\n  - {at: 0s, hang: true}\n")
    config = tmp_path / "agent.toml"
    config.write_text('[plugins.gpu_health]\ndriver_timeout = "300ms"\n')
    started = time.monotonic()
    done = run_vetd("check", "--config", str(config), "gpu_health", "gpu_idle", "host_memory",
                    "--scenario", scenario, "--json")
    assert time.monotonic() - started < 10
    results = {(r["check"], r["entity"]): r for r in map(json.loads, done.stdout.splitlines())}
    assert results[("gpu_health", "node")]["codes"] == ["driver_unresponsive"]
    assert results[("gpu_idle", "node")]["codes"] == ["driver_unresponsive"]
    assert results[("host_memory", "node")]["status"] in ("pass", "warn")
    assert done.returncode == 1


def test_no_gpu_here_is_a_skip_not_an_error() -> None:
    if nvidia_gpus_in_sysfs() > 0:
        pytest.skip("this machine has NVIDIA GPUs")
    done = run_vetd("check", "gpu_health", "--json")
    result = json.loads(done.stdout)
    assert (result["status"], result["codes"]) == ("skip", ["not_applicable"])
    assert "no NVIDIA GPU" in result["message"] and done.returncode == 0


def test_sysfs_count_sees_gpus_not_nvswitches(tmp_path: Path) -> None:
    for name, vendor, klass in [("0000:18:00.0", "0x10de", "0x030200"), ("0000:19:00.0", "0x10de", "0x030000"),
                                ("0000:20:00.0", "0x10de", "0x068000"), ("0000:21:00.0", "0x8086", "0x030000")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text(vendor + "\n")
        (tmp_path / name / "class").write_text(klass + "\n")
    assert nvidia_gpus_in_sysfs(tmp_path) == 2


def test_sysfs_count_leaves_out_gpus_passed_to_vms(tmp_path: Path) -> None:
    """A GPU bound to vfio-pci belongs to a VM: the host's driver will never see it."""
    for name, driver in [("0000:18:00.0", "nvidia"), ("0000:19:00.0", "vfio-pci"), ("0000:1a:00.0", None)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text("0x10de\n")
        (tmp_path / name / "class").write_text("0x030200\n")
        if driver:
            (tmp_path / "drivers" / driver).mkdir(parents=True, exist_ok=True)  # /sys/bus/pci/drivers/NAME
            (tmp_path / name / "driver").symlink_to(tmp_path / "drivers" / driver)
    assert nvidia_gpus_in_sysfs(tmp_path) == 2  # bound to nvidia, and not bound yet


def test_xid_lines_from_real_driver_formats() -> None:
    assert parse_xid("NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.") == (
        "0000:3b:00", 79, "pid=1234, name=python, GPU has fallen off the bus.")
    assert parse_xid("[  120.1] NVRM: Xid (PCI:0000:1A:00): 48, pid='<unknown>', DBE (Double Bit Error)")[1] == 48
    assert parse_xid("NVRM: loading NVIDIA UNIX x86_64 Kernel Module") is None
    assert normalize_pci("00000000:3B:00.0") == normalize_pci("0000:3b:00") == "0000:3b:00"


def test_dedupe_across_sources() -> None:
    dedupe = Deduper(window=5)
    assert dedupe.first(DriverEvent("00000000:3B:00.0", "xid", 79), now=100.0)
    assert not dedupe.first(DriverEvent("0000:3b:00", "xid", 79, "from kmsg"), now=101.0)  # the kernel log's copy
    assert dedupe.first(DriverEvent("0000:3b:00", "xid", 48), now=101.0)
    assert dedupe.first(DriverEvent("0000:3b:00", "fatal_poison", 79), now=101.0)  # not an XID
    assert dedupe.first(DriverEvent("0000:3b:00", "xid", 79), now=110.0)  # a new occurrence
    assert dedupe.duplicates == 1


def test_kernel_log_reader_on_a_pipe_of_kmsg_records(tmp_path: Path) -> None:
    fifo = tmp_path / "kmsg"
    os.mkfifo(fifo)
    seen: list[DriverEvent] = []
    stop = threading.Event()
    reader = threading.Thread(target=follow_kmsg, args=(seen.append, stop, str(fifo), 2.0))
    reader.start()
    now_us = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
    with Path(fifo).open("w") as writer:
        # older than the 2 s look-back: an XID from before the agent started
        writer.write(f"4,900,{now_us - 5_000_000},-;NVRM: Xid (PCI:0000:18:00): 31, old one\n")
        writer.write(f"6,901,{now_us},-;nvidia-modeset: Loading\n")
        writer.write(f"4,902,{now_us},-;NVRM: Xid (PCI:0000:18:00): 79, pid=1, GPU has fallen off the bus.\n")
        writer.flush()
        wait_for(lambda: seen, 5, "an XID from the pipe")
    stop.set()
    reader.join(5)
    assert seen == [DriverEvent("0000:18:00", "xid", 79, "pid=1, GPU has fallen off the bus.")]


def test_kernel_log_reader_reports_fallen_off_the_bus_and_sxids(tmp_path: Path) -> None:
    fifo = tmp_path / "kmsg"
    os.mkfifo(fifo)
    seen: list[DriverEvent] = []
    stop = threading.Event()
    reader = threading.Thread(target=follow_kmsg, args=(seen.append, stop, str(fifo), 60.0))
    reader.start()
    now_us = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
    with Path(fifo).open("w") as writer:
        for text in ["NVRM: GPU at PCI:0000:29:00: GPU-0b11d014-1685-04bd-26ed-5fc0bc1c44ae",
                     "NVRM: GPU 0000:29:00.0: GPU has fallen off the bus.",
                     "nvidia-nvswitch0: SXid (PCI:0000:05:00.0): 20034, Fatal, Link 30 LTSSM Fault Up",
                     "nvidia-nvswitch0: SXid (PCI:0000:05:00.0): 20034, Severity 1 Engine instance 30 Sub-engine"]:
            writer.write(f"4,1,{now_us},-;{text}\n")
        writer.flush()
        wait_for(lambda: len(seen) >= 2, 5, "two events from the pipe")
    stop.set()
    reader.join(5)
    assert seen == [DriverEvent("0000:29:00", "xid", 79, "GPU has fallen off the bus"),
                    DriverEvent("0000:05:00", "sxid", 20034, "Fatal, Link 30 LTSSM Fault Up", device="nvswitch0")]


def test_nvml_and_kmsg_reports_of_one_fault_still_merge() -> None:
    dedupe = Deduper(window=5)
    assert dedupe.first(DriverEvent("00000000:29:00.0", "xid", 79, "reported by NVML"), now=10.0)
    fallen = parse_line("NVRM: GPU 0000:29:00.0: GPU has fallen off the bus.")
    xid = parse_line("NVRM: Xid (0000:29:00): 79, pid=1, GPU has fallen off the bus.")
    assert fallen is not None and xid is not None
    assert not dedupe.first(fallen.event, now=10.5) and not dedupe.first(xid.event, now=10.6)
