"""The controller's event counters (``vetd_controller_events_total``).

Kept in memory for the process and added to the store's totals in the same
transaction as the work they count.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine counts; only the ingest and the executor write counts to the store
    from vetd.controller.store import Store

#: Prefix of the per-rule error counts (``rule_error:NAME``), shown as ``vetd_rule_errors_total{rule=…}``.
RULE_ERRORS = "rule_error:"


class Counters(Counter[str]):
    """Counts since start; :meth:`write` adds what is new to the store."""

    def __init__(self) -> None:
        super().__init__()
        self._unwritten: Counter[str] = Counter()

    def count(self, name: str, n: int = 1) -> None:
        self[name] += n
        self._unwritten[name] += n

    def write(self, store: Store) -> None:
        """Add the counts not yet written to the store's (inside the caller's transaction)."""
        store.add_counters(self._unwritten)

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        """The counts as they are now, for :meth:`restore` should the work that follows be undone."""
        return Counter(self), Counter(self._unwritten)

    def restore(self, snapshot: tuple[Counter[str], Counter[str]]) -> None:
        counts, unwritten = snapshot
        self.clear()
        self.update(counts)
        self._unwritten = Counter(unwritten)

    def written(self) -> None:
        """The transaction that :meth:`write` wrote into committed."""
        self._unwritten.clear()
