"""Recall and false drains of the shipped defaults on the labelled GPU corpora.

Every case of ``tests/data/corpus/manifest.yaml`` judged as production judges it
(``tests/support/corpus.py``: kernel logs as ``gpu_kmsg`` reads them, captures and
scenarios through ``vetd check`` or the agent's periodic check, then the controller
with the shipped default rules). Prints the table (case, expected, got), the
recall (faults drained or alerted as expected) and the false drains (no-fault
cases drained); target 100 % and 0. Writes ``bench/results/corpus.json``.

    python bench/corpus.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from tests.support.corpus import figures, judge_all, load_cases
from vetd.core import logs
from vetd.core.output import table


def main() -> int:
    logs.setup("warning")  # a log line per rule fired would bury the table
    cases = load_cases()
    judged = judge_all(cases)
    # Verify before any figure: every case judged once, actions among the three, no case lost.
    verify(len(judged) == len(cases) and len({j.case.case for j in judged}) == len(cases), "every case judged once")
    verify(all(j.got in ("drain", "alert", "none") for j in judged), "every action is drain, alert or none")
    verify(any(j.case.corpus == "fault" for j in judged) and any(j.case.corpus == "no-fault" for j in judged),
           "both corpora present")
    result = figures(judged)
    verify(result["fault_cases"] + result["no_fault_cases"] == len(cases), "the figures count every case")
    rows = [(j.case.corpus, j.case.case, j.case.kind, j.case.expected, j.got,
             "ok" if j.ok else ("KNOWN BUG" if j.case.product_bug else "WRONG")) for j in judged]
    sys.stdout.write(table(("CORPUS", "CASE", "KIND", "EXPECTED", "GOT", ""), rows))
    print(f"recall: {result['faults_as_expected']}/{result['fault_cases']} faults drained or alerted as expected "
          f"({result['recall_pct']} %, target 100 %)")
    print(f"false drains: {result['false_drains']} of {result['no_fault_cases']} no-fault cases (target 0)")
    cases_table = [{"case": j.case.case, "corpus": j.case.corpus, "kind": j.case.kind,
                    "expected": j.case.expected, "got": j.got} for j in judged]
    path = write_results("corpus", {**result, "cases": cases_table}, manifest="tests/data/corpus/manifest.yaml",
                         rules="controller/default_rules.yaml", agent_config="packaging/config/agent.toml")
    print(f"written: {path.relative_to(Path(__file__).resolve().parents[1])}")
    return 0 if result["recall_pct"] == 100.0 and result["false_drains"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
