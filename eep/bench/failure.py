"""The failure experiment: eep, the fixed-membership fast path and a full restart, over HTTP.

What `run_failure_bench` promises. Each system is a real `eep serve --http` process on the
same model and rank count, started and stopped here:
- `eep`: `--fault-policy repair` on the shm data plane (what eep is);
- `fixed`: `--fault-policy none` on the same shm data plane, every elastic check and piece of
  bookkeeping off and no fault injected: the steady-state reference;
- `restart`: `--fault-policy restart` on the same shm data plane, i.e. the fixed path restarted:
  on a rank failure every rank is relaunched and every weight reloaded, and the interrupted
  requests resume (what torchrun --max-restarts or a Kubernetes restart gives);
- `gloo-restart` (only when named in `systems`): the same restart on the gloo backend (the
  baseline of earlier runs, 3-4x slower per step than shm here).
The same request trace (request i: a seeded random token-id prompt and a seeded output length,
greedy, EOS ignored) is driven through `POST /v1/completions` with `stream: true` by
`concurrency` asynchronous clients in a closed loop, after an untimed warm-up. `fault_at_s`
after the start rank `victim` is SIGKILLed (eep and the restarts); `rejoin_after_s` later eep
is asked to take it back (`POST /admin/ranks/{victim}/rejoin`); the clients stop starting
requests `tail_s` after that, or `tail_s` after the rank is back if that is later, and every
request in flight is awaited. Every streamed chunk is recorded
with its arrival time and token count, so the series is committed tokens per 100 ms as the
clients saw them.

The fixed server stays up (idle while another system is driven) for the whole run: before
eep's timed run the two are driven in alternating slices of the same closed-loop load on the
same requests (`steady_rounds` rounds, ABBA order: `eep.bench.harness.interleave`), which is what `steady_state_ratio` and
`steady_state_cpu_ratio` compare; after the timed runs it serves the reference outputs.

Figures (per system, and eep's in `summary`):
- `steady_state_ratio`: the median over the rounds of alternating slices of eep's speed over
  the fixed path's on the same work: both served the same requests in the same order in a
  round, so the ratio is the fixed path's time over eep's time from the token count both had
  reached a third into their slices to the count both reached by their ends (each on its own
  clock; tokens per fixed time would also count how far into the work each slice got, which
  swings by ±10% between identical slices here). The two slices of a round are back to back,
  so the host's drift mostly cancels, and one noisy round does not move the median. Without
  slices (or if no round had work in common), the timed runs' rates over [3 s, kill).
  `run_steady_calibration` (`eep bench failure --calibrate`) runs the same comparison between
  two identical fixed servers: how far the host lets it resolve a ratio (about ±2% at 40
  rounds on the 2-core development machine);
- `steady_state_cpu_ratio`: the median over the same rounds of the fixed path's CPU seconds
  over eep's on the same work (the token range of `steady_state_ratio`, each on its own clock),
  i.e. CPU per committed token, fixed / eep. CPU seconds: user + system of the server process
  and every process below it (its ranks), read every 5 ms through the slice from each
  process's CPU-time clock (`clock_getcpuclockid`'s: nanoseconds, every thread, those that
  exited included, a running one up to date) and interpolated to the moments the range began
  and ended (`cpu_source` `process_cpu_clock_ns`). A kernel without such clocks falls back to
  /proc/PID/stat's utime + stime (`proc_stat_ticks`): 10 ms ticks per process and reading, up
  to ±1.5% of a window's ~3 CPU-seconds from quantisation alone. The same-work range and not
  the whole slice: a whole slice would also count the ramp (the same prefill for both) over
  different token counts, a bias toward the faster slice. Waiting for a core costs no CPU
  time, so load on the host that only delays a server does not move this figure; load that
  slows the work itself does (cache sharing, a hypervisor throttling a virtual CPU, which its
  guest counts as running time: on the 2-core development VM under other jobs the same fixed
  work took up to 70% more CPU time).
  `steady_state_cpu_ratio_min`, `_max`, `_stdev`: the spread of the rounds (each in
  `steady_state.cpu_round_ratios`; per slice, `cpu_s` and `tokens` are the whole slice's);
- `steady_state_bookkeeping_ratio`: the figure that resolves 1% where the two above cannot
  (they compare two noisy measurements of whole servers; on a shared 2-core VM the same work's
  wall and CPU time both swing by tens of percent between slices). Each server keeps a ledger
  (`eep.runtime.accounting`, read from `/membership` at the end of each slice's ramp and at
  its end) of the CPU time of every piece of work that only elastic membership does (the
  ranks' heartbeat threads, the controller's heartbeat looks and step-boundary membership
  work, the repair plans made ahead), each on the CPU clock of the thread that does it,
  against all the CPU time of the controller and its ranks; the rest is the same code in both
  systems. Per round, the share of eep's CPU time that served tokens (1 - bookkeeping / all)
  over the fixed path's (1: it keeps no bookkeeping). From the ramp's end, as the token
  counts: a server's ranks report their CPU with their steps, so the heartbeats of the
  seconds it idled through the other server's slice come with its first step, and are no
  part of the work. The median over the rounds, `_min`, `_max`, `_stdev` (per slice:
  `ledger`). What it leaves out is what both systems do alike, and what differs without
  running code: eep's placement has spare slots and one more replica at most (memory, not
  work per token: each token still runs its top-k experts once);
- `normal_gap_s` (per system): how long the clients normally wait between two steps' tokens:
  the median, over the half-second windows of steady serving before the kill, of each window's
  longest stretch without a token arriving;
- `recovery_pause_s`: what the failure adds to that: the longest stretch without a token
  arriving that ends after the kill and starts before the rejoin request, minus `normal_gap_s`,
  never below 0 (the restart's is `full_restart_unavailable_s`, measured the same way; the
  stretches themselves are `recovery_longest_gap_s` and `full_restart_longest_gap_s`). With
  steps of ~0.1 s on two cores, a fault that cost nothing would still show a 0.1 s stretch;
- `reintegration_pause_s`: the longest such stretch within 1 s of the server's `rejoined`
  event, minus `normal_gap_s`, never below 0;
- `time_to_95_s`: from the kill until a 0.5 s window, and the one after it, reach 95% of the
  pre-fault rate `pre_fault_tokens_per_s` (the median of the 0.5 s windows' rates over
  [3 s, kill): one short burst does not set a bar the load never reaches again); `reached_95`
  says whether they did: if not within the run, `time_to_95_s` is the time from the kill to the
  run's last token, a lower bound, never None (the restart's: `full_restart_time_to_95_s`,
  `full_restart_reached_95`);
- `requests_lost`: requests started that did not end with exactly their tokens and `[DONE]`;
- `outputs_differing`: completed requests whose tokens differ from the same request on the
  fault-free `fixed` server (greedy outputs are bitwise independent of batch and placement, so
  any difference is a wrong token).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import statistics
from collections.abc import Callable
from typing import Any

from eep.bench.harness import (
    FIXED,
    LocalServer,
    RequestRecord,
    System,
    Trace,
    cpu_summary,
    drive_fault_run,
    frozen_gc,
    interleaved,
    provenance,
    save_timeline_plot,
    serve_reference,
    timeline,
)
from eep.bench.steady import checkpoint_vocab
from eep.errors import ConfigError

logger = logging.getLogger(__name__)

BIN_S = timeline.BIN_S  # the series' resolution (the record's `bin_s`)

SYSTEMS = (
    System("eep", "eep (repair, shm)", ("--ep-backend", "shm", "--fault-policy", "repair"), kill=True, rejoin=True),
    FIXED,
    # the fair baseline: the fixed-membership fast path above, restarted on a failure
    System("restart", "full restart (shm)", ("--ep-backend", "shm", "--fault-policy", "restart"),
           kill=True, rejoin=False),
    # the same on gloo, a 3-4x slower engine: only when named in `systems`
    System("gloo-restart", "full restart (gloo)", ("--ep-backend", "gloo", "--fault-policy", "restart"),
           kill=True, rejoin=False),
)


def run_failure_bench(
    model_path: str,
    *,
    ep_size: int = 4,
    victim: int = 1,
    concurrency: int = 32,
    prompt_len: int = 32,
    output_len: int = 48,
    fault_at_s: float = 6.0,
    rejoin_after_s: float = 3.0,
    tail_s: float = 4.0,
    failure_timeout_s: float = 1.0,
    systems: tuple[str, ...] = ("eep", "restart", "fixed"),
    steady_rounds: int = 5,
    steady_slice_s: float = 2.5,
    dtype: str = "auto",
    seed: int = 0,
    eep_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run the experiment on each system in `systems` (`fixed` last: it also serves the
    reference outputs); return a JSON-able dict with every series, event and the summary.
    `eep_args`: more `eep serve` flags for the `eep` system (e.g. `--enable-eplb`)."""
    chosen = _check(systems, ep_size=ep_size, victim=victim, fault_at_s=fault_at_s, rejoin_after_s=rejoin_after_s,
                    tail_s=tail_s, concurrency=concurrency, steady_rounds=steady_rounds, steady_slice_s=steady_slice_s)
    chosen = [dataclasses.replace(s, serve_args=(*s.serve_args, *eep_args),
                                  label=f"{s.label} {' '.join(eep_args)}") if s.name == "eep" and eep_args else s
              for s in chosen]
    trace = Trace(seed, checkpoint_vocab(model_path), prompt_len, output_len)

    def server(system: System) -> LocalServer:
        return LocalServer(model_path, system, ep_size=ep_size, concurrency=concurrency, trace=trace,
                           failure_timeout_s=failure_timeout_s, dtype=dtype)

    with frozen_gc():  # a full collection over torch's objects stalls this client's clocks by ~50-80 ms
        runs, steady = _run_systems(chosen, server, trace, concurrency=concurrency, victim=victim,
                                    fault_at_s=fault_at_s, rejoin_after_s=rejoin_after_s, tail_s=tail_s,
                                    steady_rounds=steady_rounds, steady_slice_s=steady_slice_s)
    return _result(runs, steady, trace, config={
        "model_path": model_path, "ep_size": ep_size, "victim": victim, "concurrency": concurrency,
        "prompt_len": prompt_len, "output_len": output_len, "fault_at_s": fault_at_s,
        "rejoin_after_s": rejoin_after_s, "tail_s": tail_s, "failure_timeout_s": failure_timeout_s, "dtype": dtype,
        "steady_rounds": steady_rounds, "steady_slice_s": steady_slice_s, "seed": seed, "eep_args": list(eep_args),
    }, labels={s.name: s.label for s in chosen})


