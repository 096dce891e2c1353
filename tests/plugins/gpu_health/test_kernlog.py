"""Kernel-log formats (tests/data/kmsg/) and ``vetd xid`` run as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import run_vetd, vetd_argv, vetd_env
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.gpu_health.kernlog import bursts, decode, split_stamp
from vetd.plugins.gpu_health.model import DriverEvent
from vetd.plugins.gpu_health.xid import parse_line

KMSG = Path(__file__).resolve().parents[2] / "data" / "kmsg"


def lines_of(name: str) -> list[str]:
    return (KMSG / name).read_text().splitlines()


def events_in(name: str) -> list[tuple[str, DriverEvent]]:
    found = []
    for line in lines_of(name):
        parsed = parse_line(split_stamp(line)[2])
        if parsed is not None:
            found.append((parsed.form, parsed.event))
    return found


def test_xid_with_and_without_pci_prefix() -> None:
    (_, old), *_ = events_in("dmesg-T.log")
    assert old == DriverEvent("0000:03:00", "xid", 14, "Channel 00000001")
    assert parse_line("NVRM: Xid (PCI:0000:3B:00): 48, pid='<unknown>', DBE").event.pci == "0000:3b:00"


def test_fallen_off_the_bus_is_xid_79_for_that_gpu_in_every_form() -> None:
    fallen = [(form, event) for form, event in events_in("dmesg.log") if event.value == 79]
    assert [form for form, _ in fallen] == ["xid", "fallen_off_bus"]
    assert {event.pci for _, event in fallen} == {"0000:29:00"}
    older = [event for form, event in events_in("kmsg-records.txt") if form == "fallen_off_bus"]
    assert older and all(event == DriverEvent("0000:01:00", "xid", 79, "GPU has fallen off the bus")
                         for event in older)
    # the header naming the GPU is not itself an event
    assert parse_line("NVRM: GPU at PCI:0000:29:00: GPU-0b11d014-1685-04bd-26ed-5fc0bc1c44ae") is None


def test_sxid_lines_once_per_report_with_their_switch() -> None:
    sxids = [event for form, event in events_in("nvswitch-sxid.log") if form == "sxid"]
    assert [(e.device, e.pci, e.value) for e in sxids] == [
        ("nvswitch3", "0000:04:00", 22013), ("nvswitch1", "0000:84:00", 12028), ("nvswitch0", "0000:05:00", 20034)]
    assert sxids[2].detail.startswith("Fatal, Link 30")


@pytest.mark.parametrize(("line", "seconds", "rest"), [
    ("[ 3605.442871] NVRM: x", 3605.442871, "NVRM: x"),
    ("4,1879,7201337022,-;NVRM: x", 7201.337022, "NVRM: x"),
    ("[Fri Dec  4 09:58:03 2026] NVRM: x", None, "NVRM: x"),
    ("kern  :err   : 2026-12-04T09:14:27,551309+00:00 nvidia-nvswitch1: x", 1796375667.551309, "nvidia-nvswitch1: x"),
    ("2026-12-04T10:00:00+0000 nid007 kernel: NVRM: x", 1796378400.0, "nid007 kernel: NVRM: x"),
    ("Dec 04 11:20:01 nid042 kernel: NVRM: x", None, "nid042 kernel: NVRM: x"),
    ("NVRM: x", None, "NVRM: x"),
])
def test_timestamps_of_each_log_format(line: str, seconds: float | None, rest: str) -> None:
    when, stamp, text = split_stamp(line)
    assert text == rest
    if seconds is not None:
        assert when == pytest.approx(seconds)
    assert (when is None) == (stamp == "") == (line == rest)


def test_bursts_per_gpu_and_xid_with_windows_per_class() -> None:
    findings, _, _ = decode(lines_of("bursts.log"), GpuHealthConfig())
    got = [(b.first.gpu, b.first.code, len(b.findings)) for b in bursts(findings)]
    # XID 13: 2.5 min gaps are one burst, a 4 min gap starts another; another GPU is its own.
    # XID 74: 2.5 h apart is one burst (3 h window), 3 h 20 min later a new one.
    assert got == [("0000:18:00", 13, 3), ("0000:18:00", 13, 1), ("0000:2a:00", 13, 1),
                   ("0000:18:00", 74, 2), ("0000:18:00", 74, 1)]


def xid_json(*args: str, stdin: str | None = None) -> tuple[int, list[dict[str, object]], str]:
    done = subprocess.run(vetd_argv("xid", "--json", *args), env=vetd_env(), input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def test_vetd_xid_json_has_the_keys_checks_rely_on() -> None:
    code, found, _ = xid_json(str(KMSG / "dmesg.log"))
    assert code == 1  # a critical finding
    assert all({"gpu", "severity", "resolution", "message"} <= set(f) and ("xid" in f or "sxid" in f)
               for f in found)
    by_xid = {f["xid"]: f for f in found}
    fallen = by_xid[79]  # one fault, though the driver logged it twice
    assert (fallen["gpu"], fallen["severity"], fallen["resolution"], fallen["action"], fallen["count"]) == (
        "0000:29:00", "critical", "RESTART_BM", "drain", 1)
    assert fallen["uuid"] == "GPU-0b11d014-1685-04bd-26ed-5fc0bc1c44ae" and fallen["serial"] == "1652823054567"
    assert "fallen off the bus" in str(fallen["message"])
    assert (by_xid[13]["severity"], by_xid[13]["action"], by_xid[13]["count"]) == ("warning", "alert", 2)
    assert (by_xid[63]["severity"], by_xid[63]["action"]) == ("info", "none")
    assert by_xid[154]["resolution"] == "RESET_GPU"


def test_vetd_xid_reads_stdin_and_unknown_xids_are_warnings() -> None:
    code, found, _ = xid_json("-", stdin=(KMSG / "journalctl-k.log").read_text())
    assert {f["xid"]: f["severity"] for f in found} == {149: "critical", 154: "critical", 144: "warning",
                                                       121: "warning", 185: "warning"}
    assert code == 1


def test_vetd_xid_sxids_fatal_is_critical() -> None:
    _, found, _ = xid_json(str(KMSG / "nvswitch-sxid.log"))
    assert [(f["sxid"], f["device"], f["severity"]) for f in found] == [
        (22013, "nvswitch3", "warning"), (12028, "nvswitch1", "warning"), (20034, "nvswitch0", "critical")]


def test_vetd_xid_site_overrides_from_the_agent_config(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[plugins.gpu_health]\nxid_severity = {"119" = "warning", "43" = "critical"}\n')
    code, found, _ = xid_json("--config", str(config), str(KMSG / "dmesg-T.log"))
    assert {f["xid"]: f["severity"] for f in found} == {14: "info", 43: "critical", 119: "warning"}
    assert code == 1
    config.write_text('[plugins.gpu_health]\nxid_severity = {"119" = "fatal"}\n')
    done = run_vetd("xid", "--config", str(config), str(KMSG / "dmesg-T.log"))
    assert done.returncode == 2 and "xid_severity" in done.stderr and "Traceback" not in done.stderr


def test_vetd_xid_table_and_exit_codes(tmp_path: Path) -> None:
    done = run_vetd("xid", str(KMSG / "bursts.log"))
    assert done.returncode == 1, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:8] == ["GPU", "XID", "SEVERITY", "VETD", "RESOLUTION", "COUNT", "FIRST", "LAST"]
    assert rows[0].split()[:8] == ["0000:18:00", "13", "warning", "alert", "RESTART_APP", "3",
                                   "2026-12-04T10:00:00+0000", "2026-12-04T10:05:00+0000"]
    clean = run_vetd("xid", str(KMSG / "no-gpu-faults.log"))
    assert clean.returncode == 0 and clean.stdout.startswith("no XID, SXid or fallen-off-the-bus line")
    missing = run_vetd("xid", str(tmp_path / "nope.log"))
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [f"vetd xid: cannot read {tmp_path / 'nope.log'}: "
                                                   "No such file or directory"]
