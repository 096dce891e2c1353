"""``vetd xid FILE|-``: a kernel log decoded offline, as the agent would judge it.

Reads ``dmesg`` (with or without ``-T`` or ``--time-format iso``),
``journalctl -k`` (short, ``-o short-precise``, ``-o short-iso``), syslog's
``kern.log`` and ``/dev/kmsg`` records. Each XID, "fallen off the bus" and
NVSwitch SXid line becomes a :class:`Finding` with the catalog's verdict and
what the default rules would do; findings of one XID on one GPU are grouped
into bursts (:func:`~vetd.plugins.gpu_health.catalog.burst_window`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vetd.plugins.gpu_health.catalog import DEFAULT_ACTION, Verdict, burst_window
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.gpu_health.xid import GPU_HEADER_LINE, KMSG_RECORD, SERIAL_LINE, normalize_pci, parse_line

EXIT_OK, EXIT_CRITICAL, EXIT_USAGE = 0, 1, 2
#: A fallen-off-the-bus line this close to an XID 79 on the same GPU is that XID, logged twice.
SAME_EVENT_S = 5.0
SAME_EVENT_LINES = 20

_MONOTONIC = re.compile(r"^\[\s*(\d+\.\d+)\]\s?(.*)$")
_CTIME = re.compile(r"^\[(\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4})\]\s?(.*)$")
_ISO = re.compile(r"^(?:\w+\s*:\s*\w+\s*:\s*)?"  # dmesg -x: facility and level
                  r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?)\s+(.*)$")
_SYSLOG = re.compile(r"^(\w{3} [ \d]?\d \d\d:\d\d:\d\d(?:\.\d+)?)\s+(.*)$")


@dataclass
class Finding:
    """One event line of the log."""

    line_no: int
    kind: str  # "xid" or "sxid"
    code: int
    gpu: str
    device: str
    form: str
    detail: str
    verdict: Verdict
    #: Seconds (the kernel's monotonic clock, or Unix time) and the stamp as written; None: none in the line.
    time: float | None
    stamp: str


@dataclass
class Burst:
    """Findings of one XID (or SXid) on one device, each at most the burst window after the one before."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def first(self) -> Finding:
        return self.findings[0]

    def as_dict(self, uuids: dict[str, str], serials: dict[str, str]) -> dict[str, object]:
        first, last = self.findings[0], self.findings[-1]
        found: dict[str, object] = {first.kind: first.code, "gpu": first.gpu}
        if first.device:
            found["device"] = first.device
        if first.gpu in uuids:
            found["uuid"] = uuids[first.gpu]
        if first.gpu in serials:
            found["serial"] = serials[first.gpu]
        meaning = first.verdict.meaning
        found.update(severity=first.verdict.severity, resolution=first.verdict.resolution,
                     mnemonic=first.verdict.mnemonic,
                     message=f"{meaning}: {first.detail}" if first.detail else meaning,
                     action=DEFAULT_ACTION[first.verdict.severity], count=len(self.findings),
                     first=first.stamp, last=last.stamp, lines=[f.line_no for f in self.findings])
        return found


def split_stamp(line: str) -> tuple[float | None, str, str]:
    """``(seconds, stamp as written, the rest)`` of one log line; ``(None, "", line)`` without a stamp."""
    if (record := KMSG_RECORD.match(line)) is not None:
        seconds = int(record.group(3)) / 1e6
        return seconds, f"{seconds:.6f}", record.group(4)
    if (match := _MONOTONIC.match(line)) is not None:
        return float(match.group(1)), match.group(1), match.group(2)
    if (match := _CTIME.match(line)) is not None:
        when = datetime.datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y")
        return when.timestamp(), match.group(1), match.group(2)
    if (match := _ISO.match(line)) is not None:
        text = match.group(1).replace(",", ".")
        text = re.sub(r"([+-]\d\d)(\d\d)$", r"\1:\2", text.replace("Z", "+00:00"))
        return datetime.datetime.fromisoformat(text).timestamp(), match.group(1), match.group(2)
    if (match := _SYSLOG.match(line)) is not None:  # no year: this year's, or last year's if that is the future
        now = datetime.datetime.now()
        stamp = " ".join(match.group(1).split())
        pattern = "%Y %b %d %H:%M:%S.%f" if "." in stamp else "%Y %b %d %H:%M:%S"
        when = datetime.datetime.strptime(f"{now.year} {stamp}", pattern)
        if when > now + datetime.timedelta(days=1):
            when = when.replace(year=now.year - 1)
        return when.timestamp(), match.group(1), match.group(2)
    return None, "", line


