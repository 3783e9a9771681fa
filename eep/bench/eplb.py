"""`eep bench eplb`: online expert load balancing on a skewed model, under HTTP load, through a
rank failure and its rejoin.

What `run_eplb_bench` promises. Two real `eep serve --http` processes on the same skewed model
(`eep model init --arch deepseek_v3 --router-skew ALPHA`), the same ranks, redundant experts
and spare slots, both with `--fault-policy repair` (so both count the expert load):
- `static`: the layout placed at start for a uniform load, never changed (what eep did before);
- `eplb`: `--enable-eplb`: the layout follows the observed load.
The failure bench's trace and clients (`eep.bench.harness`): streaming completions, greedy,
EOS ignored, `concurrency` clients in a closed loop.
1. Balance: the `eplb` server is driven alone until it has switched to a balanced layout
   (its first rebalance switched and no moves in flight), at most `balance_s`.
2. Steady state: the two servers in alternating slices of the same load on the same requests
   (`steady_rounds` rounds, ABBA: `eep.bench.harness.interleave`); `tokens_per_s_ratio` is the
   median of the rounds' `eplb` over `static` speed on the same work. With `calibrate`, a
   second `static` server is compared with the first in the same way first: the A/A spread,
   how far this host resolves the ratio.
3. Timed run on `eplb`: the closed loop, rank `victim` SIGKILLed at `fault_at_s`, asked back
   `rejoin_after_s` later, `tail_s` more after it is back; /membership sampled every 0.25 s
   (the imbalance over time, the rebalances switched).
Every completed request's tokens are compared with the same request served by `static`.

Summary figures: `imbalance_before` (the mean over MoE layers of the most loaded rank's load
over the mean rank load, of `static`'s layout under its own recent load window);
`imbalance_after` (the same of `eplb`, the median of the samples before the kill);
`imbalance_after_repair` (the last sample on the survivors, before the rejoin request) and
`imbalance_after_rejoin` (the last sample of the run); `tokens_per_s_ratio` (+ `_min`, `_max`,
`aa_ratio_*` with `calibrate`); `expert_max_ms_per_step` / `expert_mean_ms_per_step` of each
server over its steady slices (the longest rank's expert compute per step, and the ranks'
mean: what balance shortens); `rebalance_pause_s` (around each switch of the timed run before
the kill, the longest stretch without a token within 0.5 s of it, less the normal gap; the
largest; `rebalance_pause_aa_s`: the same figure every half second at least 1 s from a switch,
its median and max: what the instrument reads where nothing happened); `bytes_moved_per_rebalance`, `moves_from_peers`, `rebalances` (switched during the
whole bench); `requests_lost`, `outputs_differing`; `bookkeeping_ratio` (the share of
`eplb`'s CPU in its steady slices not spent counting the expert load and planning and
switching rebalances: the ledger's `expert_load` and `eplb`).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import Any

from eep.bench.harness import timeline as tl
from eep.bench.harness.clients import (
    ClosedLoop,
    RequestRecord,
    Trace,
    http_client,
    membership,
    serve_reference,
    warm,
)
from eep.bench.harness.faultrun import drive_fault_run
from eep.bench.harness.interleave import STEADY_FIRST_INDEX, interleaved
from eep.bench.harness.record import frozen_gc, provenance, save_timeline_plot
from eep.bench.harness.server import BenchFailed, LocalServer, System
from eep.bench.steady import checkpoint_vocab
from eep.errors import ConfigError

logger = logging.getLogger(__name__)

_BALANCE_POLL_S = 0.5


def systems(redundant: int, spare: int | None, iterations: int, window: int) -> tuple[System, System]:
    common = ("--fault-policy", "repair", "--ep-num-redundant-experts", str(redundant),
              *(("--ep-spare-slots", str(spare)) if spare is not None else ()))
    static = System("static", "EPLB off (the start layout)", common, kill=False, rejoin=False)
    eplb = System("eplb", "EPLB on", (*common, "--enable-eplb", "--eplb-rebalance-num-iterations", str(iterations),
                                     "--eplb-window-steps", str(window)), kill=True, rejoin=True)
    return static, eplb


def run_eplb_bench(model_path: str, *, ep_size: int = 4, redundant: int = 8, spare: int | None = 8,
                   concurrency: int = 16, prompt_len: int = 32, output_len: int = 48, iterations: int = 100,
                   window: int = 300, balance_s: float = 60.0, steady_rounds: int = 6, steady_slice_s: float = 5.0,
                   calibrate: bool = False, victim: int = 1, fault_at_s: float = 8.0, rejoin_after_s: float = 20.0,
                   tail_s: float = 20.0, failure_timeout_s: float = 1.0, seed: int = 0) -> dict[str, Any]:
    if not 0 <= victim < ep_size or ep_size < 2 or steady_rounds < 1 or steady_slice_s < 1.5:
        raise ConfigError("need ep_size >= 2, a victim in 0..ep_size-1, steady_rounds >= 1, steady_slice_s >= 1.5")
    trace = Trace(seed, checkpoint_vocab(model_path), prompt_len, output_len)
    static, eplb = systems(redundant, spare, iterations, window)

    def server(system: System) -> LocalServer:
        return LocalServer(model_path, system, ep_size=ep_size, concurrency=concurrency, trace=trace,
                           failure_timeout_s=failure_timeout_s, dtype="bfloat16")

    config = {"model_path": model_path, "ep_size": ep_size, "redundant": redundant, "spare": spare,
              "concurrency": concurrency, "prompt_len": prompt_len, "output_len": output_len,
              "eplb_rebalance_num_iterations": iterations, "eplb_window_steps": window, "balance_s": balance_s,
              "steady_rounds": steady_rounds, "steady_slice_s": steady_slice_s, "calibrate": calibrate,
              "victim": victim, "fault_at_s": fault_at_s, "rejoin_after_s": rejoin_after_s, "tail_s": tail_s,
              "failure_timeout_s": failure_timeout_s, "seed": seed, "systems": {s.name: s.serve_args for s in (static, eplb)}}
    with frozen_gc(), server(static) as a, server(eplb) as b:
        out: dict[str, Any] = {"config": config, "provenance": provenance()}
        if calibrate:
            with server(static) as a2:
                logger.info("A/A: two static servers in alternating slices")
                out["aa"] = asyncio.run(interleaved({"static": a, "static2": a2}, trace, concurrency=concurrency,
                                                    rounds=steady_rounds, slice_s=steady_slice_s))
        logger.info("balancing the eplb server")
        out["balance"] = asyncio.run(_balance(b, trace, concurrency, balance_s))
        logger.info("steady state: eplb and static in alternating slices")
        books0 = {name: asyncio.run(_status(srv)) for name, srv in (("eplb", b), ("static", a))}
        out["steady"] = asyncio.run(interleaved({"eplb": b, "static": a}, trace, concurrency=concurrency,
                                                rounds=steady_rounds, slice_s=steady_slice_s))
        books1 = {name: asyncio.run(_status(srv)) for name, srv in (("eplb", b), ("static", a))}
        out["static_status"] = books1["static"]["eplb"]
        logger.info("timed run on eplb: rank %d killed at %.0f s, asked back %.0f s later", victim, fault_at_s,
                    rejoin_after_s)
        samples: list[dict[str, Any]] = []
        run, records = asyncio.run(drive_fault_run(b, eplb, trace, concurrency=concurrency, victim=victim,
                                                   fault_at_s=fault_at_s, rejoin_after_s=rejoin_after_s, tail_s=tail_s,
                                                   sampler=_sampler(samples)))
        run["samples"] = samples
        run["rebalance_pauses_s"], run["quiet_pauses_s"] = _rebalance_pauses(run, records)
        run["outputs_differing"] = asyncio.run(_differing(a, trace, records, concurrency))
        out["timed"] = run
        out["final_status"] = asyncio.run(_status(b))["eplb"]
    out["per_step"] = {name: _per_step(books0[name], books1[name]) for name in ("eplb", "static")}
    out["summary"] = _summary(out)
    return out


async def _status(srv: LocalServer) -> dict[str, Any]:
    async with http_client(srv, 1) as client:
        return await membership(client)


async def _balance(srv: LocalServer, trace: Trace, concurrency: int, limit_s: float) -> dict[str, Any]:
    """Drive `srv` alone until its first rebalance switched and none is in flight (or `limit_s`)."""
    async with http_client(srv, concurrency) as client:
        await warm(client, srv, trace, concurrency)
        clock = time.monotonic()
        load = ClosedLoop(client, srv, trace, clock=clock, first_index=STEADY_FIRST_INDEX // 2)
        load.start(concurrency)
        status: dict[str, Any] = {}
        samples = []
        settled_at = None
        while time.monotonic() - clock < limit_s:
            await asyncio.sleep(_BALANCE_POLL_S)
            status = (await membership(client))["eplb"]
            now = time.monotonic() - clock
            samples.append({"t": now, "imbalance_mean": status["imbalance_mean"], "switched": status["switched"]})
            if settled_at is None and status["switched"] >= 1 and not status["moves_in_flight"]:
                settled_at = now
            if settled_at is not None and now >= max(settled_at + 5.0, 10.0):  # a few more periods for the picture
                break
        await load.cancel()
    if not status.get("switched"):
        raise BenchFailed(f"the eplb server did not rebalance within {limit_s:.0f} s: {status}")
    return {"seconds": time.monotonic() - clock, "first_switch_s": settled_at, "imbalance_mean": status["imbalance_mean"],
            "samples": samples, "rebalances": status["rebalances"]}


def _sampler(samples: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    async def sample(client: Any, now: float) -> None:
        status = await membership(client)
        eplb = status["eplb"]
        samples.append({"t": now, "imbalance_mean": eplb["imbalance_mean"], "imbalance_max": eplb["imbalance_max"],
                        "active": len(status["view"]["active"]), "switched": eplb["switched"],
                        "moves_in_flight": eplb["moves_in_flight"]})
    return sample


async def _differing(reference_server: LocalServer, trace: Trace, records: list[RequestRecord],
                     concurrency: int) -> int:
    done = [r for r in records if r.complete]
    want = await serve_reference(reference_server, trace, sorted({r.index for r in done}), concurrency)
    return sum(r.token_ids != want[r.index] for r in done)


def _per_step(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    """ms per committed step of the longest rank's expert compute and the ranks' mean, and the
    ledger's bookkeeping, between two /membership reads."""
    d0, d1 = before["dataplane"], after["dataplane"]
    steps = d1["steps"] - d0["steps"]
    a0, a1 = before["accounting"], after["accounting"]
    cpu = a1["cpu_s"] - a0["cpu_s"]
    stats = sum(a1["bookkeeping_cpu_s"][k] - a0["bookkeeping_cpu_s"].get(k, 0.0) for k in ("expert_load", "eplb"))
    return {"steps": steps,
            "expert_max_ms": 1e3 * (d1["expert_max_s"] - d0["expert_max_s"]) / steps if steps else None,
            "expert_mean_ms": 1e3 * (d1["expert_mean_s"] - d0["expert_mean_s"]) / steps if steps else None,
            "exchange_ms": 1e3 * (d1["exchange_s"] - d0["exchange_s"]) / steps if steps else None,
            "eplb_share_of_cpu": stats / cpu if cpu > 0 else None}


