"""The failure experiment across hosts: one eep instance on namespace hosts, over HTTP.

What `run_hosts_bench` promises. `hosts` network namespaces joined by a bridge
(`eep.testbed.netns`), `ranks_per_host` ranks on each, and three real servers started and
stopped here, all answering over HTTP on host 0:
- `cross_host`: eep across the hosts (`--nnodes`, shm within a host, ZeroMQ between hosts),
  `--rejoin auto`, with enough spare slots that the survivors of one host's loss hold every
  expert;
- `single_host`: the same ranks as one instance on host 0 (shm only): the speed a host split
  should not lose; it also serves the fault-free reference outputs;
- `gloo`: the same ranks across the same hosts on gloo's all_to_all, fixed membership;
- `insecure_data_plane`: `cross_host` with `--insecure-data-plane` (the ranks' ZeroMQ data
  addresses without CURVE): the A/B of what authenticating and encrypting the data plane costs.
Every server across hosts runs with its cluster secret (authenticated control connections).
Steady decode speed: `cross_host` against each other server in alternating slices of the same
closed-loop load on the same requests (as `eep bench failure`: `eep.bench.harness.interleaved`,
the median of the rounds' same-work ratios). Then one timed run of `cross_host` under the same trace and
clients as `eep bench failure`, through this schedule:
  1. `kill_at_s`: a rank on host 1 SIGKILLed (it is restarted at once: rejoin auto);
  2. once it is back, +`gap_s`: host 1 lost: its link taken down (no FIN, no RST reaches
     anyone) and every process in it SIGKILLed;
  3. `return_after_s` later its link comes back and a new agent starts there; its ranks rejoin;
  4. once they are back, +`gap_s`: host 1 partitioned (link down, processes alive) for
     `partition_s` (> the failure timeout), then healed; its agent, cut off from the
     controller, has stopped its ranks and exited by then; a new agent is started; its
     ranks rejoin;
  5. `tail_s` more of load.
Figures (`summary`): `cross_host_over_single_host`, `cross_host_over_gloo` (steady ratios);
`host_loss_detection_s` (the loss to the controller's first `fault_seen` of it, from the
server's events); `host_loss_pause_s`, `partition_pause_s`, `remote_kill_pause_s` (the
longest stretch without a token after the fault and before the return, less `normal_gap_s`,
never below 0, as `eep bench failure`'s `recovery_pause_s`); `host_rejoin_pause_s` (the
longest such stretch within 1 s of each `rejoined` event of the host's ranks, less the
normal gap); `single_host_kill_pause_s` (the same SIGKILL of a rank on the one-host instance,
also `--rejoin auto`, for the remote kill's target); `exchange_critical_ms` per server and
`cross_host_exchange_speedup_over_gloo` / `cross_host_exchange_over_single_host`: the data
plane alone, per committed step over the steady slices (the sum over its dispatch/combine calls
of the shortest time any rank spent in the call: the last to arrive waits for no one), from the
servers' `dataplane` counters in `/membership`; `step_ms` per server (the wall time per
committed step in the steady slices: compute, exchange, the frontend's work);
`cross_host_over_insecure_data_plane` (the CURVE data plane's speed over the plain one's) and
`data_plane_auth` (both servers' step and exchange times per committed step, and the spread of
the single rounds' ratios: how far this A/B resolves);
`cross_host_over_gloo_ceiling` (`cross_host_over_gloo` had the cross-host exchange taken no
time at all: its ratio times the cross-host step over the step less its exchange, the bound
any transport meets at this load on this machine); `steps_committed_by_fenced_ranks` (the controller's count of
committed steps with an answer from a process outside the view); `requests_lost`;
`outputs_differing` (against the single-host server, fault-free).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import statistics
import time
import uuid
from typing import Any

from eep.bench.harness import (
    BenchFailed,
    ClosedLoop,
    NamespaceServer,
    RequestRecord,
    System,
    Trace,
    drive_fault_run,
    http_client,
    interleaved,
    membership,
    provenance,
    save_timeline_plot,
    serve_reference,
    start_namespace_server,
    timeline,
    warm,
    warm_all,
)
from eep.bench.steady import checkpoint_vocab
from eep.errors import ConfigError
from eep.testbed.netns import NamespaceHosts, available, run_in

logger = logging.getLogger(__name__)

_BACK_TIMEOUT_S = 120.0
_BACK_POLL_S = 0.1


def run_hosts_bench(
    model_path: str,
    *,
    hosts: int = 2,
    ranks_per_host: int = 2,
    concurrency: int = 16,
    prompt_len: int = 32,
    output_len: int = 32,
    failure_timeout_s: float = 1.0,
    steady_rounds: int = 8,
    steady_slice_s: float = 2.5,
    kill_at_s: float = 5.0,
    gap_s: float = 3.0,
    return_after_s: float = 3.0,
    partition_s: float = 2.5,
    tail_s: float = 3.0,
    dtype: str = "float32",
    seed: int = 0,
) -> dict[str, Any]:
    if (why := available()) is not None:
        raise ConfigError(f"eep bench hosts needs network namespaces: {why}")
    if hosts < 2 or ranks_per_host < 1 or partition_s <= failure_timeout_s:
        raise ConfigError("need >= 2 hosts, >= 1 rank per host and partition_s > failure_timeout_s")
    ep_size = hosts * ranks_per_host
    trace = Trace(seed, checkpoint_vocab(model_path), prompt_len, output_len)
    survivors = ep_size - ranks_per_host
    per_rank = -(-concurrency // survivors)  # the survivors of a host's loss hold every running request
    common = ["--dtype", dtype, "--max-model-len", str(trace.max_model_len), "--max-num-seqs", str(per_rank),
              "--failure-timeout", str(failure_timeout_s)]
    result: dict[str, Any] = {"config": {
        "hosts": hosts, "ranks_per_host": ranks_per_host, "concurrency": concurrency, "prompt_len": prompt_len,
        "output_len": output_len, "failure_timeout_s": failure_timeout_s, "steady_rounds": steady_rounds,
        "steady_slice_s": steady_slice_s, "dtype": dtype, "seed": seed,
    }}
    with NamespaceHosts(hosts, prefix=f"eepb{uuid.uuid4().hex[:5]}") as net, contextlib.ExitStack() as stack:
        h0 = net.names[0]
        logger.info("[1/4] servers: cross-host eep, the same ranks on one host, gloo across hosts")
        servers = _start_servers(net, model_path, stack, hosts=hosts, ep_size=ep_size, common=common)
        cross, single = servers["cross_host"], servers["single_host"]
        logger.info("[2/4] steady state: %d rounds of %.1f s slices against each", steady_rounds, steady_slice_s)
        steady = _steady(h0, servers, trace, concurrency=concurrency, rounds=steady_rounds, slice_s=steady_slice_s)
        servers["gloo"].stop()
        servers["insecure_data_plane"].stop()

        logger.info("[3/4] the same kill on one host (the remote kill's reference)")
        local = run_in(h0, lambda: asyncio.run(_single_kill(single, trace, concurrency, kill_at_s, ranks_per_host)))

        logger.info("[4/4] cross-host: remote rank kill, host loss and return, partition and heal")
        faults = _HostFaults(net, cross, ranks_per_host=ranks_per_host, kill_at_s=kill_at_s, gap_s=gap_s,
                             return_after_s=return_after_s, partition_s=partition_s, tail_s=tail_s)
        run = _cross_host_run(h0, faults, single, trace, concurrency)
    result |= _summary(run, local, steady)
    result["steady_state"] = steady
    result["run"] = run
    result["single_host_kill"] = local
    result["bin_s"] = timeline.BIN_S
    result |= provenance()
    return result


def _cross_host_run(h0: str, faults: _HostFaults, single: NamespaceServer, trace: Trace,
                    concurrency: int) -> dict[str, Any]:
    """The cross-host timed run on host `h0`, its completed requests checked against `single`'s outputs."""
    run, records = run_in(h0, lambda: asyncio.run(faults.run(trace, concurrency)))
    reference_needed = sorted({r.index for r in records if r.complete})
    reference = run_in(h0, lambda: asyncio.run(serve_reference(single, trace, reference_needed, concurrency)))
    run["outputs_differing"] = sum(r.token_ids != reference[r.index] for r in records if r.complete)
    return run