def _check(systems: tuple[str, ...], *, ep_size: int, victim: int, fault_at_s: float, rejoin_after_s: float,
           tail_s: float, concurrency: int, steady_rounds: int, steady_slice_s: float) -> list[System]:
    """The systems named, or ConfigError if the configuration cannot run."""
    chosen = [s for s in SYSTEMS if s.name in systems]
    if {s.name for s in chosen} != set(systems) or "fixed" not in systems:
        raise ConfigError(f"systems must be a subset of {[s.name for s in SYSTEMS]} that includes 'fixed'")
    if not 0 <= victim < ep_size or ep_size < 2:
        raise ConfigError(f"need ep_size >= 2 and a victim in 0..{ep_size - 1}")
    least = timeline.STEADY_FROM_S + timeline.WINDOW_S
    if fault_at_s <= least or rejoin_after_s <= 0 or tail_s <= 0 or concurrency < 1:
        raise ConfigError(f"need fault_at_s > {least}, rejoin_after_s > 0, tail_s > 0 and concurrency >= 1")
    if steady_rounds < 0 or steady_slice_s < 1.5:
        raise ConfigError("need steady_rounds >= 0 and steady_slice_s >= 1.5")
    return chosen


def _run_systems(chosen: list[System], server: Callable[[System], LocalServer], trace: Trace, *, concurrency: int, victim: int,
                 fault_at_s: float, rejoin_after_s: float, tail_s: float, steady_rounds: int,
                 steady_slice_s: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Each system's timed run (and eep's interleaved steady state), every completed request's
    output checked against the fixed server's (`outputs_differing`)."""
    order = [s for s in chosen if s.name != "fixed"] + [s for s in chosen if s.name == "fixed"]
    runs: dict[str, dict[str, Any]] = {}
    records: dict[str, list[RequestRecord]] = {}
    steady: dict[str, Any] | None = None
    # The fixed-membership server stays up (idle when not driven) for the interleaved steady-state
    # comparison and the reference outputs; every other system runs alone after it.
    logger.info("[1/%d] %s", len(order) + 1, FIXED.label)
    with server(FIXED) as fixed:
        for n, system in enumerate(order, 2):
            logger.info("[%d/%d] %s", n, len(order) + 1, system.label)
            with contextlib.nullcontext(fixed) if system.name == "fixed" else server(system) as srv:
                if system.name == "eep" and steady_rounds > 0:
                    steady = asyncio.run(interleaved({"eep": srv, "fixed": fixed}, trace, concurrency=concurrency,
                                                     rounds=steady_rounds, slice_s=steady_slice_s))
                runs[system.name], records[system.name] = asyncio.run(drive_fault_run(
                    srv, system, trace, concurrency=concurrency, victim=victim, fault_at_s=fault_at_s,
                    rejoin_after_s=rejoin_after_s, tail_s=tail_s))
        reference = {r.index: r.token_ids for r in records["fixed"] if r.complete}
        missing = sorted({r.index for rs in records.values() for r in rs if r.complete} - set(reference))
        if missing:
            logger.info("serving %d more requests of the trace fault-free, as the reference", len(missing))
            reference |= asyncio.run(serve_reference(fixed, trace, missing, concurrency))
    for name, recs in records.items():
        runs[name]["outputs_differing"] = sum(r.token_ids != reference[r.index] for r in recs if r.complete)
    return runs, steady


