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
same requests (`steady_rounds` rounds, ABBA order), which is what `steady_state_ratio` and
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
  pre-fault rate (over [3 s, kill)); None if that never happens within the run;
- `requests_lost`: requests started that did not end with exactly their tokens and `[DONE]`;
- `outputs_differing`: completed requests whose tokens differ from the same request on the
  fault-free `fixed` server (greedy outputs are bitwise independent of batch and placement, so
  any difference is a wrong token).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime
import gc
import itertools
import json
import logging
import os
import random
import secrets
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eep.bench.steady import FIRST_PROMPT_ID, checkpoint_vocab
from eep.errors import ConfigError, EepError

logger = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

BIN_S = 0.1  # the series' resolution: committed tokens per 100 ms
_WINDOW_S = 0.5  # time_to_95's window
# The closed loop's start is left out of steady-state rates: its requests start together and
# decode in lockstep (no prefill beside them) until the first ones end, a peak ~30% above the
# mixed load that follows (2-3 s with 24-72 output tokens)
_STEADY_FROM_S = 3.0
_START_TIMEOUT_S = 180.0
_STOP_TIMEOUT_S = 60.0
_REQUEST_TIMEOUT_S = 300.0
_REJOIN_TIMEOUT_S = 120.0
_WARM_FIRST_INDEX = 10**6
_STEADY_FIRST_INDEX = 10**7  # trace indices of the steady-state slices (apart from the timed runs')


class BenchFailed(EepError):
    """A system under test misbehaved (did not start, did not answer): the run is void."""


@dataclass(frozen=True, slots=True)
class System:
    name: str
    label: str
    serve_args: tuple[str, ...]
    kill: bool  # inject the fault
    rejoin: bool  # ask for the rank back


SYSTEMS = (
    System("eep", "eep (repair, shm)", ("--ep-backend", "shm", "--fault-policy", "repair"), kill=True, rejoin=True),
    System("fixed", "fixed membership (shm, no fault)", ("--ep-backend", "shm", "--fault-policy", "none"),
           kill=False, rejoin=False),
    # the fair baseline: the fixed-membership fast path above, restarted on a failure
    System("restart", "full restart (shm)", ("--ep-backend", "shm", "--fault-policy", "restart"),
           kill=True, rejoin=False),
    # the same on gloo, a 3-4x slower engine: only when named in `systems`
    System("gloo-restart", "full restart (gloo)", ("--ep-backend", "gloo", "--fault-policy", "restart"),
           kill=True, rejoin=False),
)


