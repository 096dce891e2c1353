"""NVIDIA's XID catalog (``xid_catalog.csv``) and the severity vetd gives each XID and SXid.

The catalog is NVIDIA's data, shipped as it is; the policy is here, in two
tables a reader can check against the plugin README: :data:`RESOLUTION_SEVERITY`
(NVIDIA's immediate action → severity) and :data:`EXCEPTIONS` (the few XIDs
where vetd departs from it, each with why). Sites override per XID in config
(``xid_severity``), on top of both.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import re
from typing import Literal, NamedTuple

Severity = Literal["info", "warning", "critical"]

CATALOG_FILE = "xid_catalog.csv"
#: What an XID or SXid vetd has no row for, or no resolution for, is published as.
UNKNOWN_SEVERITY: Severity = "warning"
UNKNOWN = "UNKNOWN"

#: NVIDIA's "Resolution Bucket (Immediate Action)" → severity. Critical (the
#: default rules drain): the GPU or node needs a reset, a reboot, hands on the
#: hardware or NVIDIA support before it can be trusted with a job. Warning (an
#: alert, no drain): the application died or must be restarted, or the next
#: step depends on what else happened. Info: NVIDIA says no action is needed.
RESOLUTION_SEVERITY: dict[str, Severity] = {
    "IGNORE": "info",
    "RESTART_APP": "warning",
    "XID_154_EVAL": "warning",  # RESTART_APP unless an XID 154 (its own event) asks for more
    "WORKFLOW_XID_45": "warning",  # follows another XID; solo: restart Fabric Manager
    "CHECK_UVM": "warning",  # a GPU reset only where UVM/vGPU is in use
    "UPDATE_SWFW": "warning",  # a vGPU guest/host driver mismatch, not a broken GPU
    "RESET_GPU": "critical",
    "RESTART_BM": "critical",
    "RESTART_VM": "critical",  # the VM owning the GPU is the node the agent runs in
    "WORKFLOW_XID_48": "critical",  # solo: reset the GPU; with 63/64: drain and reset
    "WORKFLOW_NVLINK_ERR": "critical",  # XID 74: a reset or reboot clears it
    "WORKFLOW_NVLINK5_ERR": "critical",  # XIDs 144-150; a "Nonfatal" line is a warning
    "CHECK_MECHANICALS": "critical",
    "CONTACT_SUPPORT": "critical",
}

#: XIDs whose severity is not their resolution's, and why. All raise ``info``
#: to ``warning``: an alert, never a drain.
EXCEPTIONS: dict[int, tuple[Severity, str]] = {
    92: ("warning", "a high single-bit ECC rate is corrected but precedes failures (the NVML SBE-storm "
                    "event is a warning too)"),
    121: ("warning", "corrected C2C link errors; NVIDIA advises a GPU reset at the next service window"),
    157: ("warning", "no spare resources left to retire into: the same XID may come back"),
}

#: XID 154's target recovery action (the words in its line) → resolution bucket and severity.
RECOVERY_ACTIONS: dict[str, tuple[str, Severity]] = {
    "none": ("IGNORE", "info"),
    "drain p2p": ("DRAIN_P2P", "warning"),
    "drain and reset": ("DRAIN_AND_RESET", "critical"),
    "gpu reset required": ("RESET_GPU", "critical"),
    "node reboot required": ("RESTART_BM", "critical"),
}
_RECOVERY_TO = re.compile(r"\bto\s+0x[0-9a-f]+\s*\(([^)]*)\)", re.IGNORECASE)
_NONFATAL = re.compile(r"\bnon-?fatal\b", re.IGNORECASE)
_FATAL = re.compile(r"\bfatal\b", re.IGNORECASE)

#: Burst grouping (NVSentinel's windows): events of one XID on one GPU at most
#: this far apart are one burst; longer for the XIDs that repeat for hours.
BURST_WINDOW_S = 180.0
LONG_BURST_WINDOW_S = 3 * 3600.0
LONG_BURST_XIDS = frozenset({74, 79, 95, 109, 119})


class XidInfo(NamedTuple):
    """One row of NVIDIA's catalog."""

    code: int
    mnemonic: str
    description: str
    #: A100, H100, B100, GB200: True where the catalog says the XID applies.
    applies: tuple[bool, bool, bool, bool]
    resolution: str
    investigatory: str

    @property
    def unused(self) -> bool:
        """Deprecated (V100 or earlier): the catalog applies it to no current GPU."""
        return self.description.startswith("Unused") and not any(self.applies)

    @property
    def meaning(self) -> str:
        return self.description if not self.unused else f"{self.mnemonic} (unused on A100 and later)"


