"""Node labels and the fleet view rules see as ``fleet`` (no I/O).

A node's labels are its agent's (from its birth) overridden by the
controller's static ``[labels]``. The fleet of a node is what most nodes of
its cluster and partition have: for each label, the value more than half of
the nodes that have the label hold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from vetd.controller.model import NodeRow

DEFAULT_PARTITION = "default"


def static_labels(table: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """``{"nid[0001-0004]": {...}}`` → labels per node name (later entries win)."""
    from ClusterShell.NodeSet import NodeSet

    labels: dict[str, dict[str, str]] = {}
    for hostlist, values in table.items():
        for name in NodeSet(hostlist):
            labels.setdefault(str(name), {}).update(values)
    return labels


class Fleet:
    """Labels per node and, per (cluster, partition), the majority of each label."""

    def __init__(self, static: dict[str, dict[str, str]], nodes: Iterable[NodeRow] = ()) -> None:
        self._static = static
        #: (cluster, partition) → label → value → nodes, kept as labels change.
        self._label_counts: dict[tuple[str, str], dict[str, Counter[str]]] = {}
        #: (cluster, node) → the labels counted for it.
        self._labels_counted: dict[tuple[str, str], dict[str, str]] = {}
        #: (cluster, partition) → the ``fleet`` rules see, until a count there changes.
        self._fleets: dict[tuple[str, str], dict[str, Any]] = {}
        for node in nodes:
            self.count(node)

    def labels_of(self, node: NodeRow) -> dict[str, str]:
        """The agent's labels, overridden by the controller's static ``[labels]``."""
        return {**node.labels, **self._static.get(node.name, {})}

    def partition_of(self, node: NodeRow) -> str:
        return self.labels_of(node).get("partition", DEFAULT_PARTITION)

    def counted(self, node: NodeRow) -> bool:
        return (node.cluster, node.name) in self._labels_counted

    def count(self, node: NodeRow) -> None:
        """Keep the per-partition label counts in step with ``node``'s labels."""
        labels = self.labels_of(node)
        old = self._labels_counted.get((node.cluster, node.name))
        if old == labels:
            return
        for counted, sign in ((old or {}, -1), (labels, 1)):
            key = (node.cluster, counted.get("partition", DEFAULT_PARTITION))
            counts = self._label_counts.setdefault(key, {})
            for name, value in counted.items():
                counts.setdefault(name, Counter())[value] += sign
                if counts[name][value] <= 0:
                    del counts[name][value]
            self._fleets.pop(key, None)
        self._labels_counted[(node.cluster, node.name)] = labels

    def of(self, node: NodeRow) -> dict[str, Any]:
        """What most nodes of ``node``'s cluster and partition have.

        A rule compares a node with it (a GPU driver that drifted from the
        fleet's); with no majority there is nothing to drift from.
        """
        partition = self.partition_of(node)
        key = (node.cluster, partition)
        fleet = self._fleets.get(key)
        if fleet is None:
            majority = {}
            for name, values in self._label_counts.get(key, {}).items():
                if values:
                    value, held = values.most_common(1)[0]
                    if 2 * held > values.total():
                        majority[name] = value
            fleet = self._fleets[key] = {"partition": partition, "labels": majority}
        return fleet
