"""Bandwidth between nodes, measured in pairs: which pairs in which round, and who is to blame.

Pure functions, no I/O: ``vetd vet`` inside a job (:mod:`vetd.agent.fabric`)
and a campaign the controller runs use the same schedule and the same
localisation.

Schedule (:func:`schedule`): ring shifts. Nodes are numbered 0…N−1 around a
ring; shift *k* pairs node *i* with node *i+k* (mod N). The edges of one shift
form cycles; an even cycle splits into two rounds in which every node is in
exactly one pair (a cycle of two is one round), an odd one into three. An odd
N gets a virtual node that pairs with nobody (its partner of the round sits
out). Shifts come in the order 1, N/2, 2, 3, …: the first three rounds give
every node two partners (its ring neighbours) and a third across the ring,
which is what localisation needs, whatever N is. Every shift in turn covers
every pair (``rounds=None``), the sparse rounds of odd cycles packed into
rounds with room: N−1 rounds (N odd: N), the least possible, for N a power
of two and many others, at most 5 more up to 200 nodes. The pairs of a round
run at the same time.

Localisation (:func:`localise`): each pair is measured in both directions; a
pair is *slow* when a direction is below ``slow_fraction`` of the median of
every measurement (the job's own reference, so no bandwidth table is needed)
or below ``min_gbps``, or when it could not be measured at all.

- a node slow with every partner is **bad** when at least one of those
  partners was fast with someone else (that partner is fine, so the fault is
  on this side); slow with every partner and none of them fast elsewhere, it
  is bad too, but the reason says it could not be told apart from its
  partners (more rounds would);
- a slow pair of two nodes that are not bad is a **bad link**: reported as the
  link, and both nodes stay good. A link is only named after it was measured
  again (:func:`confirm_rounds`) and was slow both times: a direction measured
  twice counts its better figure, so a pair slowed once by something else
  (a busy CPU, another job's burst) is not named;
- a node whose task never arrived, or left during the run, is **absent**, and
  every pair it was in is left out: its absence counts against nobody.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Literal

import msgspec

Verdict = Literal["good", "bad", "absent"]
Pair = tuple[int, int]

#: A direction below this share of the median of all measurements is slow.
SLOW_FRACTION = 0.5
#: Rounds of ``vetd vet`` unless told otherwise: two partners on the ring and one across it.
DEFAULT_ROUNDS = 3
#: The check name of a node's verdict as a result (``vetd vet`` in a job, through the node's
#: agent; a controller campaign, stored by the controller).
CHECK = "fabric_pairs"


def _shift_order(m: int) -> list[int]:
    half = m // 2
    order = [1, half, *range(2, half)]
    return list(dict.fromkeys(k for k in order if 1 <= k <= half))


def _shift_rounds(m: int, k: int) -> list[list[Pair]]:
    """The rounds of shift ``k`` on a ring of ``m`` (even) nodes: 1, 2 or 3 matchings."""
    if 2 * k == m:
        return [[(i, i + k) for i in range(k)]]
    cycles = math.gcd(m, k)
    length = m // cycles
    colours: list[list[Pair]] = [[], [], []]
    for start in range(cycles):
        ring = [(start + j * k) % m for j in range(length)]
        edges = [(ring[j], ring[(j + 1) % length]) for j in range(length)]
        for j, edge in enumerate(edges):
            # even cycle: alternate two colours; odd: the closing edge takes a third
            colour = 2 if length % 2 and j == length - 1 else j % 2
            colours[colour].append(edge)
    return [sorted((min(a, b), max(a, b)) for a, b in c) for c in colours if c]


def schedule(n: int, rounds: int | None = DEFAULT_ROUNDS) -> list[list[Pair]]:
    """The pairs of each round for ``n`` nodes (indices), at most ``rounds`` rounds (None: every pair).

    No pair is measured twice; a node is in at most one pair per round.
    """
    if n < 2:
        return []
    m = n + n % 2  # odd: a virtual node n, whose partner sits the round out
    out: list[list[Pair]] = []
    seen: set[Pair] = set()
    for k in _shift_order(m):
        for matching in _shift_rounds(m, k):
            real = [p for p in matching if p[1] < n and p not in seen]
            if not real:
                continue
            seen.update(real)
            out.append(real)
            if rounds is not None and len(out) >= rounds:
                return out
    return _compact(out, n)


def _compact(plan: list[list[Pair]], n: int) -> list[list[Pair]]:
    """Move pairs of rounds that are not full (odd cycles' third rounds) into earlier rounds with room."""
    full = n // 2
    busy = [{x for pair in matching for x in pair} for matching in plan]
    for late in range(len(plan)):
        if len(plan[late]) == full:
            continue
        for pair in list(plan[late]):
            for early in range(late):
                if len(plan[early]) < full and not busy[early] & set(pair):
                    plan[late].remove(pair)
                    busy[late] -= set(pair)
                    plan[early].append(pair)
                    busy[early] |= set(pair)
                    break
    return [sorted(matching) for matching in plan if matching]


def confirm_rounds(links: Iterable[tuple[int, int]]) -> list[list[Pair]]:
    """The pairs to measure again, packed into as few rounds as greedy packing finds."""
    out: list[list[Pair]] = []
    busy: list[set[int]] = []
    for a, b in links:
        pair = (min(a, b), max(a, b))
        for matching, used in zip(out, busy, strict=True):
            if not used & set(pair):
                matching.append(pair)
                used.update(pair)
                break
        else:
            out.append([pair])
            busy.append(set(pair))
    return out


def partners(plan: Sequence[Sequence[Pair]]) -> dict[int, list[int]]:
    """Node index → its partners over the plan, in round order."""
    found: dict[int, list[int]] = {}
    for matching in plan:
        for a, b in matching:
            found.setdefault(a, []).append(b)
            found.setdefault(b, []).append(a)
    return found


class Measurement(msgspec.Struct, kw_only=True, frozen=True):
    """One direction of one pair: what ``src`` sent to ``dst``, in decimal GB/s (None: it failed)."""

    src: str
    dst: str
    round: int
    gbps: float | None = None
    #: Why there is no figure (``gbps`` None).
    error: str = ""
    #: What else the test measured (streams, bytes, seconds).
    detail: dict[str, float] = {}


class NodeVerdict(msgspec.Struct, kw_only=True):
    node: str
    verdict: Verdict
    reason: str
    codes: list[str] = []
    metrics: dict[str, float] = {}
    #: Peers this node's link to is slow while both ends are good.
    slow_links: list[str] = []


class Link(msgspec.Struct, kw_only=True, frozen=True):
    """A slow pair of two nodes that are not bad."""

    a: str
    b: str
    #: The slower direction's figure (None: it could not be measured).
    gbps: float | None
    reason: str
    #: Rounds the pair was measured in (2: measured again to confirm).
    times: int = 1


class Localisation(msgspec.Struct, kw_only=True):
    nodes: list[NodeVerdict]
    links: list[Link]
    #: Median of every direction measured (decimal GB/s); 0 when nothing was.
    reference_gbps: float
    #: Below this a direction is slow.
    threshold_gbps: float


def _fmt(gbps: float | None) -> str:
    return "failed" if gbps is None else f"{gbps:.3g} GB/s"


def localise(nodes: Sequence[str], measurements: Iterable[Measurement], *, absent: Mapping[str, str] = {},
             excluded: Mapping[str, str] = {}, slow_fraction: float = SLOW_FRACTION,
             min_gbps: float = 0.0, links_among: Collection[frozenset[str]] | None = None) -> Localisation:
    """Verdicts for ``nodes`` from the pair measurements (module docstring).

    ``absent``: node → why it is absent (never arrived, left); its pairs are
    ignored. ``excluded``: node → why it is bad without pairs (its node-local
    checks failed); it took no part in them. ``links_among``: only these pairs
    may be named slow links (those measured again to confirm): measuring again
    moves the median, and a pair that only crossed the threshold because of
    that was never confirmed.
    """
    gone = set(absent) | set(excluded)
    kept = [m for m in measurements if m.src not in gone and m.dst not in gone]
    figures = [m.gbps for m in kept if m.gbps is not None]
    reference = statistics.median(figures) if figures else 0.0
    threshold = max(min_gbps, slow_fraction * reference)

    # a direction measured again (to confirm a slow link) counts its better figure
    best: dict[tuple[str, str], Measurement] = {}
    rounds_of: dict[frozenset[str], set[int]] = {}
    for m in kept:
        rounds_of.setdefault(frozenset((m.src, m.dst)), set()).add(m.round)
        seen = best.get((m.src, m.dst))
        if seen is None or (m.gbps is not None and (seen.gbps is None or m.gbps > seen.gbps)):
            best[(m.src, m.dst)] = m
    # unordered pair → the slower direction (None: a direction failed)
    directions: dict[frozenset[str], list[Measurement]] = {}
    for m in best.values():
        directions.setdefault(frozenset((m.src, m.dst)), []).append(m)
    pair_gbps: dict[frozenset[str], float | None] = {}
    pair_error: dict[frozenset[str], str] = {}
    for key, ms in directions.items():
        failed = [m for m in ms if m.gbps is None]
        pair_gbps[key] = None if failed else min(m.gbps for m in ms if m.gbps is not None)
        pair_error[key] = "; ".join(f"{m.src}→{m.dst}: {m.error}" for m in failed)

    def slow(key: frozenset[str]) -> bool:
        value = pair_gbps[key]
        return value is None or value < threshold

    def slow_link(key: frozenset[str]) -> bool:
        return slow(key) and (links_among is None or key in links_among)

    mine: dict[str, list[tuple[str, frozenset[str]]]] = {node: [] for node in nodes}
    for key in pair_gbps:
        a, b = sorted(key)
        mine.setdefault(a, []).append((b, key))
        mine.setdefault(b, []).append((a, key))
    has_fast = {node: any(not slow(key) for _, key in pairs) for node, pairs in mine.items()}
    all_slow = {node: bool(pairs) and not has_fast[node] for node, pairs in mine.items()}
    bad = {node for node, value in all_slow.items() if value}

    verdicts: list[NodeVerdict] = []
    links: list[Link] = []
    for node in nodes:
        if node in absent:
            verdicts.append(NodeVerdict(node=node, verdict="absent", reason=absent[node], codes=["absent"]))
            continue
        if node in excluded:
            verdicts.append(NodeVerdict(node=node, verdict="bad", reason=excluded[node], codes=["local_checks"]))
            continue
        pairs = mine.get(node, [])
        own = [m.gbps for m in best.values() if node in (m.src, m.dst) and m.gbps is not None]
        metrics: dict[str, float] = {"pairs": float(len(pairs)), "slow_pairs": float(sum(slow(k) for _, k in pairs))}
        if own:
            metrics.update(pair_gbps_median=round(statistics.median(own), 4), pair_gbps_min=round(min(own), 4))
        for peer, key in pairs:
            value = pair_gbps[key]
            if value is not None:
                metrics[f"pair_gbps_{peer}"] = round(value, 4)
        if not pairs:
            verdicts.append(NodeVerdict(node=node, verdict="good", metrics=metrics, codes=["no_pairs"],
                                        reason="node-local checks passed; no pair measured (no partner present)"))
            continue
        described = ", ".join(f"{peer} {_fmt(pair_gbps[key])}" for peer, key in pairs)
        if node in bad:
            confirming = [peer for peer, _ in pairs if has_fast.get(peer)]
            if confirming:
                reason = (f"slow with every partner ({described}; below {threshold:.3g} GB/s) while "
                          f"{', '.join(confirming)} {'was' if len(confirming) == 1 else 'were'} fast with others")
                codes = ["slow_all_pairs"]
            else:
                reason = (f"slow with every partner ({described}), and none of them was fast with another "
                          "node: not told apart from its partners (more rounds would)")
                codes = ["slow_all_pairs", "unlocalised"]
            verdicts.append(NodeVerdict(node=node, verdict="bad", reason=reason, codes=codes, metrics=metrics))
            continue
        slow_links = [peer for peer, key in pairs if slow_link(key) and peer not in bad]
        for peer, key in pairs:
            if slow_link(key) and peer not in bad and node < peer:
                times = len(rounds_of[key])
                why = pair_error[key] or f"{_fmt(pair_gbps[key])} < {threshold:.3g} GB/s"
                if times > 1:
                    why += f" (at best, of {times} measurements)"
                links.append(Link(a=node, b=peer, gbps=pair_gbps[key], reason=why, times=times))
        reason = f"{len(pairs)} pair{'s' if len(pairs) != 1 else ''}: {described}"
        codes = []
        if slow_links:
            reason += f"; slow link to {', '.join(slow_links)} (both ends fast elsewhere)"
            codes.append("slow_link")
        blamed = [peer for peer, key in pairs if slow(key) and peer in bad]
        if blamed:
            reason += f"; slow with {', '.join(blamed)} (bad)"
        verdicts.append(NodeVerdict(node=node, verdict="good", reason=reason, codes=codes, metrics=metrics,
                                    slow_links=slow_links))
    return Localisation(nodes=verdicts, links=links, reference_gbps=round(reference, 4),
                        threshold_gbps=round(threshold, 4))


def result_status(verdict: NodeVerdict) -> str:
    """The status of a node's verdict as a ``fabric_pairs`` result, for the rules.

    ``fail``: slow with every partner while one of them was fast with someone else (the node is
    to blame); ``warn``: a slow link (both ends good), or slow with every partner none of whom was
    fast elsewhere (``unlocalised``: never measured against a good node, so not blamed: with two
    nodes both would be); ``skip``: no pair measured, or the node-local checks failed (those are
    the agent's own checks to report); ``pass`` otherwise. An absent node has no result.
    """
    if verdict.verdict == "bad":
        if "local_checks" in verdict.codes:
            return "skip"
        return "warn" if "unlocalised" in verdict.codes else "fail"
    if {"pairs_skipped", "no_pairs"} & set(verdict.codes):
        return "skip"
    return "warn" if verdict.slow_links else "pass"
