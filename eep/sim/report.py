"""`eep sim paper` and `eep sim scale`: the simulator's two reports (JSON, a picture).

What `run_paper` promises: the single-rank failure at EP 32 (DeepSeek-V3 on the H800 cluster
file, rank 16 lost at t = 30 s, a replacement rejoining when ready) through every system of
`eep.sim.systems.SYSTEMS`, at the constants' values and over their ranges (`_spread`); per
system the recovery pause, reintegration pause, time back to 95 % of the steady rate and the
time unavailable, each pause broken into its phases; the paper's figures beside them with the
relative error of each ((simulated - published) / published); and SGLang's table (1, 2, 4, 8
and 16 of 32 ranks lost) simulated again; and `node_loss`: the 8 GPUs of node 1 lost at once (no
agent is left to see it: eep detects the node's silence within the failure timeout, and copies
its experts from the backup another node keeps of them, over the NICs).

What `run_scale` promises: EP 32, 64, 128, 256, 512 and 1024 ranks, one rank lost. The model
stays DeepSeek-V3 (256 routed experts): up to EP 256 with 32 redundant experts (empty slots up
to the next multiple of EP), beyond it one slot per rank and the experts replicated to fill
them (512: 2 replicas each, 1024: 4), as a deployment wider than the expert count would. Per
EP and system: the recovery pause, eep's bytes moved by source and its planning time (the
real `plan_repair`, timed here after one untimed plan), the failures expected in 30 days at
the Llama 3 rate, and the availability and goodput they leave. `summary.planner_max_ms` is
`eep bench plan`'s slowest plan (EP 32-256; one rank, one node, 16 ranks).
"""

from __future__ import annotations

import datetime
import gc
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from eep.sim.cluster import DEFAULT_CLUSTER, DEFAULT_MODEL, Cluster, ModelShape
from eep.sim.constants import CONSTANTS, PUBLISHED, PUBLISHED_SOURCES, SGLANG_PUBLISHED_RANGE_S, constants_at
from eep.sim.des import Timeline, simulate
from eep.sim.systems import LABELS, SYSTEMS, Layout, Response, Scenario, expected_failures, plan_for, respond

PAPER_EP = 32
DAYS = 30.0
HARDWARE = ("nvlink_bytes_per_s", "rdma_bytes_per_s", "pcie_bytes_per_s", "nvme_bytes_per_s", "host_memory_bytes")
FIGURES = ("recovery_pause_s", "reintegration_pause_s", "time_to_95_s", "unavailable_s")


def _phases(resp: Response) -> dict[str, list[dict[str, Any]]]:
    def rows(phases: tuple) -> list[dict[str, Any]]:
        return [{"phase": p.name, "s": p.seconds, **({"note": p.note} if p.note else {})} for p in phases]
    return {"recovery_pause": rows(resp.pause), "replacement_warm_up": rows(resp.replacement),
            "reintegration_pause": rows(resp.reintegration)}


def _one(system: str, scenario: Scenario, model: ModelShape, cluster: Cluster, plan: Any,
         layout: Layout, c: dict[str, float] | None = None) -> tuple[Response, Timeline, dict[str, float | None]]:
    c = constants_at("value") if c is None else c
    resp = respond(system, scenario, model, cluster, c, plan=plan, layout=layout)
    tl, fig = simulate(resp, scenario, c)
    return resp, tl, fig


Plans = dict[tuple[tuple[str, float], ...], tuple[Layout, Any]]  # varied links -> (layout, eep's plan)