@dataclass(frozen=True, slots=True)
class Trace:
    """Request i of every run: the same prompt and output length for every system."""

    seed: int
    vocab: int
    prompt_len: int
    output_len: int

    def request(self, i: int) -> tuple[list[int], int]:
        rng = random.Random(self.seed * 1_000_003 + i)
        prompt = [rng.randrange(FIRST_PROMPT_ID, self.vocab) for _ in range(self.prompt_len)]
        return prompt, rng.randint(max(1, self.output_len // 2), self.output_len * 3 // 2)

    @property
    def max_model_len(self) -> int:
        return self.prompt_len + self.output_len * 3 // 2 + 8


@dataclass(slots=True)
class _Record:
    """One request as its client saw it."""

    index: int
    start: float
    max_tokens: int
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in the chunk)
    token_ids: list[int] = field(default_factory=list)
    done: bool = False
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.done and self.error is None and len(self.token_ids) == self.max_tokens


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
) -> dict[str, Any]:
    """Run the experiment on each system in `systems` (`fixed` last: it also serves the
    reference outputs); return a JSON-able dict with every series, event and the summary."""
    chosen = [s for s in SYSTEMS if s.name in systems]
    if {s.name for s in chosen} != set(systems) or "fixed" not in systems:
        raise ConfigError(f"systems must be a subset of {[s.name for s in SYSTEMS]} that includes 'fixed'")
    if not 0 <= victim < ep_size or ep_size < 2:
        raise ConfigError(f"need ep_size >= 2 and a victim in 0..{ep_size - 1}")
    if fault_at_s <= _STEADY_FROM_S + _WINDOW_S or rejoin_after_s <= 0 or tail_s <= 0 or concurrency < 1:
        raise ConfigError(f"need fault_at_s > {_STEADY_FROM_S + _WINDOW_S}, rejoin_after_s > 0, tail_s > 0 and "
                          f"concurrency >= 1")
    if steady_rounds < 0 or steady_slice_s < 1.5:
        raise ConfigError("need steady_rounds >= 0 and steady_slice_s >= 1.5")
    trace = Trace(seed, checkpoint_vocab(model_path), prompt_len, output_len)
    gc.collect()
    gc.freeze()  # a full collection over torch's objects stalls this client's clocks by ~50-80 ms
    order = [s for s in chosen if s.name != "fixed"] + [s for s in chosen if s.name == "fixed"]
    fixed_system = next(s for s in chosen if s.name == "fixed")
    runs: dict[str, dict[str, Any]] = {}
    records: dict[str, list[_Record]] = {}
    steady: dict[str, Any] | None = None

    def server(system: System) -> _Server:
        return _Server(model_path, system, ep_size=ep_size, concurrency=concurrency, trace=trace,
                       failure_timeout_s=failure_timeout_s, dtype=dtype)

    # The fixed-membership server stays up (idle when not driven) for the interleaved steady-state
    # comparison and the reference outputs; every other system runs alone after it.
    logger.info("[1/%d] %s", len(order) + 1, fixed_system.label)
    with server(fixed_system) as fixed:
        for n, system in enumerate(order, 2):
            logger.info("[%d/%d] %s", n, len(order) + 1, system.label)
            with contextlib.nullcontext(fixed) if system.name == "fixed" else server(system) as srv:
                if system.name == "eep" and steady_rounds > 0:
                    steady = asyncio.run(_interleaved({"eep": srv, "fixed": fixed}, trace, concurrency=concurrency,
                                                      rounds=steady_rounds, slice_s=steady_slice_s))
                run, recs = asyncio.run(_drive(srv, system, trace, concurrency=concurrency, victim=victim,
                                               fault_at_s=fault_at_s, rejoin_after_s=rejoin_after_s, tail_s=tail_s))
                runs[system.name], records[system.name] = run, recs
        reference = {r.index: r.token_ids for r in records["fixed"] if r.complete}
        missing = sorted({r.index for rs in records.values() for r in rs if r.complete} - set(reference))
        if missing:
            logger.info("serving %d more requests of the trace fault-free, as the reference", len(missing))
            reference |= asyncio.run(_reference(fixed, trace, missing, concurrency))
    for name, recs in records.items():
        done = [r for r in recs if r.complete]
        runs[name]["outputs_differing"] = sum(r.token_ids != reference[r.index] for r in done)
    return _result(runs, steady, trace, config={
        "model_path": model_path, "ep_size": ep_size, "victim": victim, "concurrency": concurrency,
        "prompt_len": prompt_len, "output_len": output_len, "fault_at_s": fault_at_s,
        "rejoin_after_s": rejoin_after_s, "tail_s": tail_s, "failure_timeout_s": failure_timeout_s, "dtype": dtype,
        "steady_rounds": steady_rounds, "steady_slice_s": steady_slice_s, "seed": seed,
    }, labels={s.name: s.label for s in chosen})


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
    gc.collect()
    gc.freeze()
    servers = [_Server(model_path, same, ep_size=ep_size, concurrency=concurrency, trace=trace,
                       failure_timeout_s=1.0, dtype=dtype) for _ in range(2)]
    logger.info("A/A calibration: two %s servers, %d rounds of %.1f s slices", same.label, rounds, slice_s)
    with servers[0] as a, servers[1] as b:
        steady = asyncio.run(_interleaved({"a": a, "b": b}, trace, concurrency=concurrency, rounds=rounds,
                                          slice_s=slice_s))
    ratios = steady["round_ratios"]
    return {
        "summary": {
            "aa_ratio": statistics.median(ratios) if ratios else None,
            "aa_round_min": min(ratios, default=None), "aa_round_max": max(ratios, default=None),
            "aa_round_stdev": statistics.stdev(ratios) if len(ratios) > 1 else None,
            **_cpu_summary(steady),
        },
        "steady_state": steady,
        "config": {"model_path": model_path, "ep_size": ep_size, "concurrency": concurrency,
                   "prompt_len": prompt_len, "output_len": output_len, "rounds": rounds, "slice_s": slice_s,
                   "dtype": dtype, "seed": seed, "max_model_len": trace.max_model_len, "system": system},
        **_provenance(),
    }


