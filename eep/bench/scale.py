"""`eep bench scale`: planned scale-up and scale-down under HTTP load (`POST /admin/scale`).

What `run_scale_bench` promises. One `eep serve --http` sized for `max_size` ranks and started on
`ep_size` (the skewed default DeepSeek-V3, `--enable-eplb` off: the scale's own rebalances
only), the failure bench's trace and clients (streaming completions, greedy, EOS ignored,
`concurrency` clients in a closed loop, `eep.bench.harness`). `steady_s` into the load it is
asked to scale to each size of `sizes` in turn (`POST /admin/scale`, an operation id each),
the next `settle_s` after the one before is done, and the load stops `settle_s` after the last.
A second server started on `ep_size` and never scaled serves every completed request again:
its tokens are the reference.

Figures (`summary`), per operation: `seconds` (request to done, from the operation's own
`duration_s`), `pause_s` (the longest stretch without a token from the request to 0.5 s after
done, less the normal gap; never below 0), `tokens_per_s_after` (over the settle window after
it), and `added` / `removed`; over the run `tokens_per_s_before` (before the first request),
`requests_lost`, `outputs_differing`, `pause_aa_s` (the same longest-gap figure over windows
as long as the longest operation's where nothing happened: before the first request, and from
1 s after each operation is done to the next; what the instrument reads, its A/A).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from eep.bench.harness import timeline as tl
from eep.bench.harness.clients import ClosedLoop, RequestRecord, Trace, http_client, membership, serve_reference, warm
from eep.bench.harness.record import frozen_gc, provenance
from eep.bench.harness.server import BenchFailed, LocalServer, System
from eep.bench.steady import checkpoint_vocab
from eep.errors import ConfigError

logger = logging.getLogger(__name__)

SCALE_TIMEOUT_S = 120.0
_POLL_S = 0.25


def run_scale_bench(model_path: str, *, ep_size: int = 4, max_size: int = 6, sizes: tuple[int, ...] = (6, 3),
                    redundant: int = 4, concurrency: int = 16, prompt_len: int = 32, output_len: int = 48,
                    steady_s: float = 8.0, settle_s: float = 8.0, failure_timeout_s: float = 1.0,
                    seed: int = 0) -> dict[str, Any]:
    if not sizes or any(not 1 <= s <= max_size for s in sizes) or ep_size > max_size or steady_s < 4:
        raise ConfigError(f"need sizes within 1..{max_size}, ep_size <= max_size and steady_s >= 4")
    trace = Trace(seed, checkpoint_vocab(model_path), prompt_len, output_len)
    common = ("--fault-policy", "repair", "--ep-num-redundant-experts", str(redundant))
    scaled = System("scaled", f"--ep-max-size {max_size}", (*common, "--ep-max-size", str(max_size)), False, False)
    reference = System("reference", "never scaled", common, False, False)
    # LocalServer gives each rank ceil(c / (ep_size - 1)) KV slots: c so that the smallest size
    # the load runs on holds every request
    room = -(-concurrency // min((ep_size, *sizes))) * (ep_size - 1)
    config = {"model_path": model_path, "ep_size": ep_size, "max_size": max_size, "sizes": list(sizes),
              "redundant": redundant, "concurrency": concurrency, "prompt_len": prompt_len,
              "output_len": output_len, "steady_s": steady_s, "settle_s": settle_s, "seed": seed}

    def server(system: System) -> LocalServer:
        return LocalServer(model_path, system, ep_size=ep_size, concurrency=max(room, concurrency), trace=trace,
                           failure_timeout_s=failure_timeout_s, dtype="bfloat16")

    with frozen_gc(), server(scaled) as srv, server(reference) as ref:
        out: dict[str, Any] = {"config": config, "provenance": provenance()}
        run, records = asyncio.run(_drive(srv, trace, concurrency, sizes, steady_s, settle_s))
        done = [r for r in records if r.complete]
        want = asyncio.run(serve_reference(ref, trace, sorted({r.index for r in done}), concurrency))
        run["outputs_differing"] = sum(r.token_ids != want[r.index] for r in done)
        out["run"] = run
    out["summary"] = _summary(run, records)
    return out


async def _drive(srv: LocalServer, trace: Trace, concurrency: int, sizes: tuple[int, ...], steady_s: float,
                 settle_s: float) -> tuple[dict[str, Any], list[RequestRecord]]:
    headers = {"Authorization": f"Bearer {srv.admin_key}"}
    async with http_client(srv, concurrency) as client:
        await warm(client, srv, trace, concurrency)
        load = ClosedLoop(client, srv, trace, clock=time.monotonic())
        ops: list[dict[str, Any]] = []
        stop_at = [float("inf")]
        load.keep_going = lambda: time.monotonic() - load.clock < stop_at[0]
        load.start(concurrency)
        await asyncio.sleep(steady_s)
        for n, size in enumerate(sizes):
            t0 = time.monotonic() - load.clock
            reply = await client.post("/admin/scale", json={"ep_size": size, "operation_id": f"bench-{n}"},
                                      headers=headers)
            if reply.status_code != 202:
                raise BenchFailed(f"scale to {size} refused: {reply.text}")
            op = await _wait(client, headers, f"bench-{n}", srv)
            op["t_requested"], op["t_done"] = t0, time.monotonic() - load.clock
            logger.info("  t=%4.1f s  scaled to %d in %.2f s (added %s, removed %s)", op["t_done"], size,
                        op["duration_s"], op["added"], op["removed"])
            ops.append(op)
            await asyncio.sleep(settle_s)
        stop_at[0] = time.monotonic() - load.clock
        await load.join()
        status = await membership(client)
    return {"operations": ops, "load_end": stop_at[0], "final_active": status["view"]["active"],
            "requests": len(load.records), "requests_lost": sum(not r.complete for r in load.records)}, load.records


async def _wait(client: Any, headers: dict[str, str], operation_id: str, srv: LocalServer) -> dict[str, Any]:
    deadline = time.monotonic() + SCALE_TIMEOUT_S
    while True:
        op = (await client.get(f"/admin/scale/{operation_id}", headers=headers)).json()
        if op.get("state") == "done":
            return op
        if op.get("state") != "running" or time.monotonic() > deadline:
            raise BenchFailed(f"scale operation {operation_id}: {op}; the server's log ends:\n{srv.log_tail()}")
        await asyncio.sleep(_POLL_S)


def _summary(run: dict[str, Any], records: list[RequestRecord]) -> dict[str, Any]:
    arrivals = tl.arrivals(records)
    bins = tl.token_bins(records, max(arrivals, default=run["load_end"]))
    ops = run["operations"]
    first = ops[0]["t_requested"]
    normal = tl.normal_gap(arrivals, tl.STEADY_FROM_S, first)
    rows = []
    for i, op in enumerate(ops):
        window_end = ops[i + 1]["t_requested"] if i + 1 < len(ops) else run["load_end"]
        rows.append({"ep_size": op["ep_size"], "from_ep_size": op["from_ep_size"], "seconds": op["duration_s"],
                     "pause_s": max(0.0, tl.longest_gap(arrivals, op["t_requested"], op["t_done"] + 0.5) - normal),
                     "tokens_per_s_after": tl.rate(bins, op["t_done"] + 1.0, window_end),
                     "added": op["added"], "removed": op["removed"]})
    # the A/A of the pause: windows as long as the longest operation's where nothing happened
    # (before the first request, and from 1 s after each operation is done to the next request)
    width = max(op["t_done"] + 0.5 - op["t_requested"] for op in ops)
    calm = [(tl.STEADY_FROM_S, first)] + [(op["t_done"] + 1.0, ops[i + 1]["t_requested"] if i + 1 < len(ops)
                                           else run["load_end"]) for i, op in enumerate(ops)]
    quiet = [max(0.0, tl.longest_gap(arrivals, a + k * 0.25, a + k * 0.25 + width) - normal)
             for a, b in calm for k in range(max(0, int((b - a - width) / 0.25) + 1))]
    return {"operations": rows, "tokens_per_s_before": tl.rate(bins, tl.STEADY_FROM_S, first),
            "normal_gap_s": normal, "requests": run["requests"], "requests_lost": run["requests_lost"],
            "outputs_differing": run["outputs_differing"], "final_active": run["final_active"],
            "pause_aa_s": {"max": max(quiet, default=None), "n": len(quiet)}}


def summary_table(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [f"tokens/s before: {s['tokens_per_s_before']:.0f}; normal gap {s['normal_gap_s'] * 1e3:.0f} ms; "
             f"pause A/A (max of {s['pause_aa_s']['n']} quiet windows): {_f(s['pause_aa_s']['max'])} s",
             "| scale | seconds (request to done) | pause s | tokens/s after | added | removed |", "|---|---|---|---|---|---|"]
    for op in s["operations"]:
        lines.append(f"| {op['from_ep_size']} -> {op['ep_size']} | {op['seconds']:.2f} | {op['pause_s']:.3f} | "
                     f"{op['tokens_per_s_after']:.0f} | {op['added']} | {op['removed']} |")
    lines.append(f"requests {s['requests']}, lost {s['requests_lost']}, outputs differing {s['outputs_differing']}; "
                 f"active at the end {s['final_active']}")
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
