"""The ``tcp_pairs`` probe from the command line, one side per process, for tests and the bench.

``python -m tests.support.tcpprobe serve PORT``: listens (prints ``ready``) until killed.
``python -m tests.support.tcpprobe measure HOST PORT SECONDS STREAMS``: prints the sample as JSON.
Run each under ``ip netns exec`` to measure between two namespaced nodes.
"""

from __future__ import annotations

import json
import signal
import sys

from vetd.agent.api import Peer
from vetd.plugins.tcp_pairs.config import TcpPairsConfig
from vetd.plugins.tcp_pairs.probe import TcpEndpoint


def main(argv: list[str]) -> int:
    if argv[0] == "serve":
        endpoint = TcpEndpoint(TcpPairsConfig(port=int(argv[1])))
        print("ready", flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        endpoint.close()
        return 0
    host, port, seconds, streams = argv[1], int(argv[2]), float(argv[3]), int(argv[4])
    endpoint = TcpEndpoint(TcpPairsConfig(streams=streams))
    sample = endpoint.measure(Peer(node=host, host=host, info={"port": port}), seconds, True, "cli")
    endpoint.close()
    print(json.dumps({"gbps": sample.gbps, "error": sample.error, "detail": sample.detail}), flush=True)
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main(sys.argv[1:]))