# -- one server -------------------------------------------------------------------------------
class _Server:
    """`eep serve --http 127.0.0.1:0` in its own session; stopped (SIGTERM, then SIGKILL of the
    whole process group) and its temp dir removed on exit, also when the run fails."""

    def __init__(self, model_path: str, system: System, *, ep_size: int, concurrency: int, trace: Trace,
                 failure_timeout_s: float, dtype: str) -> None:
        per_rank = -(-concurrency // (ep_size - 1))  # survivors must hold every running request
        self.tmp = Path(tempfile.mkdtemp(prefix="eep-bench-"))
        self.log_path = self.tmp / "serve.log"
        self.model_name = Path(model_path).name
        self.admin_key = secrets.token_hex(16)  # the /admin endpoints (rejoin) want it as a Bearer token
        self.cmd = [
            sys.executable, "-m", "eep", "serve", "--model-path", model_path, "--ep-size", str(ep_size),
            "--http", "127.0.0.1:0", "--socket", str(self.tmp / "eep.sock"), "--max-num-seqs", str(per_rank),
            "--max-model-len", str(trace.max_model_len), "--failure-timeout", str(failure_timeout_s),
            "--dtype", dtype, "--admin-api-key", self.admin_key, *system.serve_args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.warmed = False

    def __enter__(self) -> _Server:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _start(self) -> None:
        logger.info("  starting eep serve %s", " ".join(self.cmd[self.cmd.index("serve") + 1:]))
        start = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        assert self.proc.stdout is not None
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = _START_TIMEOUT_S - (time.monotonic() - start)
                if left <= 0:
                    raise BenchFailed(f"eep serve did not start within {_START_TIMEOUT_S:.0f} s; its log ends:\n"
                                      f"{self.log_tail()}")
                if not sel.select(timeout=min(left, 1.0)) and self.proc.poll() is None:
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:  # stdout closed: the server exited
                    raise BenchFailed(f"eep serve exited with code {self.proc.wait(_STOP_TIMEOUT_S)} during "
                                      f"start-up; its log ends:\n{self.log_tail()}")
                line += chunk
        ready = line.decode().strip()
        if " http " not in ready:
            raise BenchFailed(f"unexpected ready line from eep serve: {ready!r}")
        self.url = ready.rsplit(" http ", 1)[1].strip()
        logger.info("  ready in %.1f s at %s", time.monotonic() - start, self.url)

    def _stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    logger.warning("eep serve did not stop within %.0f s: killing it", _STOP_TIMEOUT_S)
            try:  # ranks left behind by a server that did not stop cleanly
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(_STOP_TIMEOUT_S)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# -- CPU time ---------------------------------------------------------------------------------
_CPU_SAMPLE_S = 0.005  # how often a slice reads its server's CPU clocks (~10 us a reading)


def _process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) `pid` has used so far, all its threads, those that exited
    included: the process's CPU-time clock (clock_getcpuclockid, exact to the nanosecond and up
    to date for a thread running now). OSError once the process is gone."""
    return time.clock_gettime_ns(((~pid) << 3) | 2) / 1e9  # CPUCLOCK_SCHED of the whole process


def _stat_cpu_s(pid: int) -> float:
    """The fallback: utime + stime of /proc/PID/stat, in clock ticks (10 ms)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_source(pid: int) -> tuple[str, Any]:
    """The most precise reader of `pid`'s CPU time this host allows, and its name."""
    try:
        _process_cpu_s(pid)
        return "process_cpu_clock_ns", _process_cpu_s
    except OSError:  # no per-process CPU clocks (a sandboxed kernel): 10 ms ticks
        return "proc_stat_ticks", _stat_cpu_s


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (the server, its fork server and its ranks), from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_bytes().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return sorted(found)


def _cpu_at(samples: list[tuple[float, float]], t: float) -> float:
    """The CPU seconds at time `t`, linearly between the (time, CPU seconds) samples around it."""
    times = [s for s, _ in samples]
    i = bisect.bisect_left(times, t)
    if i == 0 or i == len(samples):
        return samples[min(i, len(samples) - 1)][1]
    (t0, c0), (t1, c1) = samples[i - 1], samples[i]
    return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1


# -- the clients ------------------------------------------------------------------------------
async def _complete(client: Any, model: str, trace: Trace, index: int, clock: float,
                    into: list[_Record] | None = None) -> _Record:
    """Stream request `index` of the trace, its record appended to `into` at once (so a
    cancelled request still counts the tokens it got); a failure is the record's error."""
    prompt, max_tokens = trace.request(index)
    rec = _Record(index, time.monotonic() - clock, max_tokens)
    if into is not None:
        into.append(rec)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    rec.done = True
                    break
                ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
                if ids:
                    rec.chunks.append((time.monotonic() - clock, len(ids)))
                    rec.token_ids += ids
    except Exception as e:  # noqa: BLE001 - any failure of a request is what this bench counts
        rec.error = f"{type(e).__name__}: {e}"
    return rec


def _client(server: _Server, concurrency: int) -> Any:
    """An async HTTP client of `server` with a connection for each of `concurrency` requests."""
    import httpx

    return httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(_REQUEST_TIMEOUT_S),
                             limits=httpx.Limits(max_connections=concurrency + 4,
                                                 max_keepalive_connections=concurrency + 4))