def _start_servers(net: NamespaceHosts, model_path: str, stack: contextlib.ExitStack, *, hosts: int, ep_size: int,
                   common: list[str]) -> dict[str, NamespaceServer]:
    """The four servers, each stopped when `stack` closes (a second stop is a no-op)."""
    def start(port: int, http_port: int, args: list[str], nnodes: int = hosts,
              env: dict[str, str] | None = None) -> NamespaceServer:
        srv = start_namespace_server(net, model_path, nnodes=nnodes, ep_size=ep_size, port=port,
                                     http_port=http_port, args=[*common, *args], env=env)
        stack.callback(srv.stop)
        return srv

    return {
        # default spare slots: one host's loss is covered
        "cross_host": start(29500, 8100, ["--rejoin", "auto"]),
        # --rejoin auto as the cross-host server: after the same kill both start a new rank at once
        "single_host": start(29600, 8200, ["--rejoin", "auto"], nnodes=1),
        # stopped after the steady state
        "gloo": start(29700, 8300, ["--ep-backend", "gloo", "--fault-policy", "none", "--allow-unauthenticated-gloo"],
                      env={"GLOO_SOCKET_IFNAME": "eth0"}),
        "insecure_data_plane": start(29800, 8400, ["--rejoin", "auto", "--insecure-data-plane"]),
    }