def _summary(out: dict[str, Any]) -> dict[str, Any]:
    run, steady = out["timed"], out["steady"]
    samples = run["samples"]
    kill = run["times"].get("kill", float("inf"))
    rejoin = run["times"].get("rejoin_requested", float("inf"))
    before_kill = [s["imbalance_mean"] for s in samples if s["t"] < kill]
    on_survivors = [s for s in samples if kill < s["t"] < rejoin and s["active"] < out["config"]["ep_size"]]
    ratios = steady["round_ratios"]
    switched = [r for r in out["final_status"]["rebalances"] if r["outcome"] == "switched"]
    summary: dict[str, Any] = {
        "imbalance_before": out["static_status"]["imbalance_mean"],
        "imbalance_after": statistics.median(before_kill) if before_kill else None,
        "imbalance_after_repair": on_survivors[-1]["imbalance_mean"] if on_survivors else None,
        "imbalance_after_rejoin": samples[-1]["imbalance_mean"] if samples else None,
        "tokens_per_s_ratio": statistics.median(ratios) if ratios else None,
        "tokens_per_s_ratio_min": min(ratios, default=None), "tokens_per_s_ratio_max": max(ratios, default=None),
        "rebalance_pause_s": max(run["rebalance_pauses_s"], default=None),
        "rebalance_pause_aa_s": {"median": statistics.median(run["quiet_pauses_s"]) if run["quiet_pauses_s"] else None,
                                 "max": max(run["quiet_pauses_s"], default=None), "n": len(run["quiet_pauses_s"])},
        "bytes_moved_per_rebalance": statistics.mean(r["bytes_moved"] for r in switched) if switched else 0,
        "moves_from_peers": out["final_status"]["moves"]["peer"],
        "moves_by_source": out["final_status"]["moves"],
        "rebalances": out["final_status"]["switched"],
        "requests_lost": run["requests_lost"],
        "outputs_differing": run["outputs_differing"],
        "bookkeeping_ratio": (1.0 - out["per_step"]["eplb"]["eplb_share_of_cpu"]
                              if out["per_step"]["eplb"]["eplb_share_of_cpu"] is not None else None),
        "expert_max_ms_per_step": {k: v["expert_max_ms"] for k, v in out["per_step"].items()},
        "expert_mean_ms_per_step": {k: v["expert_mean_ms"] for k, v in out["per_step"].items()},
    }
    if "aa" in out:
        aa = out["aa"]["round_ratios"]
        summary |= {"aa_ratio": statistics.median(aa) if aa else None, "aa_ratio_min": min(aa, default=None),
                    "aa_ratio_max": max(aa, default=None)}
    return summary