async def _drive(server: _Server, system: System, trace: Trace, *, concurrency: int, victim: int,
                 fault_at_s: float, rejoin_after_s: float, tail_s: float) -> tuple[dict[str, Any], list[_Record]]:
    async with _client(server, concurrency) as client:
        await _warm(client, server, trace, concurrency)
        pids = (await client.get("/membership")).json()["pids"]
        counter = itertools.count()
        records: list[_Record] = []
        clock, wall0 = time.monotonic(), time.time()
        until = {"end": fault_at_s + rejoin_after_s + tail_s}  # pushed back while a requested rejoin is not done
        times: dict[str, float] = {}

        async def worker() -> None:
            while time.monotonic() - clock < until["end"]:
                await _complete(client, server.model_name, trace, next(counter), clock, records)

        async def faults() -> None:
            next_report, next_poll = 1.0, 0.0
            while (now := time.monotonic() - clock) < until["end"]:
                if now >= next_report:
                    tokens = sum(n for r in records for t, n in r.chunks if now - 1.0 < t <= now)
                    logger.info("  t=%4.1f s  %5d tok/s  %d requests done", now, tokens,
                                sum(r.done for r in records))
                    next_report += 1.0
                if system.kill and "kill" not in times and now >= fault_at_s:
                    # the time the signal is sent: the death notice can reach the server in
                    # 0.1-0.2 ms, before os.kill has even returned here
                    times["kill"] = time.monotonic() - clock
                    os.kill(pids[victim], signal.SIGKILL)
                    logger.info("  t=%4.1f s  SIGKILL rank %d (pid %d)", times["kill"], victim, pids[victim])
                if system.rejoin and "rejoin_requested" not in times and now >= fault_at_s + rejoin_after_s:
                    resp = await client.post(f"/admin/ranks/{victim}/rejoin",
                                             headers={"Authorization": f"Bearer {server.admin_key}"})
                    times["rejoin_requested"] = time.monotonic() - clock
                    logger.info("  t=%4.1f s  rejoin rank %d requested (HTTP %d)", times["rejoin_requested"],
                                victim, resp.status_code)
                    if resp.status_code != 200:
                        raise BenchFailed(f"rejoin refused: {resp.text}")
                if "rejoin_requested" in times and "rejoin_done" not in times and now >= next_poll:
                    next_poll = now + 0.25
                    view = (await client.get("/membership")).json()["view"]
                    now = time.monotonic() - clock  # the GET can take over a second on a loaded host
                    if victim in view["active"]:  # switched in: serve `tail_s` more with it
                        times["rejoin_done"] = now
                        until["end"] = max(until["end"], now + tail_s)
                        logger.info("  t=%4.1f s  rank %d is back", now, victim)
                    elif now > times["rejoin_requested"] + _REJOIN_TIMEOUT_S:
                        raise BenchFailed(f"rank {victim} did not rejoin within {_REJOIN_TIMEOUT_S:.0f} s; the "
                                          f"server's log ends:\n{server.log_tail()}")
                    else:
                        until["end"] = max(until["end"], now + 1.0)
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await faults()
        logger.info("  waiting for the %d requests in flight", sum(not t.done() for t in tasks))
        await asyncio.wait_for(asyncio.gather(*tasks), _REQUEST_TIMEOUT_S)
        status = (await client.get("/membership")).json()
    events = [{**e, "t": e["time"] - wall0} for e in status.get("events", [])]
    times["load_end"] = until["end"]
    return _analyse(system, records, times, events), records


async def _warm(client: Any, server: _Server, trace: Trace, concurrency: int) -> None:
    """Untimed, once per server: one wave of trace-shaped requests (indices apart from the timed ones)."""
    if server.warmed:
        return
    warm = await asyncio.gather(*(_complete(client, server.model_name, trace, _WARM_FIRST_INDEX + i, time.monotonic())
                                  for i in range(concurrency)))
    bad = [r for r in warm if not r.complete]
    if bad:
        raise BenchFailed(f"a warm-up request failed: {bad[0].error}; the server's log ends:\n{server.log_tail()}")
    server.warmed = True