def _steady(h0: str, servers: dict[str, NamespaceServer], trace: Trace, *, concurrency: int, rounds: int,
            slice_s: float) -> dict[str, Any]:
    """`cross_host` interleaved against each other server, and every server's data-plane time
    per step; each part on host `h0`, in its own event loop (and `run_in`'s time bound)."""
    run_in(h0, lambda: asyncio.run(warm_all(dict(servers), trace, concurrency)))
    before = run_in(h0, lambda: asyncio.run(_dataplanes(servers)))
    steady: dict[str, Any] = {}
    cross = servers["cross_host"]
    for name, other in servers.items():
        if name != "cross_host":
            steady[name] = run_in(h0, lambda n=name, o=other: asyncio.run(interleaved(  # type: ignore[misc]
                {"cross_host": cross, n: o}, trace, concurrency=concurrency, rounds=rounds, slice_s=slice_s)))
    after = run_in(h0, lambda: asyncio.run(_dataplanes(servers)))
    steady["dataplane"] = {name: _per_step(before[name], after[name]) for name in servers}
    return steady


async def _dataplanes(servers: dict[str, NamespaceServer]) -> dict[str, dict[str, float]]:
    """Each server's data-plane counters (`dataplane` of /membership: committed steps, seconds
    inside dispatch/combine, and the transport's own part of them)."""
    out = {}
    for name, srv in servers.items():
        async with http_client(srv, 1) as client:
            out[name] = (await membership(client))["dataplane"]
    return out


def _per_step(a: dict[str, float], b: dict[str, float]) -> dict[str, float | None]:
    steps = b["steps"] - a["steps"]
    if steps <= 0:
        return {"steps": 0, "exchange_ms": None, "exchange_critical_ms": None}
    return {"steps": steps, "exchange_ms": 1e3 * (b["exchange_s"] - a["exchange_s"]) / steps,
            "exchange_critical_ms": 1e3 * (b["exchange_critical_s"] - a["exchange_critical_s"]) / steps}


async def _single_kill(srv: NamespaceServer, trace: Trace, concurrency: int, kill_at_s: float,
                       ranks_per_host: int) -> dict[str, Any]:
    """SIGKILL of the rank the cross-host run kills, on the one-host instance: its pause."""
    victim = ranks_per_host  # the first rank of host 1 in the cross-host instance
    system = System("single_host", "one host (shm)", (), kill=True, rejoin=False)
    run, _ = await drive_fault_run(srv, system, trace, concurrency=concurrency, victim=victim,
                                   fault_at_s=kill_at_s, rejoin_after_s=3.0, tail_s=0.5)
    return {k: run.get(k) for k in ("pause_after_kill_s", "longest_gap_after_kill_s", "normal_gap_s",
                                    "requests_lost", "times")}