def run_steady_calibration(
    model_path: str,
    *,
    ep_size: int = 4,
    concurrency: int = 32,
    prompt_len: int = 32,
    output_len: int = 48,
    rounds: int = 40,
    slice_s: float = 2.5,
    dtype: str = "auto",
    seed: int = 0,
    system: str = "fixed",
) -> dict[str, Any]:
    """The steady-state comparison run between two identical servers of `system` ("fixed" or
    "eep"; an A/A test): what `steady_state_ratio` reads when nothing differs, i.e. how far this
    machine lets the comparison resolve a ratio at `rounds` rounds. Two fixed servers keep no
    bookkeeping (their `steady_state_bookkeeping_ratio` is 1 by construction); two eep servers
    show how far that figure itself moves between identical servers. Returns a JSON-able dict
    whose `summary` holds the median (`aa_ratio`) and the spread of the rounds."""
    if rounds < 1 or slice_s < 1.5 or concurrency < 1 or ep_size < 2:
        raise ConfigError("need rounds >= 1, slice_s >= 1.5, concurrency >= 1 and ep_size >= 2")
    if system not in ("fixed", "eep"):
        raise ConfigError(f"the A/A calibration runs two 'fixed' or two 'eep' servers, not {system!r}")
    same = next(s for s in SYSTEMS if s.name == system)
    trace = Trace(seed, checkpoint_vocab(model_path), prompt_len, output_len)
    servers = [LocalServer(model_path, same, ep_size=ep_size, concurrency=concurrency, trace=trace,
                           failure_timeout_s=1.0, dtype=dtype) for _ in range(2)]
    logger.info("A/A calibration: two %s servers, %d rounds of %.1f s slices", same.label, rounds, slice_s)
    with frozen_gc(), servers[0] as a, servers[1] as b:
        steady = asyncio.run(interleaved({"a": a, "b": b}, trace, concurrency=concurrency, rounds=rounds,
                                         slice_s=slice_s))
    ratios = steady["round_ratios"]
    return {
        "summary": {
            "aa_ratio": statistics.median(ratios) if ratios else None,
            "aa_round_min": min(ratios, default=None), "aa_round_max": max(ratios, default=None),
            "aa_round_stdev": statistics.stdev(ratios) if len(ratios) > 1 else None,
            **cpu_summary(steady),
        },
        "steady_state": steady,
        "config": {"model_path": model_path, "ep_size": ep_size, "concurrency": concurrency,
                   "prompt_len": prompt_len, "output_len": output_len, "rounds": rounds, "slice_s": slice_s,
                   "dtype": dtype, "seed": seed, "max_model_len": trace.max_model_len, "system": system},
        **provenance(),
    }


