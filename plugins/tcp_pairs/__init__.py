"""``tcp_pairs``: a TCP stream probe between two nodes, the pair test of ``vetd vet`` without GPUs.

Registers the pair test ``tcp_pairs`` (:mod:`vetd.plugins.tcp_pairs.probe`):
several parallel TCP streams from one node to the other for a few seconds,
the bytes counted by the receiver, as iperf3 measures. It needs nothing but
the job's network, so it runs everywhere; ``vetd vet`` picks NCCL instead
where every node has GPUs and NCCL (``--test auto``), or this one when told
(``--test tcp_pairs``). Configured in ``[plugins.tcp_pairs]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec

from vetd.agent.api import PairTest, hookimpl
from vetd.plugins.tcp_pairs.config import TcpPairsConfig

if TYPE_CHECKING:
    from vetd.agent.api import PairTestRegistry, PluginConfigs


@hookimpl
def vetd_config_tables() -> Mapping[str, type[msgspec.Struct]]:
    return {"tcp_pairs": TcpPairsConfig}


@hookimpl
def vetd_register_pair_tests(registry: PairTestRegistry, configs: PluginConfigs) -> None:
    from vetd.plugins.tcp_pairs.probe import TcpEndpoint

    config = configs.typed("tcp_pairs", TcpPairsConfig)
    registry.add(PairTest("tcp_pairs", lambda: TcpEndpoint(config), seconds=float(config.seconds),
                          overhead_s=float(config.connect_timeout) + 10.0,
                          description=f"TCP, {config.streams} parallel streams per direction, "
                          f"{float(config.seconds):g}s (like iperf3 -P {config.streams})"))
