"""Fuzz the wire decoder: 1,000,000 inputs; any exception but ProtocolError is a crash.

Inputs are mutations of valid messages of every kind (bit flips, byte
insertions and deletions, truncation, splicing two messages, repeated
chunks, length fields set huge) plus plain random bytes, from a fixed seed
so a crash can be reproduced (``--seed``). Prints inputs per second and the
crashes found. Coverage-guided fuzzing (atheris) would explore msgspec's C
decoder no better from Python, so this is structure-aware mutation instead.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from vetd.core import protocol
from vetd.core.protocol import Command, Event, Reply, Result, State, Telemetry

BASE = {"cluster": "alps", "node": "nid001", "session": "0123456789abcdef", "seq": 42, "ts": 1.7e9}
SEEDS = [
    protocol.encode(m) for m in (
        State(**BASE, online=True, started=1.0, labels={"gpu": "H100", "partition": "normal"}, checks=["a", "b"]),
        Result(**BASE, check="gpu_health", status="fail", entity="gpu3", codes=["ecc_dbe", "reset_required"],
               metrics={"temp_c": 41.5, "ecc_volatile_uncorrectable": 2.0}, message="2 DBEs", job_id="123"),
        Event(**BASE, name="xid", severity="critical", entity="gpu1", codes=["xid_79"], metrics={"xid": 79.0}),
        Telemetry(**BASE, source="gpu", entity="gpu0", metrics={"power_w": 300.0}),
        Command(**BASE, id="c1", action="gpu_reset", args={"gpu": "3"}, expires=2e9),
        Reply(**BASE, id="c1", ok=False, message="refused", data={"exit": "1"}),
    )
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and buf:  # flip bits
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and buf:  # delete a run
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randint(1, 8)]
        elif op == 3 and buf:  # truncate
            del buf[rng.randrange(len(buf)):]
        elif op == 4:  # splice with another message
            other = rng.choice(SEEDS)
            i, j = rng.randrange(len(buf) + 1), rng.randrange(len(other) + 1)
            buf = buf[:i] + other[j:]
        elif op == 5 and buf:  # repeat a chunk
            i = rng.randrange(len(buf))
            chunk = buf[i:i + rng.randint(1, 16)]
            buf[i:i] = chunk * rng.randint(1, 50)
        elif op == 6 and buf:  # a huge length or count marker
            i = rng.randrange(len(buf))
            buf[i:i + 1] = rng.choice([b"\xdb\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                                       b"\xc6\xff\xff\xff\xff", b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00"])
    return bytes(buf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=20261122)
    args = parser.parse_args()
    for seed in SEEDS:  # the fuzzer is only as good as its seeds: each must decode as it was
        verify(protocol.encode(protocol.decode(seed)) == seed,
               "a seed message does not round-trip through the decoder")
    rng = random.Random(args.seed)
    crashes: list[tuple[int, bytes, str]] = []
    rejected = accepted = 0
    started = time.perf_counter()
    for n in range(args.inputs):
        payload = rng.randbytes(rng.randint(0, 64)) if n % 10 == 0 else mutate(rng, rng.choice(SEEDS))
        try:
            protocol.decode_from("vetd/v1/alps/node/nid001/result", payload)
            accepted += 1
        except protocol.ProtocolError:
            rejected += 1
        except Exception as exc:  # noqa: BLE001 - that is what we are looking for
            crashes.append((n, payload, f"{type(exc).__name__}: {exc}"))
    elapsed = time.perf_counter() - started
    print(f"{args.inputs:,} inputs in {elapsed:.1f} s: {args.inputs / elapsed:,.0f} inputs/s; "
          f"{rejected:,} rejected with ProtocolError, {accepted:,} accepted, {len(crashes)} crashes")
    for n, payload, error in crashes[:10]:
        print(f"  crash at input {n}: {error}: {payload[:80]!r}")
    verify(rejected + accepted + len(crashes) == args.inputs, "every input decoded or rejected")
    verify(rejected > args.inputs // 2 and accepted > 0, f"the mutations reach both outcomes ({accepted:,} accepted)")
    verify(not crashes, f"{len(crashes)} crashes (inputs other than ProtocolError)")
    figures = {"inputs": args.inputs, "inputs_per_s": round(args.inputs / elapsed), "rejected": rejected,
               "accepted": accepted, "crashes": len(crashes)}
    print(f"written to {write_results('fuzz_decoder', figures, inputs=args.inputs, seed=args.seed)}")


if __name__ == "__main__":
    main()