def _spread(system: str, scenario: Scenario, model: ModelShape, cluster: Cluster,
            plans: Plans) -> dict[str, list[float | None]]:
    """The least and the most each figure comes to over the constants' ranges: every ranged
    constant at each end alone, then, per figure, every one at the end that lowers it and every
    one at the end that raises it (the figures are sums of phases, so these corners bound it). A
    cluster figure is varied only where the cluster file has the table's value (another file's
    figures are its own, without a range). `plans` (shared by the systems) starts with `()`: the
    cluster as it is."""
    ranged = [k for k, const in CONSTANTS.items() if const.range[0] < const.range[1]
              and (k not in HARDWARE or getattr(cluster, k) == const.value)]

    def run(overrides: dict[str, float]) -> dict[str, float | None]:
        hardware = tuple(sorted((k, v) for k, v in overrides.items() if k in HARDWARE))
        varied = replace(cluster, **dict(hardware))
        if hardware not in plans:  # other links: eep plans its copies again
            lay = Layout.of(model, varied, scenario.ep, scenario.redundant)
            plans[hardware] = (lay, plan_for(lay, model, varied, scenario.failed))
        lay, p = plans[hardware]
        return _one(system, scenario, model, varied, p, lay, {**constants_at("value"), **overrides})[2]

    alone = {(k, i): run({k: CONSTANTS[k].range[i]}) for k in ranged for i in (0, 1)}
    out: dict[str, list[float | None]] = {}
    for f in FIGURES:
        results = list(alone.values())
        for lower in (True, False):
            corner = {}
            for k in ranged:
                lo, hi = alone[k, 0][f], alone[k, 1][f]
                if lo is not None and hi is not None:
                    corner[k] = CONSTANTS[k].range[0 if (lo <= hi) == lower else 1]
            results.append(run(corner))
        values = [r[f] for r in results if r[f] is not None]
        out[f] = [min(values), max(values)] if values else [None, None]
    return out


