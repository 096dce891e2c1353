"""The shipped escalation rules that count a node's history, replayed as ``vetd rules test`` replays them.

Each file in ``tests/data/replays/`` is an events file with its expectation in its header:
``# decides:`` the decisions the rules take, in order (``ACTION RULE``, ``ACTION/OUTCOME RULE``;
``-``: no rule), among drains, nodes marked failed, resumes, ladders healed, diagnoses and rules
firing; ``# rules:`` a site's rule file loaded before the shipped ones; ``# config:`` a controller
config. Each rule has a case where it fires and a healthy one where it must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.procs import run_vetd
from vetd.controller.config import load_controller_config
from vetd.controller.replay import read_events, replay

REPLAYS = Path(__file__).resolve().parents[1] / "data" / "replays"
DEFAULT_RULES = Path(__file__).resolve().parents[2] / "controller" / "default_rules.yaml"
#: The decisions a case lists (alerts follow from the rules firing and are left out).
SHOWN = ("rule_fired", "drain", "mark_failed", "resume", "healed", "diagnose")
#: Every escalation rule in the shipped file that counts history, and the cases it fires in.
FIRES_IN = {
    "xid-back-after-two-remediations": {"xid-79-back-after-two-reboots"},
    "xid-back-after-remediation": {"xid-79-back-after-two-reboots"},
    "remediated-too-often": {"remediated-five-times-in-a-week"},
    "xid31-twice-diagnose": {"xid-31-twice-diagnose"},
}


def header(path: Path, key: str) -> list[str]:
    lines = [line.removeprefix(f"# {key}:").strip() for line in path.read_text().splitlines()
             if line.startswith(f"# {key}:")]
    return [item.strip() for item in " ".join(lines).split(",") if item.strip()]


def decided(path: Path) -> list[str]:
    config = header(path, "config")
    rules = [str(REPLAYS / name) for name in header(path, "rules")] + [str(DEFAULT_RULES)]
    decisions = replay(rules, read_events(path),
                       load_controller_config(REPLAYS / config[0], environ={}) if config else None)
    shown = []
    for d in decisions:
        if d.action in SHOWN:
            action = f"{d.action}/{d.outcome}" if d.action == "diagnose" else d.action
            shown.append(f"{action} {d.rule or '-'}")
    return shown


def matches(got: str, want: str) -> bool:
    """``diagnose/sent x`` matches ``diagnose/sent x`` and ``diagnose x``."""
    action, _, rule = got.partition(" ")
    return got == want or ("/" not in want.split(" ")[0] and f"{action.split('/')[0]} {rule}" == want)


CASES = sorted(REPLAYS.glob("*.jsonl"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_each_replay_decides_what_its_header_says(path: Path) -> None:
    got = decided(path)
    want = header(path, "decides")
    assert want, f"{path.name} has no '# decides:' header"
    assert len(got) == len(want) and all(map(matches, got, want)), "\n".join(got)


def test_every_history_rule_fires_in_its_case_and_in_no_other() -> None:
    fired = {path.stem: {line.split(" ", 1)[1] for line in decided(path) if line.startswith("rule_fired ")}
             for path in CASES}
    for rule, cases in FIRES_IN.items():
        assert {case for case, rules in fired.items() if rule in rules} == cases, rule
    healthy = [case for case in fired if not any(case in cases for cases in FIRES_IN.values())]
    assert len(healthy) >= 4  # a burst, another XID or GPU, an old one, XID 31 once per GPU, 4 remediations


def test_vetd_rules_test_replays_a_case_as_its_header_shows() -> None:
    """The command line the header gives, with a site's rules and config."""
    case = REPLAYS / "remediated-five-times-in-a-week.jsonl"
    done = run_vetd("rules", "test", str(REPLAYS / "heal-site.yaml"), str(DEFAULT_RULES),
                    "--config", str(REPLAYS / "heal-site.toml"), "--events", str(case), "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["action"], r["rule"]) for r in rows if r["action"] in ("mark_failed", "heal_end")] == [
        ("mark_failed", "remediated-too-often"), ("heal_end", "gpu-reset-then-reboot")]
    assert rows[-1]["ts"] == 1794045600.0  # 2026-11-07T10:00:00Z, the fourth request for a reset


def test_a_bad_operator_line_names_file_and_line(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"kind": "state", "ts": 0, "node": "nid001", "online": true}\n'
                      '{"kind": "operator", "action": "reboot", "ts": 10, "node": "nid001"}\n')
    done = run_vetd("rules", "test", "--events", str(events))
    assert done.returncode == 2 and f"{events}:2: Invalid enum value 'reboot'" in done.stderr, done.stderr