async def _interleaved(servers: dict[str, _Server], trace: Trace, *, concurrency: int, rounds: int,
                       slice_s: float) -> dict[str, Any]:
    """Steady-state tokens/s of each server, measured in alternating slices (ABBA...) of the
    same closed-loop load on the same requests, the others idle. On a shared host the rate
    drifts by several percent within a minute; alternating cancels the drift that separate
    runs would turn into a difference. The first third of a slice (at most 1 s: the loop ramping
    up) is not counted; at a slice's end the requests in flight are cancelled (the server aborts
    them). `round_ratios`: per round, the first server's speed over the second's on the same
    work (`_same_work_ratio`; where the two slices share no work, their token rates' ratio).
    `cpu_round_ratios`: per round, the second server's CPU seconds over the first's on that same
    work (`_same_work_cpu_ratio`), from each server's and its ranks' CPU clocks read every
    `_CPU_SAMPLE_S` through the slice (`cpu_source` says which clocks: `process_cpu_clock_ns`,
    exact, or the 10 ms ticks of /proc/PID/stat)."""
    ramp = min(1.0, slice_s / 3)
    first = next(iter(servers.values())).proc
    assert first is not None
    cpu_source, cpu_of = _cpu_source(first.pid)
    for srv in servers.values():
        async with _client(srv, concurrency) as client:
            await _warm(client, srv, trace, concurrency)
    tokens = {name: 0 for name in servers}
    slices: list[dict[str, Any]] = []
    arrivals: dict[tuple[int, str], list[tuple[float, int]]] = {}
    cpu: dict[tuple[int, str], list[tuple[float, float]] | None] = {}  # (time, CPU seconds) samples
    books: dict[tuple[int, str], dict[str, float] | None] = {}  # the server's own ledger over the slice
    for k in range(rounds):
        for name in (list(servers) if k % 2 == 0 else list(reversed(servers))):
            srv = servers[name]
            records: list[_Record] = []
            counter = itertools.count(_STEADY_FIRST_INDEX + k * 100_000)  # the same requests for every server
            assert srv.proc is not None
            pids = _descendants(srv.proc.pid)  # the server, its ranks, its fork server; none starts or ends in a slice
            samples: list[tuple[float, float]] = []
            async with _client(srv, concurrency) as client:
                clock = time.monotonic()

                async def worker() -> None:
                    while True:
                        await _complete(client, srv.model_name, trace, next(counter), clock, records)

                def read_cpu() -> None:
                    samples.append((time.monotonic() - clock, sum(cpu_of(p) for p in pids)))

                async def meter() -> None:
                    while True:
                        read_cpu()
                        await asyncio.sleep(_CPU_SAMPLE_S)

                metering = asyncio.create_task(meter())
                tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
                await asyncio.sleep(ramp)
                # the ledger from the end of the ramp, as the token counts: what a server did while
                # it idled through the other's slice (its heartbeats go on), its ranks report with
                # their first step, and it is no part of this slice's work
                books0, steps0 = await _books(client)
                await asyncio.sleep(max(0.0, slice_s - (time.monotonic() - clock)))
                metering.cancel()
                try:
                    read_cpu()  # at the slice's end, before the requests in flight are cancelled
                except OSError:  # a process of the server ended within the slice: no CPU figure
                    samples.clear()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await metering
                books1, steps1 = await _books(client)  # the steps of the slice; the cancelled requests' are idle work
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            books[k, name] = _books_delta(books0, books1)
            arrivals[k, name] = sorted(c for r in records for c in r.chunks if c[0] <= slice_s)
            cpu[k, name] = samples or None
            n = sum(c for t, c in arrivals[k, name] if ramp < t)
            tokens[name] += n
            slices.append({"server": name, "round": k, "tokens_per_s": n / (slice_s - ramp),
                           # committed steps from the ramp's end to the slice's end (None: not known)
                           "steps": steps1 - steps0 if steps0 is not None and steps1 is not None else None,
                           "tokens": sum(c for _, c in arrivals[k, name]), "processes": len(pids),
                           "cpu_s": samples[-1][1] - samples[0][1] if samples else None,
                           "ledger": books[k, name],
                           "cpu_samples": len(samples),  # the longest gap bounds the interpolation's error
                           "cpu_sample_gap_max_s": max((b[0] - a[0] for a, b in zip(samples, samples[1:])),
                                                       default=None)})
            logger.info("  steady slice %d/%d on %s: %.0f tok/s", len(slices), rounds * len(servers), name,
                        n / (slice_s - ramp))
    a, b = servers
    rate = {(s["round"], s["server"]): s["tokens_per_s"] for s in slices}
    per_round = [_round_ratio(arrivals[k, a], arrivals[k, b], ramp, rate[k, a], rate[k, b]) for k in range(rounds)]
    ratios = [r for r, _ in per_round]
    by_rate = [k for k, (r, rated) in enumerate(per_round) if rated and r is not None]
    cpu_ratios = [_same_work_cpu_ratio(arrivals[k, a], arrivals[k, b], ramp, cpu[k, a], cpu[k, b])
                  for k in range(rounds)]
    served = {k: [1.0 - led["bookkeeping_cpu_s"] / led["cpu_s"] if led is not None and led["cpu_s"] > 0 else None
                  for led in (books[k, a], books[k, b])] for k in range(rounds)}
    seconds = rounds * (slice_s - ramp)
    return {"tokens_per_s": {name: n / seconds for name, n in tokens.items()},
            "round_ratios": [r for r in ratios if r is not None], "rate_ratio_rounds": len(by_rate),
            # per round: the share of the first server's CPU that served tokens (not bookkeeping)
            # over the second's (eep.runtime.accounting)
            "bookkeeping_round_ratios": [sa / sb for sa, sb in served.values() if sa is not None and sb],
            "served_share": {name: [v[i] for v in served.values()] for i, name in enumerate(servers)},
            "cpu_round_ratios": [r for r in cpu_ratios if r is not None], "cpu_source": cpu_source,
            "slices": slices, "ramp_s": ramp, "slice_s": slice_s}


async def _books(client: Any) -> tuple[dict[str, Any] | None, int | None]:
    """The server's ledger (`accounting` of /membership; None if it keeps none) and its count of
    committed steps (`dataplane.steps`; None if it has no data plane)."""
    resp = await client.get("/membership")
    resp.raise_for_status()
    status = resp.json()
    return status.get("accounting"), status.get("dataplane", {}).get("steps")