class _HostFaults:
    """The cross-host run's schedule (module docstring) under the closed loop, on its clock."""

    def __init__(self, net: NamespaceHosts, srv: NamespaceServer, *, ranks_per_host: int, kill_at_s: float,
                 gap_s: float, return_after_s: float, partition_s: float, tail_s: float) -> None:
        self.net, self.srv = net, srv
        self.kill_at_s, self.gap_s, self.return_after_s = kill_at_s, gap_s, return_after_s
        self.partition_s, self.tail_s = partition_s, tail_s
        self.host1 = list(range(ranks_per_host, 2 * ranks_per_host))
        self.times: dict[str, float] = {}
        self.client: Any = None
        self.clock = 0.0

    def now(self) -> float:
        return time.monotonic() - self.clock

    async def run(self, trace: Trace, concurrency: int) -> tuple[dict[str, Any], list[RequestRecord]]:
        running = {"on": True}
        async with http_client(self.srv, concurrency) as client:
            self.client = client
            await warm(client, self.srv, trace, concurrency)
            self.clock, wall0 = time.monotonic(), time.time()
            load = ClosedLoop(client, self.srv, trace, clock=self.clock, keep_going=lambda: running["on"])
            load.start(concurrency)
            try:
                await self._schedule()
            finally:
                running["on"] = False
                await load.join(return_exceptions=True)
            status = await membership(client)
        records = load.records
        self.times["load_end"] = max((t for r in records for t, _ in r.chunks), default=self.now())
        events = [{**e, "t": e["time"] - wall0} for e in status.get("events", [])]
        return _analyse(records, self.times, events, self.host1, status), records

    async def _schedule(self) -> None:
        await asyncio.sleep(self.kill_at_s)
        await self._remote_kill()
        await asyncio.sleep(self.gap_s)
        await self._host_loss()
        await asyncio.sleep(self.gap_s)
        await self._partition()
        await asyncio.sleep(self.tail_s)

    async def _remote_kill(self) -> None:
        pids = (await membership(self.client))["pids"]
        self.times["remote_kill"] = self.now()
        os.kill(pids[self.host1[0]], signal.SIGKILL)
        logger.info("  t=%5.1f s  SIGKILL rank %d on host 1", self.now(), self.host1[0])
        await self._until_back("remote_kill")

    async def _host_loss(self) -> None:
        self.times["host_loss"] = self.now()
        self.net.cut(1)
        self.net.kill_all(1)
        logger.info("  t=%5.1f s  host 1 lost (link down, every process killed)", self.now())
        await asyncio.to_thread(self.srv.inst.agents[1].wait, 10)
        await asyncio.sleep(self.return_after_s)
        self.net.heal(1)
        self.times["host_return"] = self.now()
        self.srv.inst.start_agent(1)
        logger.info("  t=%5.1f s  host 1 returns (a new agent)", self.now())
        await self._until_back("host_return")

    async def _partition(self) -> None:
        self.times["partition"] = self.now()
        self.net.cut(1)
        logger.info("  t=%5.1f s  host 1 partitioned", self.now())
        await asyncio.sleep(self.partition_s)
        self.net.heal(1)
        self.times["heal"] = self.now()
        logger.info("  t=%5.1f s  healed", self.now())
        code = await asyncio.to_thread(self.srv.inst.agents[1].wait, 30)
        self.times["fenced_agent_exit_code"] = code
        self.srv.inst.start_agent(1)
        self.times["partition_return"] = self.now()
        await self._until_back("partition_return")

    async def _until_back(self, what: str) -> None:
        deadline = self.now() + _BACK_TIMEOUT_S
        while not set(self.host1) <= set((await membership(self.client))["view"]["active"]):
            if self.now() > deadline:
                raise BenchFailed(f"host 1's ranks not back within {_BACK_TIMEOUT_S:.0f} s after {what}; "
                                  f"log:\n{self.srv.log_tail()}")
            await asyncio.sleep(_BACK_POLL_S)
        self.times[f"{what}_back"] = self.now()
        logger.info("  t=%5.1f s  host 1's ranks are back (%s)", self.now(), what)