def _rebalance_pauses(run: dict[str, Any], records: list[RequestRecord]) -> tuple[list[float], list[float]]:
    """Per rebalance switched in the timed run before the kill: the longest stretch without a
    token within 0.5 s of the switch, less the normal gap (never below 0). And the same figure
    at every half second of that stretch at least 1 s from any switch: what the instrument
    reads where nothing happened (its A/A)."""
    arrivals = tl.arrivals(records)
    kill = run["times"].get("kill", float("inf"))
    switches = [e["t"] for e in run["events"] if e["kind"] == "rebalanced" and 0.5 <= e["t"] < kill - 0.5]

    def pause(t: float) -> float:
        return max(0.0, tl.longest_gap(arrivals, t - 0.5, t + 0.5) - run["normal_gap_s"])

    quiet = [k / 2 for k in range(2, int(2 * (kill - 0.5)) + 1) if all(abs(k / 2 - t) >= 1.0 for t in switches)]
    return [pause(t) for t in switches], [pause(t) for t in quiet]


def summary_table(result: dict[str, Any]) -> str:
    s = result["summary"]
    rows = [f"imbalance (max/mean rank load): start layout {s['imbalance_before']:.3f}, with EPLB "
            f"{_f(s['imbalance_after'])}, after the repair {_f(s['imbalance_after_repair'])}, after the rejoin "
            f"{_f(s['imbalance_after_rejoin'])}",
            f"tokens/s EPLB over static {_f(s['tokens_per_s_ratio'])} (rounds {_f(s['tokens_per_s_ratio_min'])}-"
            f"{_f(s['tokens_per_s_ratio_max'])})" + (f"; A/A {_f(s['aa_ratio'])} ({_f(s['aa_ratio_min'])}-"
                                                     f"{_f(s['aa_ratio_max'])})" if "aa_ratio" in s else ""),
            f"longest rank's expert ms per step: static {_f(s['expert_max_ms_per_step']['static'])}, EPLB "
            f"{_f(s['expert_max_ms_per_step']['eplb'])} (mean rank {_f(s['expert_mean_ms_per_step']['static'])} / "
            f"{_f(s['expert_mean_ms_per_step']['eplb'])})",
            f"rebalances {s['rebalances']}, {s['bytes_moved_per_rebalance'] / 1e6:.2f} MB moved each, "
            f"{s['moves_from_peers']} experts from peers; pause around a switch {_f(s['rebalance_pause_s'])} s "
            f"(the same figure where nothing happened: median {_f(s['rebalance_pause_aa_s']['median'])}, max "
            f"{_f(s['rebalance_pause_aa_s']['max'])} s)",
            f"requests lost {s['requests_lost']}, outputs differing {s['outputs_differing']}, "
            f"bookkeeping ratio {_f(s['bookkeeping_ratio'], 4)}"]
    return "\n".join(rows)


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = result["timed"]
    fig, (cx, ax, bx) = plt.subplots(3, 1, figsize=(9, 8), gridspec_kw={"height_ratios": [1, 2, 1]})
    balance = result["balance"]["samples"]
    cx.plot([s["t"] for s in balance], [s["imbalance_mean"] for s in balance], color="tab:purple",
            label="EPLB on, from the start layout: imbalance (mean over layers)")
    cx.axhline(result["summary"]["imbalance_before"], color="gray", ls=":", label="EPLB off (start layout)")
    cx.set_xlabel("time since the balancing load started (s)")
    cx.set_ylabel("max / mean")
    cx.set_ylim(bottom=1.0)
    cx.grid(alpha=0.3)
    cx.legend(loc="upper right", fontsize=8)
    bx.sharex(ax)
    t, rate = tl.moving_rates(run["tokens_per_bin"])
    ax.plot(t, rate, label="EPLB on: tokens/s (1 s window)", color="tab:blue")
    for e in run["events"]:
        if e["kind"] == "rebalanced" and e["t"] >= 0:
            ax.axvline(e["t"], color="tab:green", alpha=0.3, lw=0.8)
            bx.axvline(e["t"], color="tab:green", alpha=0.3, lw=0.8)
    for key, label, color in (("kill", "rank SIGKILLed", "tab:red"), ("rejoin_requested", "rejoin asked", "tab:orange")):
        if key in run["times"]:
            ax.axvline(run["times"][key], color=color, ls="--", label=label)
            bx.axvline(run["times"][key], color=color, ls="--")
    ax.plot([], [], color="tab:green", alpha=0.5, label="a rebalance switched")
    samples = run["samples"]
    bx.plot([s["t"] for s in samples], [s["imbalance_mean"] for s in samples], color="tab:purple",
            label="EPLB on: imbalance (mean over layers)")
    bx.axhline(result["summary"]["imbalance_before"], color="gray", ls=":", label="EPLB off (start layout)")
    bx.set_ylabel("max / mean rank load")
    bx.set_ylim(bottom=1.0)
    bx.grid(alpha=0.3)
    bx.legend(loc="upper right", fontsize=8)
    cx.set_title(f"eep bench eplb: skewed model, {result['config']['ep_size']} ranks")
    save_timeline_plot(fig, ax, path)
