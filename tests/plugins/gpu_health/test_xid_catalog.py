"""NVIDIA's XID catalog as data, the severity vetd derives from it and sites' overrides."""

from __future__ import annotations

import msgspec
import pytest

from vetd.plugins.gpu_health.catalog import (
    EXCEPTIONS,
    RESOLUTION_SEVERITY,
    burst_window,
    catalog,
    classify,
    classify_sxid,
)
from vetd.plugins.gpu_health.config import GpuHealthConfig


def test_the_catalog_has_every_row_nvidia_lists() -> None:
    rows = catalog()
    assert sorted(rows) == list(range(1, 173))
    assert rows[79].mnemonic == "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS" and rows[79].resolution == "RESTART_BM"
    assert rows[48].resolution == "WORKFLOW_XID_48" and rows[74].applies == (True, True, False, False)
    assert rows[1].unused and not rows[8].unused
    # every resolution the catalog uses has a severity (an empty one is "unknown")
    assert {row.resolution for row in rows.values()} - {""} - {"XID_154"} <= set(RESOLUTION_SEVERITY)


@pytest.mark.parametrize(("xid", "severity", "resolution"), [
    (79, "critical", "RESTART_BM"),
    (48, "critical", "WORKFLOW_XID_48"),
    (74, "critical", "WORKFLOW_NVLINK_ERR"),
    # reset or reboot per NVIDIA: the ones vetd used to only alert on or pass
    *((xid, "critical", "RESET_GPU") for xid in (46, 62, 64, 95, 109, 110, 119, 120, 136, 140, 143, 155, 156, 158)),
    # usually the application's fault: alert, never drain
    (13, "warning", "RESTART_APP"), (31, "warning", "RESTART_APP"), (94, "warning", "RESTART_APP"),
    (45, "warning", "WORKFLOW_XID_45"),
    # NVIDIA: no action needed; new work can start after a row remap
    (43, "info", "IGNORE"), (63, "info", "IGNORE"),
    # vetd's exceptions: info raised to warning
    (92, "warning", "IGNORE"), (121, "warning", "IGNORE"),
    # deprecated (V100 and earlier) and not-yet-bucketed codes: unknown
    (56, "warning", "CONTACT_SUPPORT"), (167, "warning", "UNKNOWN"),
])
def test_severity_follows_the_resolution(xid: int, severity: str, resolution: str) -> None:
    verdict = classify(xid)
    assert (verdict.severity, verdict.resolution) == (severity, resolution)


def test_an_unknown_xid_is_a_warning_not_info() -> None:
    assert classify(999) == ("warning", "UNKNOWN", "", "not in NVIDIA's XID catalog")
    assert GpuHealthConfig().xid_verdict(999).severity == "warning"


def test_xid_154_takes_the_recovery_action_in_its_line() -> None:
    line = "GPU recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)"
    assert classify(154, line)[:2] == ("critical", "RESTART_BM")
    assert classify(154, "GPU recovery action changed from 0x2 (Node Reboot Required) to 0x0 (None)")[:2] == (
        "info", "IGNORE")
    assert classify(154, "")[:2] == ("warning", "XID_154")


def test_nvlink5_xids_read_fatal_or_nonfatal_from_the_line() -> None:
    fatal = "NETIR_LINK_EVT Fatal XC0 i0 Link 00 (0x025001c6 0x00000000 0x00000000 0x00000000 0x00000000 0x00000000)"
    nonfatal = "SAW_MVB Nonfatal XC0 i0 Link 0 (0x00000001 0x00000008 0x00000000 0x00000000 0x00000000 0x00000000)"
    assert classify(149, fatal).severity == "critical"
    assert classify(144, nonfatal).severity == "warning"


def test_sxid_severity_is_in_the_line() -> None:
    assert classify_sxid("Fatal, Link 30 LTSSM Fault Up")[:2] == ("critical", "FATAL")
    assert classify_sxid("Non-fatal, Link 45 egress non-posted PRIV error")[:2] == ("warning", "NON_FATAL")
    assert classify_sxid("")[:2] == ("warning", "UNKNOWN")


def test_sites_override_per_xid_and_old_lists_still_work() -> None:
    config = msgspec.convert({"xid_severity": {"13": "critical", "79": "warning"}, "xid_warning": [48],
                              "xid_critical": [13, 43], "sxid_severity": {"12028": "info"}}, GpuHealthConfig)
    assert config.xid_verdict(13).severity == "critical"
    assert config.xid_verdict(79).severity == "warning"  # a site's choice, even against the catalog
    assert config.xid_verdict(48).severity == "warning"  # the older list form
    assert config.xid_verdict(43).severity == "critical"
    assert config.xid_verdict(31).severity == "warning"  # the catalog's
    assert config.sxid_verdict(12028, "Non-fatal, Link 45").severity == "info"
    with pytest.raises(msgspec.ValidationError, match="xid_severity"):
        msgspec.convert({"xid_severity": {"xid13": "critical"}}, GpuHealthConfig)
    with pytest.raises(msgspec.ValidationError, match="xid_severity"):
        msgspec.convert({"xid_severity": {"13": "fatal"}}, GpuHealthConfig)


def test_exceptions_only_raise_to_warning_and_say_why() -> None:
    assert all(severity == "warning" and why for severity, why in EXCEPTIONS.values())


def test_burst_windows_per_class() -> None:
    assert burst_window(13) == 180 and burst_window(79) == burst_window(119) == 3 * 3600