def _analyse(records: list[RequestRecord], times: dict[str, float], events: list[dict[str, Any]], host1: list[int],
             status: dict[str, Any]) -> dict[str, Any]:
    arrivals = timeline.arrivals(records)
    bins = timeline.token_bins(records, times["load_end"])
    normal = timeline.normal_gap(arrivals, timeline.STEADY_FROM_S, times["remote_kill"])

    def pause(start: str, stop: str) -> tuple[float, float]:
        gap = timeline.longest_gap(arrivals, times[start], times[stop])
        return gap, max(0.0, gap - normal)

    seen = [e for e in events if e["kind"] == "fault_seen" and e["rank"] in host1]
    loss_seen = [e["t"] for e in seen if times["host_loss"] <= e["t"] < times["host_return"]]
    partition_seen = [e["t"] for e in seen if times["partition"] <= e["t"] < times["partition_return"]]
    rejoins = [e["t"] for e in events if e["kind"] == "rejoined" and e["rank"] in host1
               and e["t"] >= times["host_return"]]
    run: dict[str, Any] = {
        "times": times, "events": events, "tokens_per_bin": bins, "normal_gap_s": normal,
        "tokens_per_s_steady": timeline.rate(bins, timeline.STEADY_FROM_S, times["remote_kill"]),
        "requests": len(records), "requests_completed": sum(r.complete for r in records),
        "requests_lost": sum(not r.complete for r in records),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "host_loss_detection_s": min(loss_seen) - times["host_loss"] if loss_seen else None,
        "partition_detection_s": min(partition_seen) - times["partition"] if partition_seen else None,
        "host_rejoin_pauses_s": [max(0.0, timeline.longest_gap(arrivals, t - 1.0, t + 1.0) - normal)
                                 for t in rejoins],
        "steps_committed_by_fenced_ranks": status.get("steps_committed_by_fenced_ranks"),
    }
    run["remote_kill_longest_gap_s"], run["remote_kill_pause_s"] = pause("remote_kill", "remote_kill_back")
    run["host_loss_longest_gap_s"], run["host_loss_pause_s"] = pause("host_loss", "host_return")
    run["partition_longest_gap_s"], run["partition_pause_s"] = pause("partition", "heal")
    return run


def _summary(run: dict[str, Any], local: dict[str, Any], steady: dict[str, Any]) -> dict[str, Any]:
    ratios = {name: statistics.median(s["round_ratios"]) if s["round_ratios"] else None
              for name, s in steady.items() if name != "dataplane"}
    plane = steady.get("dataplane", {})

    def speedup(of: str) -> float | None:  # the other's transport time per step over the cross-host one's
        a, b = plane.get(of, {}).get("exchange_critical_ms"), plane.get("cross_host", {}).get("exchange_critical_ms")
        return a / b if a and b else None

    step_ms = _step_ms(steady)
    cross_step, cross_plane = step_ms.get("cross_host"), plane.get("cross_host", {}).get("exchange_critical_ms")
    gloo_ratio = ratios.get("gloo")
    # what cross_host_over_gloo would be if eep's exchange took no time at all (everything else
    # as measured): the most any transport could give on this machine at this load
    ceiling = (gloo_ratio * cross_step / (cross_step - cross_plane)
               if gloo_ratio and cross_step and cross_plane is not None and cross_step > cross_plane else None)

    plain_rounds = steady.get("insecure_data_plane", {}).get("round_ratios") or []
    auth = {  # the A/B of the CURVE data plane against the plain one, same hosts, same load, one run
        "step_ms": {"curve": step_ms.get("cross_host"), "insecure": step_ms.get("insecure_data_plane")},
        "exchange_critical_ms": {"curve": plane.get("cross_host", {}).get("exchange_critical_ms"),
                                 "insecure": plane.get("insecure_data_plane", {}).get("exchange_critical_ms")},
        "round_ratio_min": min(plain_rounds, default=None), "round_ratio_max": max(plain_rounds, default=None),
    }
    summary = {
        "cross_host_over_single_host": ratios.get("single_host"),
        "cross_host_over_gloo": ratios.get("gloo"),
        "cross_host_over_insecure_data_plane": ratios.get("insecure_data_plane"),
        "data_plane_auth": auth,
        # the data plane alone: its own time per step (eep bench steady's exchange_critical_ms)
        "exchange_critical_ms": {name: v.get("exchange_critical_ms") for name, v in plane.items()},
        "cross_host_exchange_speedup_over_gloo": speedup("gloo"),
        "cross_host_exchange_over_single_host": (1 / s) if (s := speedup("single_host")) else None,
        "step_ms": step_ms,
        "cross_host_over_gloo_ceiling": ceiling,
        "host_loss_detection_s": run["host_loss_detection_s"],
        "host_loss_pause_s": run["host_loss_pause_s"],
        "host_rejoin_pause_s": max(run["host_rejoin_pauses_s"], default=None),
        "partition_pause_s": run["partition_pause_s"],
        "remote_kill_pause_s": run["remote_kill_pause_s"],
        "single_host_kill_pause_s": local["pause_after_kill_s"],
        "steps_committed_by_fenced_ranks": run["steps_committed_by_fenced_ranks"],
        "requests_lost": run["requests_lost"],
        "outputs_differing": run["outputs_differing"],
        "normal_gap_s": run["normal_gap_s"],
    }
    return {"summary": summary}


