"""The labelled corpora (tests/data/corpus/manifest.yaml): every case gets the action the
manifest expects from the shipped defaults, so a policy change that adds a false drain
or misses a fault fails a test named after the case. Figures: ``bench/corpus.py``."""

from __future__ import annotations

import pytest

from tests.support.corpus import Case, figures, judge, load_cases

CASES = load_cases()


def _param(case: Case) -> object:
    marks = [pytest.mark.xfail(strict=True, reason=case.product_bug)] if case.product_bug else []
    return pytest.param(case, id=case.case, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_the_shipped_defaults_take_the_expected_action(case: Case) -> None:
    judged = judge(case)
    assert judged.got == case.expected, (f"{case.case}: expected {case.expected}, the default rules "
                                         f"decided {judged.decisions or 'nothing'} ({case.why})")


def test_the_corpora_cover_every_class() -> None:
    """One case per XID resolution class and per counter fault; no-fault cases never expect a drain."""
    names = {case.case for case in CASES}
    for needed in ("xid-109-reset-gpu", "xid-79-reboot", "xid-54-hardware-inspection", "xid-74-nvlink",
                   "xid-48-dbe", "xid-94-restart-app", "counter-dbe", "counter-row-remap-failure",
                   "counter-retired-pages", "counter-gpu-lost", "counter-nvlink-down-after-up",
                   "counter-thermal-at-slowdown", "counter-power-brake-sustained", "air-cooled-idle-40c",
                   "shared-node-other-jobs-busy", "driver-reload", "mig-on", "pstate-slowdown-blip",
                   "row-remap-pending", "xid-13-app-fault", "xid-31-app-fault", "xid-43-app-fault"):
        assert needed in names
    assert all(case.expected != "drain" for case in CASES if case.corpus == "no-fault")
    assert all(case.ref.startswith("https://") for case in CASES)


def test_the_figures_count_recall_and_false_drains() -> None:
    fault, clean = (next(c for c in CASES if c.corpus == kind and c.kind == "kmsg") for kind in ("fault", "no-fault"))
    got = figures([judge(fault), judge(clean)])
    assert (got["fault_cases"], got["no_fault_cases"], got["false_drains"]) == (1, 1, 0)
