#!/usr/bin/env python3
"""What ZeroMQ CURVE costs per data-plane message, alone: one PUSH to one PULL over loopback
TCP, plain against CURVE with the cluster's keys (eep.security.curve), for messages of the
sizes a step sends (1 KiB: the default model's decode; 256 KiB: a large prefill). Prints the
wall and CPU time per message (both ends are in this process: encrypt + decrypt) and their
difference. `eep bench hosts` measures the same in a whole instance (its `data_plane_auth`).

    .venv/bin/python scripts/curve-cost.py [--messages 4000]
"""

from __future__ import annotations

import argparse
import os
import secrets
import time

import zmq

from eep.security import curve
from eep.security.curve import CurveKeys
from eep.security.secret import ClusterSecret


def per_message(keys: CurveKeys | None, size: int, n: int) -> tuple[float, float]:
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        if keys is not None:
            curve.serve(pull, keys, door="curve-cost")
            curve.connect(push, keys)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        msg = os.urandom(size)
        push.send(msg)
        pull.recv()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            push.send(msg)
            pull.recv(copy=False)
        return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=4000)
    args = p.parse_args()
    keys = CurveKeys.from_secret(ClusterSecret(secrets.token_bytes(32)))
    print(f"{'bytes':>8} {'plain us':>9} {'CURVE us':>9} {'+us wall':>9} {'+us CPU':>9}")
    for size in (1024, 4096, 16384, 65536, 262144):
        plain, curved = per_message(None, size, args.messages), per_message(keys, size, args.messages)
        print(f"{size:>8} {plain[0]:9.1f} {curved[0]:9.1f} {curved[0] - plain[0]:9.1f} {curved[1] - plain[1]:9.1f}")


if __name__ == "__main__":
    main()
