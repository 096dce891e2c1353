"""Many simulated nodes in one process, on the agent's own delivery code.

Each node is the real :class:`vetd.agent.transport.Transport` over the real
:class:`vetd.agent.spool.Spool` (a spool file per node, as on a node), with
its own MQTT connection, identity (username = node name, as the shipped ACL
wants) and session. What it does not run is the agent's daemon around them
(plugins, checks, the check schedule): a node ``put``s ``--per-node`` results
into its spool at once and the transport delivers them, exactly as the
daemon's ``emit_result`` does. Real ``vetd agent`` processes weigh ~40 MB
each; a hundred of them would not fit next to the broker and the controller
on a small test machine.

Run as ``python -m tests.support.simnodes``; prints one JSON line
``{"event": "produced", "sessions": {node: session}}`` once every result is
spooled, and ``{"event": "delivered"}`` once every spool is empty (every
result acknowledged by the controller), then keeps running until SIGTERM.
``--drain-only`` makes no results (a restart after SIGKILL: the spools from
before are delivered under a new session, as an agent restart does).
Node ``nid00000``'s result ``--fail-seq`` fails (for a rule to fire once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

from vetd.agent.spool import Spool
from vetd.agent.transport import Identity, Transport
from vetd.core.mqtt import BrokerAuth, client_options, parse_broker
from vetd.core.protocol import Result


def node_name(i: int) -> str:
    return f"nid{i:05d}"


async def main(args: argparse.Namespace) -> None:
    broker = parse_broker(args.broker)
    state = Path(args.state_dir)
    transports: list[Transport] = []
    for i in range(args.nodes):
        node = node_name(i)
        identity = Identity(args.cluster, node)
        spool = Spool(state / f"spool-{node}.db", limit=max(100_000, args.per_node * 2))
        options: dict[str, Any] = {}
        if args.password_dir:
            auth = BrokerAuth(username=node, password_file=str(Path(args.password_dir) / f"{node}.password"),
                              ca_file=args.ca)
            options = client_options(broker, auth, "simnodes")
        transports.append(Transport(broker, identity, spool, keepalive=args.keepalive, client_options=options,
                                    ack_timeout=args.ack_timeout))
    if not args.drain_only:
        for t in transports:
            for _ in range(args.per_node):
                seq = t.identity.next_seq()
                failing = t.identity.node == node_name(0) and seq == args.fail_seq
                t.send(Result(cluster=args.cluster, node=t.identity.node, session=t.identity.session, seq=seq,
                              ts=time.time(), check="crashtest", status="fail" if failing else "pass",
                              metrics={"seq": float(seq)}))
    print(json.dumps({"event": "produced", "sessions": {t.identity.node: t.identity.session for t in transports},
                      "per_node": 0 if args.drain_only else args.per_node}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(t.run(), name=f"sim.{t.identity.node}") for t in transports]
        announced = False
        while not stop.is_set():
            if not announced and all(len(t.spool) == 0 for t in transports):
                print(json.dumps({"event": "delivered"}), flush=True)
                announced = True
            await asyncio.wait([asyncio.ensure_future(stop.wait())], timeout=0.2)
        for task in tasks:
            task.cancel()
    for t in transports:
        t.spool.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--per-node", type=int, default=100)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--password-dir", default="")
    parser.add_argument("--ca", default="")
    parser.add_argument("--keepalive", type=int, default=5)
    parser.add_argument("--ack-timeout", type=float, default=10.0)
    parser.add_argument("--fail-seq", type=int, default=7)
    parser.add_argument("--drain-only", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