def decode(lines: Iterable[str], config: GpuHealthConfig) -> tuple[list[Finding], dict[str, str], dict[str, str]]:
    """The findings of a log, with the GPU UUIDs and board serials its header lines name (by PCI bus id)."""
    findings: list[Finding] = []
    uuids: dict[str, str] = {}
    serials: dict[str, str] = {}
    last_header = ""
    for number, raw in enumerate(lines, start=1):
        seconds, stamp, text = split_stamp(raw.rstrip("\n"))
        if (header := GPU_HEADER_LINE.search(text)) is not None:
            last_header = normalize_pci(header.group(1))
            uuids[last_header] = header.group(2)
            continue
        if (serial := SERIAL_LINE.search(text)) is not None and last_header:
            serials[last_header] = serial.group(1)
            continue
        parsed = parse_line(text)
        if parsed is None:
            continue
        event = parsed.event
        verdict = (config.sxid_verdict(event.value, event.detail) if event.kind == "sxid"
                   else config.xid_verdict(event.value, event.detail))
        findings.append(Finding(number, event.kind, event.value, event.pci, event.device, parsed.form,
                                event.detail, verdict, seconds, stamp))
    return _one_per_fault(findings), uuids, serials


def _one_per_fault(findings: list[Finding]) -> list[Finding]:
    """Drop "fallen off the bus" lines that repeat an XID 79 of the same GPU (the driver logs both)."""
    xid79 = [f for f in findings if f.kind == "xid" and f.code == 79 and f.form == "xid"]
    kept: list[Finding] = []
    for finding in findings:
        if finding.form == "fallen_off_bus" and any(
                _same_moment(finding, other) for other in [*xid79, *(k for k in kept if k.code == 79)]
                if other.gpu == finding.gpu and other is not finding):
            continue
        kept.append(finding)
    return kept


def _same_moment(a: Finding, b: Finding) -> bool:
    if a.time is not None and b.time is not None:
        return abs(a.time - b.time) <= SAME_EVENT_S
    return abs(a.line_no - b.line_no) <= SAME_EVENT_LINES


def bursts(findings: list[Finding]) -> list[Burst]:
    """Findings grouped per device and code; a gap longer than the code's window starts a new burst.

    Without timestamps, all of one code on one device are one burst. Ordered by first line.
    """
    open_: dict[tuple[str, str, int], Burst] = {}
    done: list[Burst] = []
    for finding in findings:
        key = (finding.kind, finding.gpu, finding.code)
        current = open_.get(key)
        last = current.findings[-1] if current else None
        if current is not None and last is not None and (
                finding.time is None or last.time is None
                or finding.time - last.time <= burst_window(finding.code)):
            current.findings.append(finding)
            continue
        open_[key] = Burst([finding])
        done.append(open_[key])
    return sorted(done, key=lambda burst: burst.first.line_no)


def load_config(path: str | None) -> GpuHealthConfig:
    """``[plugins.gpu_health]`` of an agent config (its site overrides), or the defaults."""
    if path is None:
        return GpuHealthConfig()
    from vetd.core.configfile import convert, read_toml

    data, text = read_toml(Path(path))
    table = data.get("plugins", {}).get("gpu_health", {})
    return convert(table, GpuHealthConfig, path=path, text=text, prefix="plugins.gpu_health")


def run(args: argparse.Namespace) -> int:
    """``vetd xid``: exit 0 nothing critical, 1 a critical finding, 2 the file cannot be read."""
    config = load_config(args.config)
    try:
        if args.file == "-":
            text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
        else:
            text = Path(args.file).read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        print(f"vetd xid: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    findings, uuids, serials = decode(text.splitlines(), config)
    grouped = [burst.as_dict(uuids, serials) for burst in bursts(findings)]
    if args.json:
        for found in grouped:
            print(json.dumps(found))
    else:
        sys.stdout.write(render(grouped, args.file))
    return EXIT_CRITICAL if any(found["severity"] == "critical" for found in grouped) else EXIT_OK


def render(grouped: list[dict[str, object]], source: str) -> str:
    from vetd.core.output import table

    if not grouped:
        return f"no XID, SXid or fallen-off-the-bus line in {'stdin' if source == '-' else source}\n"
    rows = []
    for found in grouped:
        code = f"{found['xid']}" if "xid" in found else f"SXid {found['sxid']}"
        gpu = f"{found['device']} {found['gpu']}" if "device" in found else str(found["gpu"])
        rows.append((gpu, code, str(found["severity"]), str(found["action"]), str(found["resolution"]),
                     str(found["count"]), str(found["first"]) or "-", str(found["last"]) or "-",
                     " ".join(filter(None, [str(found["mnemonic"]), str(found["message"])]))))
    return table(("GPU", "XID", "SEVERITY", "VETD", "RESOLUTION", "COUNT", "FIRST", "LAST", "MESSAGE"), rows)