# -- figures ----------------------------------------------------------------------------------
def _summary(runs: dict[str, dict[str, Any]], steady: dict[str, Any] | None) -> dict[str, Any]:
    eep, fixed, restart = runs.get("eep"), runs["fixed"], runs.get("restart")
    summary: dict[str, Any] = {}
    if eep is not None:
        # the interleaved measurement; else (no slices, or no round with work in common: an
        # overloaded host) the timed runs' own pre-fault rates
        if steady is not None and steady["round_ratios"]:
            ratio = statistics.median(steady["round_ratios"])
        else:
            window = (timeline.STEADY_FROM_S, eep["times"]["kill"])
            ratio = timeline.rate(eep["tokens_per_bin"], *window) / timeline.rate(fixed["tokens_per_bin"], *window)
        summary |= {
            "steady_state_ratio": ratio,
            **(cpu_summary(steady) if steady is not None else {}),
            "recovery_pause_s": eep["pause_after_kill_s"],
            "recovery_longest_gap_s": eep["longest_gap_after_kill_s"],
            "normal_gap_s": eep["normal_gap_s"],
            "reintegration_pause_s": eep.get("reintegration_pause_s"),
            "time_to_95_s": eep["time_to_95_s"],
            "reached_95": eep["reached_95"],
            "requests_lost": eep["requests_lost"],
            "outputs_differing": eep["outputs_differing"],
        }
    if restart is not None:
        summary |= {
            "full_restart_unavailable_s": restart["pause_after_kill_s"],
            "full_restart_longest_gap_s": restart["longest_gap_after_kill_s"],
            "full_restart_time_to_95_s": restart["time_to_95_s"],
            "full_restart_reached_95": restart["reached_95"],
            "full_restart_requests_lost": restart["requests_lost"],
            "full_restart_outputs_differing": restart["outputs_differing"],
        }
    if eep is not None and restart is not None:
        summary["restart_over_recovery"] = summary["full_restart_unavailable_s"] / max(summary["recovery_pause_s"], 1e-3)
        summary["restart_over_recovery_longest_gaps"] = (summary["full_restart_longest_gap_s"]
                                                         / summary["recovery_longest_gap_s"])
    return summary


