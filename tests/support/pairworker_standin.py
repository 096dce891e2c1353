"""A stand-in for :mod:`vetd.plugins.nccl.pairworker` on a machine without GPUs (``VETD_NCCL_PAIR_WORKER``).

It speaks the worker's protocol (the lead prints a unique id first, both end
with a JSON line) and proves the hand-over: each rank writes the id it holds
to ``$STANDIN_DIR/RANK`` and waits for the other's; the two must be equal, or
it exits 1. It measures nothing: ``gbps`` is a constant. ``STANDIN_HANG=1``
makes it hang (a stuck NCCL).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int)
    parser.add_argument("--uid")
    parser.add_argument("--bytes", type=int)
    parser.add_argument("--seconds", type=float)
    args = parser.parse_args()
    uid = secrets.token_hex(128) if args.uid == "new" else args.uid
    if args.uid == "new":
        print(uid, flush=True)
    if os.environ.get("STANDIN_HANG"):
        time.sleep(3600)
    folder = Path(os.environ["STANDIN_DIR"])
    (folder / str(args.rank)).write_text(uid)
    other = folder / str(1 - args.rank)
    deadline = time.monotonic() + 20
    while not other.exists() or not other.read_text():
        if time.monotonic() > deadline:
            return 1
        time.sleep(0.01)
    if other.read_text() != uid:
        print("different ids", file=sys.stderr)
        return 1
    print(json.dumps({"gbps": 12.5, "iters": 1, "bytes": args.bytes, "seconds": args.seconds,
                      "wrong_elements": 0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