def _step_ms(steady: dict[str, Any]) -> dict[str, float]:
    """Each server's wall time per committed step under the steady load (everything a step
    cycle holds: the ranks' compute and exchange, the frontend's scheduling, sampling and
    streaming): the median over its slices of the counted stretch over the steps in it."""
    per: dict[str, list[float]] = {}
    for name, s in steady.items():
        if name == "dataplane":
            continue
        for sl in s["slices"]:
            if sl.get("steps"):
                per.setdefault(sl["server"], []).append(1e3 * (s["slice_s"] - s["ramp_s"]) / sl["steps"])
    return {name: statistics.median(v) for name, v in per.items()}


def add_targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each met or not, from `summary` and the configured failure timeout."""
    s, ft = result["summary"], result["config"]["failure_timeout_s"]
    checks = {
        "cross_host_over_gloo_ge_2": ("cross_host_over_gloo", lambda v: v >= 2),
        "cross_host_over_single_host_ge_0.8": ("cross_host_over_single_host", lambda v: v >= 0.8),
        "host_loss_detection_le_ft_plus_0.2": ("host_loss_detection_s", lambda v: v <= ft + 0.2),
        "host_loss_pause_le_ft_plus_0.5": ("host_loss_pause_s", lambda v: v <= ft + 0.5),
        "remote_kill_pause_within_2x_single_host": (
            "remote_kill_pause_s", lambda v: v <= 2 * max(s["single_host_kill_pause_s"] or 0.0, s["normal_gap_s"])),
        "no_step_from_fenced_ranks": ("steps_committed_by_fenced_ranks", lambda v: v == 0),
        "host_rejoin_pause_le_0.1": ("host_rejoin_pause_s", lambda v: v <= 0.1),
        "no_request_lost": ("requests_lost", lambda v: v == 0),
        "no_output_differing": ("outputs_differing", lambda v: v == 0),
    }
    result["targets_met"] = {name: check(s[key]) for name, (key, check) in checks.items() if s.get(key) is not None}
    return result


def summary_table(result: dict[str, Any]) -> str:
    lines = [f"{k:34s} {v:.3f}" if isinstance(v, float) else f"{k:34s} {v}" for k, v in result["summary"].items()]
    lines += [f"target {k:27s} {'met' if v else 'NOT MET'}" for k, v in result.get("targets_met", {}).items()]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Throughput over time of the cross-host run, each fault and return marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = result["run"]
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=120)
    ax.plot(*timeline.moving_rates(run["tokens_per_bin"]), color="tab:blue", linewidth=1.5,
            label=f"eep on {result['config']['hosts']} hosts x {result['config']['ranks_per_host']} ranks")
    t = run["times"]
    marks = [("remote_kill", "SIGKILL rank on host 1", "black", "-"), ("host_loss", "host 1 lost", "tab:red", "-"),
             ("host_return", "host 1 returns", "tab:green", ":"), ("partition", "partition", "tab:purple", "-"),
             ("heal", "healed", "tab:purple", ":"), ("partition_return", "agent restarted", "tab:green", ":")]
    for key, text, color, style in marks:
        if key in t:
            ax.axvline(t[key], color=color, linestyle=style, linewidth=1)
            ax.annotate(text, (t[key], 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=8,
                        va="top", ha="right", color=color)
    s = result["summary"]
    ax.set_title(f"committed tokens/s across hosts (0.5 s average) — host loss pause {s['host_loss_pause_s']:.2f} s, "
                 f"partition pause {s['partition_pause_s']:.2f} s", fontsize=10)
    save_timeline_plot(fig, ax, path)