_TARGETS = {
    "recovery_pause_le_restart_over_50": ("restart_over_recovery", lambda v: v >= 50),
    "steady_state_ratio_ge_0.99": ("steady_state_ratio", lambda v: v >= 0.99),
    "steady_state_cpu_ratio_ge_0.99": ("steady_state_cpu_ratio", lambda v: v >= 0.99),
    "steady_state_bookkeeping_ratio_ge_0.99": ("steady_state_bookkeeping_ratio", lambda v: v >= 0.99),
    "no_request_lost": ("requests_lost", lambda v: v == 0),
    "no_output_differing": ("outputs_differing", lambda v: v == 0),
}


def _result(runs: dict[str, dict[str, Any]], steady: dict[str, Any] | None, trace: Trace, config: dict[str, Any],
            labels: dict[str, str]) -> dict[str, Any]:
    summary = _summary(runs, steady)
    return {
        "summary": summary,
        "targets_met": {name: check(summary[key]) for name, (key, check) in _TARGETS.items()
                        if summary.get(key) is not None},
        "bin_s": BIN_S,
        "steady_state": steady,
        "systems": runs,
        "labels": labels,
        "config": {**config, "max_model_len": trace.max_model_len},
        **provenance(),
    }


# -- output -----------------------------------------------------------------------------------
def _back(run: dict[str, Any]) -> str:
    """The table's "back to 95%" cell: the time, or a lower bound if the rate never came back."""
    back = run.get("time_to_95_s")
    if back is None:  # a record from before `reached_95`
        return "never"
    return f"{back:.2f} s" if run.get("reached_95", True) else f"> {back:.2f} s (never)"