class Verdict(NamedTuple):
    """What vetd makes of one XID or SXid line."""

    severity: Severity
    #: NVIDIA's resolution bucket (``RESET_GPU``...), ``FATAL``/``NON_FATAL`` for an SXid, or ``UNKNOWN``.
    resolution: str
    mnemonic: str
    meaning: str


@functools.cache
def catalog() -> dict[int, XidInfo]:
    """Every row of ``xid_catalog.csv`` by code (read once)."""
    text = importlib.resources.files(__package__).joinpath(CATALOG_FILE).read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if line and not line.startswith("#"))
    return {
        int(row["code"]): XidInfo(
            code=int(row["code"]), mnemonic=row["mnemonic"], description=row["description"],
            applies=(row["a100"] == "YES", row["h100"] == "YES", row["b100"] == "YES", row["gb200"] == "YES"),
            resolution=row["immediate_action"], investigatory=row["investigatory_action"])
        for row in rows
    }


def classify(xid: int, detail: str = "") -> Verdict:
    """The catalog's verdict on an XID (``detail``: the rest of its kernel-log line), before site overrides."""
    info = catalog().get(xid)
    if info is None:
        return Verdict(UNKNOWN_SEVERITY, UNKNOWN, "", "not in NVIDIA's XID catalog")
    mnemonic = info.mnemonic.split(" / ")[0]
    if info.unused or not info.resolution:
        # No guidance for current GPUs (a deprecated code, or a new one without a bucket yet).
        return Verdict(UNKNOWN_SEVERITY, info.resolution or UNKNOWN, mnemonic, info.meaning)
    if info.resolution == "XID_154":
        target = _RECOVERY_TO.search(detail)
        resolution, severity = RECOVERY_ACTIONS.get(target.group(1).strip().lower() if target else "",
                                                    ("XID_154", UNKNOWN_SEVERITY))
        return Verdict(severity, resolution, mnemonic, info.meaning)
    severity = RESOLUTION_SEVERITY.get(info.resolution, UNKNOWN_SEVERITY)
    if info.resolution == "WORKFLOW_NVLINK5_ERR" and _NONFATAL.search(detail):
        severity = "warning"
    if xid in EXCEPTIONS:
        severity = EXCEPTIONS[xid][0]
    return Verdict(severity, info.resolution, mnemonic, info.meaning)


def classify_sxid(detail: str) -> Verdict:
    """An NVSwitch SXid: its line says whether it is fatal (NVIDIA's SXid documentation); fatal is critical."""
    if _NONFATAL.search(detail):
        return Verdict("warning", "NON_FATAL", "", "non-fatal NVSwitch error")
    if _FATAL.search(detail):
        return Verdict("critical", "FATAL", "", "fatal NVSwitch error")
    return Verdict(UNKNOWN_SEVERITY, UNKNOWN, "", "NVSwitch error")


def burst_window(xid: int) -> float:
    """Seconds within which repeats of ``xid`` on one GPU are one burst."""
    return LONG_BURST_WINDOW_S if xid in LONG_BURST_XIDS else BURST_WINDOW_S


#: What the default rules (packaging/rules/default.yaml) do with an event of each severity.
DEFAULT_ACTION: dict[str, str] = {"critical": "drain", "warning": "alert", "info": "none"}
