"""The benches' shared harness: servers, clients, the token timeline, interleaving, CPU time.

Every bench that drives a real `eep serve --http` (failure, chaos, hosts, fuzz) and every bench
that reads figures off a token timeline (those and recovery) does it with these pieces, so a
figure means the same in every record:
- `server`: `LocalServer` (`eep serve` as a child process, its log in a temp dir) and
  `NamespaceServer` (an instance on namespace hosts), one `ServerHandle` interface;
- `clients`: the request `Trace`, each request's `RequestRecord`, `complete` (streamed) and
  `complete_whole`, `ClosedLoop` clients, the warm-up and the fault-free reference outputs;
- `timeline`: tokens per bin, gaps between arrivals, the pre-fault rate and the time back to it;
- `faultrun`: one timed run with a rank SIGKILLed and asked back, and its figures;
- `interleave`: two servers compared in alternating (ABBA) slices on the same work;
- `cpu`: a server's CPU time, every process below it, sampled;
- `record`: provenance, and the collector frozen around a run.
"""

from __future__ import annotations

from eep.bench.harness import timeline
from eep.bench.harness.clients import (
    REQUEST_TIMEOUT_S,
    ClosedLoop,
    RequestRecord,
    Trace,
    complete,
    complete_whole,
    http_client,
    membership,
    serve_reference,
    warm,
    warm_all,
)
from eep.bench.harness.cpu import (
    CpuMeter,
    cpu_at,
    cpu_source,
    descendants,
    process_cpu_s,
    stat_cpu_s,
)
from eep.bench.harness.faultrun import analyse_fault_run, drive_fault_run
from eep.bench.harness.interleave import (
    cpu_summary,
    interleaved,
    round_ratio,
    same_work_cpu_ratio,
    same_work_ratio,
)
from eep.bench.harness.record import frozen_gc, provenance, save_timeline_plot
from eep.bench.harness.server import (
    FIXED,
    BenchFailed,
    LocalServer,
    NamespaceServer,
    ServerHandle,
    System,
    start_namespace_server,
)

__all__ = [
    "FIXED", "REQUEST_TIMEOUT_S", "BenchFailed", "ClosedLoop", "CpuMeter", "LocalServer", "NamespaceServer",
    "RequestRecord", "ServerHandle", "System", "Trace", "analyse_fault_run", "complete", "complete_whole", "cpu_at",
    "cpu_source", "cpu_summary", "descendants", "drive_fault_run", "frozen_gc", "http_client", "interleaved",
    "membership", "process_cpu_s", "provenance", "round_ratio", "same_work_cpu_ratio", "same_work_ratio",
    "save_timeline_plot", "serve_reference", "start_namespace_server", "stat_cpu_s", "timeline", "warm", "warm_all",
]