def summary_table(result: dict[str, Any]) -> str:
    """The per-system table and the summary line that `eep bench failure` prints."""
    rows = [("system", "tok/s steady", "normal gap", "longest gap after kill", "pause after kill", "back to 95%",
             "reintegration", "requests", "lost", "differing")]
    for run in result["systems"].values():
        pause = run.get("pause_after_kill_s")
        rows.append((
            run["label"], f"{run['tokens_per_s_steady']:.0f}", f"{run['normal_gap_s']:.3f} s",
            f"{run['longest_gap_after_kill_s']:.3f} s" if pause is not None else "no fault",
            f"{pause:.3f} s" if pause is not None else "-",
            _back(run) if pause is not None else "-",
            f"{run['reintegration_pause_s']:.3f} s" if "reintegration_pause_s" in run else "-",
            str(run["requests"]), str(run["requests_lost"]), str(run["outputs_differing"]),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + _summary_lines(result))


def _summary_lines(result: dict[str, Any]) -> list[str]:
    s, steady, lines = result["summary"], result.get("steady_state"), []
    if "restart_over_recovery" in s:
        lines.append(
            f"\nrecovery pause {s['recovery_pause_s']:.3f} s = 1/{s['restart_over_recovery']:.0f} of the full "
            f"restart's {s['full_restart_unavailable_s']:.2f} s (pause = longest gap after the kill - normal gap; "
            f"longest gaps alone: {s['recovery_longest_gap_s']:.3f} s vs {s['full_restart_longest_gap_s']:.2f} s, "
            f"1/{s['restart_over_recovery_longest_gaps']:.0f})"
        )
    if "steady_state_ratio" in s:
        rounds = f" (per round: {', '.join(f'{r:.3f}' for r in steady['round_ratios'])})" if steady else ""
        lines.append(f"steady-state ratio {s['steady_state_ratio']:.3f}{rounds}")
    if s.get("steady_state_cpu_ratio") is not None:
        lines.append(f"steady-state CPU ratio {s['steady_state_cpu_ratio']:.4f} (CPU seconds per token, fixed / eep; "
                     f"per round: {', '.join(f'{r:.4f}' for r in steady['cpu_round_ratios'])})")
    if s.get("steady_state_bookkeeping_ratio") is not None:
        lines.append(f"steady-state bookkeeping ratio {s['steady_state_bookkeeping_ratio']:.5f} (share of the CPU "
                     f"time that served tokens, eep / fixed; per round: "
                     f"{', '.join(f'{r:.5f}' for r in steady['bookkeeping_round_ratios'])})")
    met = result["targets_met"]
    lines.append("targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()))
    return lines


def plot(result: dict[str, Any], path: str) -> None:
    """Throughput over time, one line per system, the kill / rejoin / rejoined moments marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"eep": "tab:blue", "fixed": "tab:gray", "restart": "tab:red", "gloo-restart": "tab:orange"}
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=120)
    for name, run in result["systems"].items():
        ax.plot(*timeline.moving_rates(run["tokens_per_bin"]), label=run["label"], color=colors.get(name),
                linewidth=1.6 if name != "fixed" else 1.2, linestyle="-" if name != "fixed" else "--")
    _marks(ax, result)
    s = result["summary"]
    title = "committed tokens/s seen by the clients (0.5 s moving average)"
    if "recovery_pause_s" in s:
        title += f" — eep pause {s['recovery_pause_s'] * 1000:.0f} ms"
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(run["times"]["load_end"] for run in result["systems"].values()) + 0.5)  # not the drain
    save_timeline_plot(fig, ax, path)


def _marks(ax: Any, result: dict[str, Any]) -> None:
    """eep's kill, rejoin request and switch-in as lines; the restart's gap as a band."""
    eep, restart = result["systems"].get("eep"), result["systems"].get("restart")
    marks = []
    if eep is not None:
        t = eep["times"]
        marks += [(t["kill"], "SIGKILL rank", "black", "-")]
        if "rejoin_requested" in t:
            marks.append((t["rejoin_requested"], "rejoin requested", "tab:green", ":"))
        if "rejoined" in t:
            marks.append((t["rejoined"], "rank switched in", "tab:green", "-"))
    for x, text, color, style in marks:
        ax.axvline(x, color=color, linestyle=style, linewidth=1)
        ax.annotate(text, (x, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=8,
                    va="top", ha="right", color=color)
    if restart is not None and restart.get("longest_gap_after_kill_s"):
        k, gap = restart["times"]["kill"], restart["longest_gap_after_kill_s"]
        ax.axvspan(k, k + gap, color="tab:red", alpha=0.08)
        ax.annotate(f"full restart: {gap:.1f} s without a token",
                    (k + gap / 2, 0.04), xycoords=("data", "axes fraction"),
                    ha="center", fontsize=8, color="tab:red")
