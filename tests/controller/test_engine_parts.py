"""The engine's pure parts, without a store: rule timing and the breaker's verdict."""

from __future__ import annotations

from vetd.controller.breaker import verdict
from vetd.controller.config import BreakerSection
from vetd.controller.model import RuleState
from vetd.controller.rules import RuleSpec
from vetd.controller.rulestate import advance, window


def spec(**kw: object) -> RuleSpec:
    return RuleSpec(name="r", when="true", **kw)  # type: ignore[arg-type]


def always() -> bool:
    return True


def test_a_rule_with_for_pends_then_fires_and_resolves_with_its_start() -> None:
    rule = spec(for_=300.0)
    pending = advance(None, rule, True, 0, always)
    assert pending.changed and not pending.fire and pending.state == RuleState("pending", 0)
    assert advance(pending.state, rule, True, 200, always).changed is False
    firing = advance(pending.state, rule, True, 300, always)
    assert firing.fire and firing.state == RuleState("firing", 300)
    resolved = advance(firing.state, rule, False, 400, always)
    assert resolved.changed and resolved.state is None and resolved.resolved_since == 300


def test_keep_firing_for_holds_through_a_flap_and_resolves_after_it() -> None:
    rule = spec(keep_firing_for=600.0)
    firing = advance(None, rule, True, 0, always).state
    cleared = advance(firing, rule, False, 60, always)
    assert cleared.state == RuleState("firing", 0, 60) and cleared.resolved_since is None
    assert advance(cleared.state, rule, True, 120, always).state == RuleState("firing", 0)
    assert advance(cleared.state, rule, False, 659, always).changed is False
    assert advance(cleared.state, rule, False, 660, always).resolved_since == 0


def test_a_rule_that_has_not_counted_enough_matches_stays_inactive() -> None:
    assert advance(None, spec(), True, 0, lambda: False).changed is False


def test_count_windows_forget_old_matches_and_restart_after_reaching() -> None:
    stamps, reached = window([0.0], 100.0, 2, 50.0)
    assert (stamps, reached) == ([100.0], False)
    assert window(stamps, 120.0, 2, 50.0) == ([], True)


def test_the_breaker_allows_a_fraction_of_a_partition_and_a_rate_of_drains() -> None:
    config = BreakerSection(max_fraction=0.1, always_allow=1)
    assert verdict(config, "gpu", 10, 0, lambda: 0) == ""
    assert verdict(config, "gpu", 10, 1, lambda: 0) == \
        "partition 'gpu' would have 2 of 10 nodes excluded (allowed 1)"
    limited = BreakerSection(max_fraction=1.0, max_drains=3)
    assert verdict(limited, "gpu", 10, 0, lambda: 2) == ""
    assert verdict(limited, "gpu", 10, 0, lambda: 3) == "partition 'gpu' would have 4 drains in 3600s (allowed 3)"


def test_a_peer_median_leaves_out_the_subject_itself() -> None:
    import random
    import statistics

    from vetd.controller.model import PeerSeries

    rng = random.Random(15)
    series, values = PeerSeries(), {}
    for step in range(400):
        subject = (f"nid{rng.randrange(12):03d}", f"gpu{rng.randrange(4)}")
        value = float(rng.choice([rng.uniform(0, 100), 50.0]))  # ties too
        series.put(subject, value)
        values[subject] = value
        if step % 7 == 0:
            series.drop(subject)
            del values[subject]
        assert series.ordered == sorted(values.values())
        asked = (f"nid{rng.randrange(13):03d}", "gpu0")  # nid012 never reports
        others = [v for s, v in values.items() if s != asked]
        assert series.median_without(asked) == ((statistics.median(others) if others else None), len(others))
