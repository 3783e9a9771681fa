"""Where a cross-host decode step's time goes, against the same ranks on one host (root).

    .venv/bin/python scripts/hosts-profile.py cpu [--window 12]
        Two namespace hosts x 2 ranks, then the same 4 ranks on one host, each under the same
        closed-loop HTTP load as `eep bench hosts`: per committed step, the CPU (user, system)
        and the context switches of every thread of the instance's processes, by process kind
        and thread name, from /proc.
    .venv/bin/python scripts/hosts-profile.py io-policy [--rounds 6] [--window 3]
        One cross-host instance under that load; every rank's ZeroMQ I/O thread switched between
        SCHED_BATCH (as eep sets it) and SCHED_OTHER every window, in ABBA order: ms per committed
        step and per step in the data plane, per policy.

docs/benchmarks.md ("Across hosts") quotes both. A diagnostic, not a benchmark: no JSON, no
targets; the figures are this machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eep.bench.harness import Trace, complete, http_client, start_namespace_server, warm  # noqa: E402
from eep.bench.steady import checkpoint_vocab  # noqa: E402
from eep.cli import default_cache_dir  # noqa: E402
from eep.model.default_model import DEFAULT_ARCH, ensure_default_model  # noqa: E402
from eep.testbed.netns import NamespaceHosts, run_in  # noqa: E402

CONCURRENCY = 16
TICKS = os.sysconf("SC_CLK_TCK")


def _threads(pids: set[int]) -> collections.Counter[tuple[str, str, str]]:
    """(process kind, thread name, counter) -> CPU ticks or context switches, over every eep process."""
    out: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "-m eep" not in cmd:
                continue
            kind = ("rank" if int(pid) in pids else "fork server" if "fork_server" in cmd
                    else "node 0 (frontend, controller)" if "--node-rank 0" in cmd else "agent")
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                name = "heartbeat" if name.startswith("heartbeat") else name
                fields = stat[stat.rindex(")") + 2:].split()
                out[kind, name, "user ms"] += int(fields[11]) * 1000 // TICKS
                out[kind, name, "system ms"] += int(fields[12]) * 1000 // TICKS
                for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        out[kind, name, line.split("_")[0] + " switches"] += int(line.split(":")[1])
        except (OSError, ValueError):  # a process or thread ended meanwhile
            continue
    return out


async def _load(srv: Any, trace: Trace, measure: Any) -> Any:
    """`measure(client, pids)` under the closed-loop load, after a warm-up and a 1.5 s ramp."""
    async with http_client(srv, CONCURRENCY) as client:  # type: ignore[arg-type]
        await warm(client, srv, trace, CONCURRENCY)  # type: ignore[arg-type]
        pids = set((await client.get("/membership")).json()["pids"])
        counter, records, clock = itertools.count(), [], time.monotonic()

        async def worker() -> None:
            while True:
                await complete(client, srv.model_name, trace, next(counter), clock, records)

        tasks = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
        try:
            await asyncio.sleep(1.5)
            return await measure(client, pids)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _dataplane(client: Any) -> dict[str, float]:
    return (await client.get("/membership")).json()["dataplane"]  # type: ignore[no-any-return]


def cpu(net: NamespaceHosts, model: str, trace: Trace, common: list[str], window: float) -> None:
    for name, nnodes in (("cross-host", 2), ("one host", 1)):
        srv = start_namespace_server(net, model, nnodes=nnodes, ep_size=4, port=29500, http_port=8100, args=common)

        async def measure(client: Any, pids: set[int]) -> tuple[float, float, collections.Counter[Any]]:
            d0, c0, t0 = await _dataplane(client), _threads(pids), time.monotonic()
            await asyncio.sleep(window)
            d1, c1, t1 = await _dataplane(client), _threads(pids), time.monotonic()
            steps = d1["steps"] - d0["steps"]
            return steps, (t1 - t0) / steps, collections.Counter({k: (c1[k] - c0[k]) / steps for k in c1})

        try:
            steps, step_s, per_step = run_in(net.names[0], lambda s=srv: asyncio.run(_load(s, trace, measure)))
        finally:
            srv.inst.stop()
            srv.inst.remove()
        print(f"{name}: {steps} steps, {1e3 * step_s:.1f} ms per step; per step:")
        for (kind, thread, what), v in sorted(per_step.items(), key=lambda kv: -kv[1]):
            if v >= 0.05:
                print(f"  {v:8.2f} {what:20} {kind} / {thread}")


def io_policy(net: NamespaceHosts, model: str, trace: Trace, common: list[str], rounds: int,
              window: float) -> None:
    srv = start_namespace_server(net, model, nnodes=2, ep_size=4, port=29500, http_port=8100, args=common)

    async def measure(client: Any, pids: set[int]) -> dict[int, list[tuple[float, float]]]:
        io = [int(t) for p in pids for t in os.listdir(f"/proc/{p}/task")
              if Path(f"/proc/{p}/task/{t}/comm").read_text().startswith("ZMQbg/IO")]
        out: dict[int, list[tuple[float, float]]] = {os.SCHED_BATCH: [], os.SCHED_OTHER: []}
        for k in range(rounds):
            for policy in (os.SCHED_BATCH, os.SCHED_OTHER)[::1 if k % 2 == 0 else -1]:
                for tid in io:
                    os.sched_setscheduler(tid, policy, os.sched_param(0))
                await asyncio.sleep(0.3)
                d0, t0 = await _dataplane(client), time.monotonic()
                await asyncio.sleep(window)
                d1, t1 = await _dataplane(client), time.monotonic()
                steps = d1["steps"] - d0["steps"]
                out[policy].append((1e3 * (t1 - t0) / steps,
                                    1e3 * (d1["exchange_critical_s"] - d0["exchange_critical_s"]) / steps))
        for tid in io:  # as eep left it
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        return out

    try:
        out = run_in(net.names[0], lambda: asyncio.run(_load(srv, trace, measure)))
    finally:
        srv.inst.stop()
        srv.inst.remove()
    for policy, name in ((os.SCHED_BATCH, "SCHED_BATCH"), (os.SCHED_OTHER, "SCHED_OTHER")):
        steps, exchange = zip(*out[policy])
        print(f"{name:12} ms per step: median {statistics.median(steps):.1f} "
              f"({', '.join(f'{s:.1f}' for s in steps)}); in the data plane: median {statistics.median(exchange):.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--window", type=float, default=12.0, help="seconds measured per instance")
    p = sub.add_parser("io-policy")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--window", type=float, default=3.0, help="seconds per policy and round")
    args = parser.parse_args()
    model = str(ensure_default_model(default_cache_dir(), DEFAULT_ARCH))
    trace = Trace(0, checkpoint_vocab(model), 32, 32)
    common = ["--dtype", "float32", "--max-model-len", str(trace.max_model_len), "--max-num-seqs", "8",
              "--failure-timeout", "1.0", "--rejoin", "auto"]
    with NamespaceHosts(2, prefix="eepprof") as net:
        if args.what == "cpu":
            cpu(net, model, trace, common, args.window)
        else:
            io_policy(net, model, trace, common, args.rounds, args.window)
    return 0


if __name__ == "__main__":
    sys.exit(main())