def run_paper(model_path: str | Path = DEFAULT_MODEL, cluster_path: str | Path = DEFAULT_CLUSTER) -> dict[str, Any]:
    model, cluster = ModelShape.load(model_path), Cluster.load(cluster_path)
    scenario = Scenario(PAPER_EP, (PAPER_EP // 2,))
    layout = Layout.of(model, cluster, scenario.ep, scenario.redundant)
    plan = plan_for(layout, model, cluster, scenario.failed)
    summary, detail, timelines = {}, {}, {}
    plans: Plans = {(): (layout, plan)}
    for system in SYSTEMS:
        resp, tl, fig = _one(system, scenario, model, cluster, plan, layout)
        summary[system] = fig
        detail[system] = {"label": LABELS[system], "phases": _phases(resp), "requests_lost": resp.requests_lost,
                          "repair": resp.repair, "range": _spread(system, scenario, model, cluster, plans),
                          "events": tl.events}
        timelines[system] = [list(s) for s in tl.segments]
    relative = {system: {k: (summary[system][k] - v) / v for k, v in pub.items() if summary[system][k] is not None}
                for system, pub in PUBLISHED.items()}
    sglang_table = []
    for k in (1, 2, 4, 8, 16):
        failed = tuple(i * PAPER_EP // k for i in range(k))
        sc = Scenario(PAPER_EP, failed)
        wide = Layout.of(model, cluster, PAPER_EP, scenario.redundant, ranks_lost=k)  # room for k ranks' experts
        p = plan_for(wide, model, cluster, failed)
        row: dict[str, Any] = {"failed": k, "bytes_moved": p[0].bytes_moved, "copy_makespan_s": p[0].est_makespan_s,
                               "uncovered": len(p[0].uncovered)}
        for system in SYSTEMS:
            row[system] = _one(system, sc, model, cluster, p, wide)[2]["recovery_pause_s"]
        sglang_table.append(row)
    node = tuple(range(cluster.gpus_per_node, 2 * cluster.gpus_per_node))  # node 1, all its GPUs
    node_scenario = Scenario(PAPER_EP, node, failure="hang")  # no agent left to see it: the node's silence
    node_plan = plan_for(layout, model, cluster, node)
    node_loss: dict[str, Any] = {"failed": list(node)}
    for system in SYSTEMS:
        resp, _, node_loss[system] = _one(system, node_scenario, model, cluster, node_plan, layout)
        if system == "eep":
            node_loss["repair"] = resp.repair
    return {
        "summary": summary, "published": PUBLISHED, "published_sources": PUBLISHED_SOURCES, "node_loss": node_loss,
        "relative_error": relative,
        "sglang_table": {"rows": sglang_table, "published_range_s": list(SGLANG_PUBLISHED_RANGE_S)},
        "systems": detail, "timelines": timelines, "steady_tokens_per_s": timelines["eep"][0][2],
        "scenario": {"ep": scenario.ep, "failed": list(scenario.failed), "fail_at_s": scenario.fail_at_s,
                     "horizon_s": scenario.horizon_s, "failure": scenario.failure},
        "layout": {"slots_per_rank": layout.slots_per_rank, "redundant_experts": scenario.redundant,
                   "backup_bytes_per_node": layout.backup_bytes_per_node(model)},
        "inputs": _inputs(model, cluster),
    }


def run_scale(model_path: str | Path = DEFAULT_MODEL, cluster_path: str | Path = DEFAULT_CLUSTER,
              ep_sizes: tuple[int, ...] = (32, 64, 128, 256, 512, 1024), plan_repeats: int = 3) -> dict[str, Any]:
    from eep.bench.plan import run_plan_bench

    model, cluster = ModelShape.load(model_path), Cluster.load(cluster_path)
    try:
        rows = _scale_rows(model, cluster, ep_sizes, plan_repeats)
    finally:
        gc.unfreeze()
    planner = run_plan_bench(repeats=plan_repeats)
    return {"summary": {"planner_max_ms": planner["summary"]["planner_max_ms"],
                        "planner_target_ms": planner["summary"]["target_ms"],
                        "table": [{"ep": r["ep"], **{s: r["systems"][s]["recovery_pause_s"] for s in SYSTEMS}}
                                  for r in rows]},
            "rows": rows, "planner_cases": planner["cases"], "days": DAYS, "inputs": _inputs(model, cluster)}


def _scale_rows(model: ModelShape, cluster: Cluster, ep_sizes: tuple[int, ...],
                plan_repeats: int) -> list[dict[str, Any]]:
    c = constants_at("value")
    rows = []
    for ep in ep_sizes:
        redundant = 32 if ep <= model.n_routed_experts else ep - model.n_routed_experts
        scenario = Scenario(ep, (ep // 2,), redundant=redundant)
        layout = Layout.of(model, cluster, ep, redundant)
        plan_for(layout, model, cluster, scenario.failed)  # untimed: a running controller has planned before
        gc.collect()
        gc.freeze()  # as `eep serve` does once started (and `eep bench plan`)
        timed = [plan_for(layout, model, cluster, scenario.failed) for _ in range(plan_repeats)]
        plan = timed[-1]
        failures = expected_failures(ep, DAYS, c)
        row: dict[str, Any] = {"ep": ep, "nodes": -(-ep // cluster.gpus_per_node), "redundant_experts": redundant,
                               "slots_per_rank": layout.slots_per_rank,
                               "plan_ms": {"max": max(p[1] for p in timed),
                                           "median": statistics.median(p[1] for p in timed)},
                               "failures_in_30_days": failures, "systems": {}}
        seconds = DAYS * 86400
        for system in SYSTEMS:
            resp, tl, fig = _one(system, scenario, model, cluster, plan, layout)
            if system == "eep":
                row["repair"] = resp.repair
            row["systems"][system] = {
                **fig, "requests_lost_per_failure": resp.requests_lost,
                "requests_lost_in_30_days": failures * resp.requests_lost,
                "down_s_in_30_days": failures * fig["unavailable_s"],  # type: ignore[operator]
                "availability": 1 - failures * fig["unavailable_s"] / seconds,  # type: ignore[operator]
                # tokens not decoded against the steady rate; a lost request's work so far is not counted
                "goodput": 1 - failures * fig["tokens_lost"] / (tl.steady * seconds),  # type: ignore[operator]
            }
        # every failure above is a crash (seen by eep's death notice); were every one a hang or a
        # lost node, eep would see it by its silence (the failure timeout)
        hang = Scenario(ep, scenario.failed, redundant=redundant, failure="hang")
        hung = _one("eep", hang, model, cluster, plan, layout)[2]
        row["systems"]["eep"]["down_s_in_30_days_if_hangs"] = failures * hung["unavailable_s"]  # type: ignore[operator]
        rows.append(row)
    return rows


def _inputs(model: ModelShape, cluster: Cluster) -> dict[str, Any]:
    from dataclasses import asdict

    return {"model": asdict(model), "cluster": asdict(cluster), "constants": constants_at("value"),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def paper_table(result: dict[str, Any]) -> str:
    lines = [f"{'system':34} {'recovery s':>11} {'reintegr. s':>11} {'to 95% s':>9} {'unavail. s':>10}"]
    for system in SYSTEMS:
        f = result["summary"][system]
        cells = [f"{f[k]:.2f}" if f[k] is not None else "-" for k in FIGURES]
        lines.append(f"{LABELS[system]:34} {cells[0]:>11} {cells[1]:>11} {cells[2]:>9} {cells[3]:>10}")
    for system, pub in result["published"].items():
        for k, v in pub.items():
            err = result["relative_error"][system].get(k)
            got = result["summary"][system][k]
            lines.append(f"  published {system} {k} {v:g} s: simulated "
                         + (f"{got:.2f} s ({100 * err:+.0f} %)" if got is not None and err is not None else "-"))
    return "\n".join(lines)


def scale_table(result: dict[str, Any]) -> str:
    lines = [f"{'EP':>5} " + " ".join(f"{s:>13}" for s in SYSTEMS) + f" {'eep GB moved':>13} {'plan ms':>8} "
             f"{'fail/30d':>8} " + " ".join(f"{s[:9] + ' down':>14}" for s in SYSTEMS)]
    for r in result["rows"]:
        s = r["systems"]
        lines.append(f"{r['ep']:>5} " + " ".join(f"{s[x]['recovery_pause_s']:>13.2f}" for x in SYSTEMS)
                     + f" {r['repair']['bytes_moved'] / 1e9:>13.2f} {r['plan_ms']['max']:>8.1f} "
                     f"{r['failures_in_30_days']:>8.2f} "
                     + " ".join(f"{s[x]['down_s_in_30_days']:>13.1f}s" for x in SYSTEMS))
    lines.append(f"planner_max_ms (eep bench plan cases, EP 32-256): {result['summary']['planner_max_ms']:.1f}")
    return "\n".join(lines)


_COLORS = {"full_restart": "tab:gray", "eep_paper": "tab:orange", "sglang": "tab:purple", "eep": "tab:blue"}


def plot_paper(result: dict[str, Any], path: str | Path) -> None:
    """Throughput over time after one rank of 32 fails, one panel per system (the paper's style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steady = result["steady_tokens_per_s"]
    fig, axes = plt.subplots(len(SYSTEMS), 1, figsize=(10, 8), dpi=120, sharex=True)
    t_fail = result["scenario"]["fail_at_s"]
    for ax, system in zip(axes, SYSTEMS):
        xs, ys = [], []
        for start, end, rate, _ in result["timelines"][system]:
            xs += [start - t_fail, end - t_fail]
            ys += [100 * rate / steady] * 2
        ax.plot(xs, ys, color=_COLORS[system], linewidth=1.6)
        ax.axhline(95, color="black", linewidth=0.6, linestyle=":")
        f = result["summary"][system]
        ax.set_title(f"{LABELS[system]}: recovery {f['recovery_pause_s']:.2f} s, reintegration "
                     f"{f['reintegration_pause_s']:.2f} s, back to 95 % after "
                     + (f"{f['time_to_95_s']:.1f} s" if f["time_to_95_s"] is not None else "never"),
                     fontsize=9, loc="left")
        ax.set_ylim(-5, 110)
        ax.set_ylabel("% of steady")
        ax.axvline(0, color="tab:red", linewidth=0.8)
    axes[-1].set_xlabel(f"seconds after one rank of {result['scenario']['ep']} fails "
                        "(DeepSeek-V3, H800 nodes; simulated)")
    axes[-1].set_xlim(-10, 360)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_scale(result: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [r["ep"] for r in result["rows"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for system in SYSTEMS:
        a.plot(eps, [r["systems"][system]["recovery_pause_s"] for r in result["rows"]], marker="o",
               color=_COLORS[system], label=LABELS[system])
        b.plot(eps, [100 * (1 - r["systems"][system]["goodput"]) for r in result["rows"]], marker="o",
               color=_COLORS[system], label=LABELS[system])
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("EP ranks (GPUs)")
        ax.set_xticks(eps, [str(e) for e in eps])
    a.set_ylabel("recovery pause after one rank fails (s)")
    b.set_ylabel(f"goodput lost over {result['days']:g} days (%)")
    a.legend(fontsize=8)
    fig.suptitle("DeepSeek-V3 on H800 nodes, simulated (eep sim scale)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