def _books_delta(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the ledger grew by between `a` and `b`: bookkeeping CPU seconds (all, and by what)
    and all CPU seconds."""
    if a is None or b is None:
        return None
    by = {k: b["bookkeeping_cpu_s"][k] - a["bookkeeping_cpu_s"].get(k, 0.0) for k in b["bookkeeping_cpu_s"]}
    return {"bookkeeping_cpu_s": sum(by.values()), "by": by, "cpu_s": b["cpu_s"] - a["cpu_s"]}


def _round_ratio(a: list[tuple[float, int]], b: list[tuple[float, int]], start: float, rate_a: float,
                 rate_b: float) -> tuple[float | None, bool]:
    """One round's ratio, `a`'s speed over `b`'s, and whether it is the rates' ratio.

    On the same work (`_same_work_ratio`) where the two slices have enough work in common. A
    server several times faster than the other may have served, by `start` (the end of its
    ramp), more than (or nearly as much as) the other serves in its whole slice: with less in
    common than `_MIN_COMMON_SHARE` of what the slower of them served after the ramp (a span of
    a step or two, whose times are those of single chunks: a ratio of 0.006 was seen), the ratio
    of the slices' token rates after the ramp, `rate_a / rate_b` (leaving such a round out would
    drop exactly the largest ratios)."""
    common = _common_work(a, b, start)
    after = min(_total(a) - _count_by(a, start), _total(b) - _count_by(b, start))
    if (common is None or common[1] - common[0] < _MIN_COMMON_SHARE * after) and rate_b > 0:
        return rate_a / rate_b, True
    return _same_work_ratio(a, b, start), False


_MIN_COMMON_SHARE = 0.25


def _total(chunks: list[tuple[float, int]]) -> int:
    return sum(n for _, n in chunks)


def _count_by(chunks: list[tuple[float, int]], t: float) -> int:
    return sum(n for at, n in chunks if at <= t)


def _common_work(a: list[tuple[float, int]], b: list[tuple[float, int]], start: float) -> tuple[int, int] | None:
    """The token counts both had reached by `start` and both reached in all; None if empty."""
    lo = max(_count_by(a, start), _count_by(b, start))
    hi = min(_total(a), _total(b))
    return (lo, hi) if hi > lo else None


def _same_work_ratio(a: list[tuple[float, int]], b: list[tuple[float, int]], start: float) -> float | None:
    """`a`'s speed over `b`'s on the same work: from (arrival time, tokens) chunks of the same
    requests, b's time over a's time from the token count both had reached by `start` to the
    count both reached in all; None if that stretch is empty."""
    span = _same_work_span(a, b, start)
    if span is None:
        return None
    (a0, a1), (b0, b1) = span
    return (b1 - b0) / (a1 - a0) if a1 > a0 else None


def _same_work_cpu_ratio(a: list[tuple[float, int]], b: list[tuple[float, int]], start: float,
                         cpu_a: list[tuple[float, float]] | None,
                         cpu_b: list[tuple[float, float]] | None) -> float | None:
    """`b`'s CPU seconds over `a`'s on the same work as `_same_work_ratio` (the same token range,
    each on its own clock), from each one's (time, CPU seconds) samples; None if that stretch
    is empty or a server has no samples."""
    span = _same_work_span(a, b, start)
    if span is None or not cpu_a or not cpu_b:
        return None
    (a0, a1), (b0, b1) = span
    ca, cb = _cpu_at(cpu_a, a1) - _cpu_at(cpu_a, a0), _cpu_at(cpu_b, b1) - _cpu_at(cpu_b, b0)
    return cb / ca if ca > 0 else None


def _same_work_span(a: list[tuple[float, int]], b: list[tuple[float, int]],
                    start: float) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """When `a`, and when `b`, reached the token count both had reached by `start` and the count
    both reached in all: ((a's from, a's to), (b's from, b's to)); None if that range is empty."""
    def cumulative(chunks: list[tuple[float, int]]) -> tuple[list[float], list[int]]:
        return [t for t, _ in chunks], list(itertools.accumulate(n for _, n in chunks))

    (ta, na), (tb, nb) = cumulative(a), cumulative(b)

    def count_by(times: list[float], counts: list[int], t: float) -> int:
        i = bisect.bisect_right(times, t)
        return counts[i - 1] if i else 0

    lo = max(count_by(ta, na, start), count_by(tb, nb, start))
    hi = min(na[-1] if na else 0, nb[-1] if nb else 0)
    if hi <= lo:
        return None

    def span(times: list[float], counts: list[int]) -> tuple[float, float]:
        return times[bisect.bisect_left(counts, lo)], times[bisect.bisect_left(counts, hi)]

    return span(ta, na), span(tb, nb)


async def _reference(server: _Server, trace: Trace, indices: list[int], concurrency: int) -> dict[int, list[int]]:
    sem = asyncio.Semaphore(concurrency)
    async with _client(server, concurrency) as client:
        async def one(i: int) -> _Record:
            async with sem:
                return await _complete(client, server.model_name, trace, i, time.monotonic())

        recs = await asyncio.gather(*(one(i) for i in indices))
    bad = [r for r in recs if not r.complete]
    if bad:
        raise BenchFailed(f"the fault-free reference failed on request {bad[0].index}: {bad[0].error}")
    return {r.index: r.token_ids for r in recs}


# -- figures ----------------------------------------------------------------------------------
def _analyse(system: System, records: list[_Record], times: dict[str, float],
             events: list[dict[str, Any]]) -> dict[str, Any]:
    end = times["load_end"]
    arrivals = sorted(t for r in records for t, _ in r.chunks)
    last = max(arrivals, default=end)
    bins = [0] * (int(last / BIN_S) + 1)
    for r in records:
        for t, n in r.chunks:
            bins[int(t / BIN_S)] += n
    kill = times.get("kill")
    steady_to = kill if kill is not None else end
    rate = _rate(bins, _STEADY_FROM_S, steady_to)
    run: dict[str, Any] = {
        "label": system.label,
        "tokens_per_s_steady": rate,
        "requests": len(records),
        "requests_completed": sum(r.complete for r in records),
        "requests_lost": sum(not r.complete for r in records),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "times": times,
        "events": events,
        "tokens_per_bin": bins,
    }
    run["normal_gap_s"] = normal = _normal_gap(arrivals, _STEADY_FROM_S, steady_to)
    if kill is not None:
        until = times.get("rejoin_requested", last)
        run["longest_gap_after_kill_s"] = gap = _longest_gap(arrivals, kill, until)
        run["pause_after_kill_s"] = max(0.0, gap - normal)
        run["time_to_95_s"] = _time_to(sorted(c for r in records for c in r.chunks), kill, 0.95 * rate)
    rejoined = next((e["t"] for e in events if e["kind"] == "rejoined"), None)
    if kill is not None and rejoined is not None:
        run["times"]["rejoined"] = rejoined
        run["reintegration_pause_s"] = max(0.0, _longest_gap(arrivals, rejoined - 1.0, rejoined + 1.0) - normal)
    return run


def _normal_gap(arrivals: list[float], start: float, stop: float, window: float = 0.5) -> float:
    """The median over the `window`-second windows in [start, stop) of each one's longest gap
    between arrivals (the step cadence as clients see it; one slow step does not move it)."""
    gaps = [_longest_gap(arrivals, a, a + window)
            for a in (start + k * window for k in range(int((stop - start) / window)))]
    return statistics.median(gaps) if gaps else 0.0


def _rate(bins: list[int], start: float, stop: float) -> float:
    lo, hi = int(round(start / BIN_S)), int(round(stop / BIN_S))
    return sum(bins[lo:hi]) / ((hi - lo) * BIN_S) if hi > lo else 0.0


def _longest_gap(arrivals: list[float], start: float, stop: float) -> float:
    """The longest stretch between consecutive arrivals that ends after `start` and begins
    before `stop` (a stretch with no arrival on one side counts to that bound)."""
    inside = [t for t in arrivals if start < t < stop]
    before = [t for t in arrivals if t <= start][-1:] or [start]
    after = [t for t in arrivals if t >= stop][:1] or [stop]
    points = before + inside + after
    return max(b - a for a, b in zip(points, points[1:]))


def _time_to(chunks: list[tuple[float, int]], kill: float, target: float) -> float | None:
    """Seconds from the kill until the rate over a window starting then, and over the window
    after it, each reach `target` tokens/s (window starts tried every BIN_S)."""
    times = [t for t, _ in chunks]
    cum = list(itertools.accumulate((n for _, n in chunks), initial=0))

    def rate(start: float, stop: float) -> float:
        return (cum[bisect.bisect_right(times, stop)] - cum[bisect.bisect_right(times, start)]) / (stop - start)

    k = 0
    while times and (start := kill + k * BIN_S) + 2 * _WINDOW_S <= times[-1]:
        if rate(start, start + _WINDOW_S) >= target and rate(start + _WINDOW_S, start + 2 * _WINDOW_S) >= target:
            return k * BIN_S
        k += 1
    return None  # never back (within the run)


def _provenance() -> dict[str, Any]:
    """Where and when a record was made."""
    import torch

    return {"torch_version": torch.__version__, "cpu_count": os.cpu_count(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _result(runs: dict[str, dict[str, Any]], steady: dict[str, Any] | None, trace: Trace, config: dict[str, Any],
            labels: dict[str, str]) -> dict[str, Any]:
    eep, fixed, restart = runs.get("eep"), runs["fixed"], runs.get("restart")
    summary: dict[str, Any] = {}
    if eep is not None:
        # the interleaved measurement; else (no slices, or no round with work in common: an
        # overloaded host) the timed runs' own pre-fault rates
        if steady is not None and steady["round_ratios"]:
            ratio = statistics.median(steady["round_ratios"])
        else:
            window = (_STEADY_FROM_S, eep["times"]["kill"])
            ratio = _rate(eep["tokens_per_bin"], *window) / _rate(fixed["tokens_per_bin"], *window)
        summary |= {
            "steady_state_ratio": ratio,
            **(_cpu_summary(steady) if steady is not None else {}),
            "recovery_pause_s": eep["pause_after_kill_s"],
            "recovery_longest_gap_s": eep["longest_gap_after_kill_s"],
            "normal_gap_s": eep["normal_gap_s"],
            "reintegration_pause_s": eep.get("reintegration_pause_s"),
            "time_to_95_s": eep["time_to_95_s"],
            "requests_lost": eep["requests_lost"],
            "outputs_differing": eep["outputs_differing"],
        }
    if restart is not None:
        summary |= {
            "full_restart_unavailable_s": restart["pause_after_kill_s"],
            "full_restart_longest_gap_s": restart["longest_gap_after_kill_s"],
            "full_restart_time_to_95_s": restart["time_to_95_s"],
            "full_restart_requests_lost": restart["requests_lost"],
            "full_restart_outputs_differing": restart["outputs_differing"],
        }
    if eep is not None and restart is not None:
        summary["restart_over_recovery"] = summary["full_restart_unavailable_s"] / max(summary["recovery_pause_s"], 1e-3)
        summary["restart_over_recovery_longest_gaps"] = (summary["full_restart_longest_gap_s"]
                                                         / summary["recovery_longest_gap_s"])
    targets = {
        "recovery_pause_le_restart_over_50": ("restart_over_recovery", lambda v: v >= 50),
        "steady_state_ratio_ge_0.99": ("steady_state_ratio", lambda v: v >= 0.99),
        "steady_state_cpu_ratio_ge_0.99": ("steady_state_cpu_ratio", lambda v: v >= 0.99),
        "steady_state_bookkeeping_ratio_ge_0.99": ("steady_state_bookkeeping_ratio", lambda v: v >= 0.99),
        "no_request_lost": ("requests_lost", lambda v: v == 0),
        "no_output_differing": ("outputs_differing", lambda v: v == 0),
    }
    return {
        "summary": summary,
        "targets_met": {name: check(summary[key]) for name, (key, check) in targets.items()
                        if summary.get(key) is not None},
        "bin_s": BIN_S,
        "steady_state": steady,
        "systems": runs,
        "labels": labels,
        "config": {**config, "max_model_len": trace.max_model_len},
        **_provenance(),
    }


def _cpu_summary(steady: dict[str, Any]) -> dict[str, Any]:
    """`steady_state_cpu_ratio` (the median of the rounds' CPU ratios), `steady_state_bookkeeping_ratio`
    (of the rounds' served shares) and their spreads."""
    r, k = steady["cpu_round_ratios"], steady.get("bookkeeping_round_ratios") or []
    return {"steady_state_bookkeeping_ratio": statistics.median(k) if k else None,
            "steady_state_bookkeeping_ratio_min": min(k, default=None),
            "steady_state_bookkeeping_ratio_max": max(k, default=None),
            "steady_state_bookkeeping_ratio_stdev": statistics.stdev(k) if len(k) > 1 else None,
            "steady_state_cpu_ratio": statistics.median(r) if r else None,
            "steady_state_cpu_ratio_min": min(r, default=None), "steady_state_cpu_ratio_max": max(r, default=None),
            "steady_state_cpu_ratio_stdev": statistics.stdev(r) if len(r) > 1 else None,
            "steady_state_cpu_source": steady["cpu_source"]}


# -- output -----------------------------------------------------------------------------------
def summary_table(result: dict[str, Any]) -> str:
    """The per-system table and the summary line that `eep bench failure` prints."""
    rows = [("system", "tok/s steady", "normal gap", "longest gap after kill", "pause after kill", "back to 95%",
             "reintegration", "requests", "lost", "differing")]
    for run in result["systems"].values():
        pause, back = run.get("pause_after_kill_s"), run.get("time_to_95_s")
        rows.append((
            run["label"], f"{run['tokens_per_s_steady']:.0f}", f"{run['normal_gap_s']:.3f} s",
            f"{run['longest_gap_after_kill_s']:.3f} s" if pause is not None else "no fault",
            f"{pause:.3f} s" if pause is not None else "-",
            f"{back:.2f} s" if back is not None else ("-" if pause is None else "never"),
            f"{run['reintegration_pause_s']:.3f} s" if "reintegration_pause_s" in run else "-",
            str(run["requests"]), str(run["requests_lost"]), str(run["outputs_differing"]),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = result["summary"]
    if "restart_over_recovery" in s:
        lines.append(
            f"\nrecovery pause {s['recovery_pause_s']:.3f} s = 1/{s['restart_over_recovery']:.0f} of the full "
            f"restart's {s['full_restart_unavailable_s']:.2f} s (pause = longest gap after the kill - normal gap; "
            f"longest gaps alone: {s['recovery_longest_gap_s']:.3f} s vs {s['full_restart_longest_gap_s']:.2f} s, "
            f"1/{s['restart_over_recovery_longest_gaps']:.0f})"
        )
    steady = result.get("steady_state")
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
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Throughput over time, one line per system, the kill / rejoin / rejoined moments marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"eep": "tab:blue", "fixed": "tab:gray", "restart": "tab:red", "gloo-restart": "tab:orange"}
    smooth = int(round(_WINDOW_S / BIN_S))
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=120)
    for name, run in result["systems"].items():
        bins = run["tokens_per_bin"]
        rates = [sum(bins[max(0, i - smooth + 1):i + 1]) / (min(i + 1, smooth) * BIN_S) for i in range(len(bins))]
        ax.plot([(i + 1) * BIN_S for i in range(len(bins))], rates, label=run["label"], color=colors.get(name),
                linewidth=1.6 if name != "fixed" else 1.2, linestyle="-" if name != "fixed" else "--")
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
    s = result["summary"]
    title = "committed tokens/s seen by the clients (0.5 s moving average)"
    if "recovery_pause_s" in s:
        title += f" — eep pause {s['recovery_pause_s'] * 1000:.0f} ms"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel("tokens/s")
    ax.set_xlim(0, max(run["times"]["load_end"] for run in result["systems"].values()) + 0.5)  # not the drain
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
