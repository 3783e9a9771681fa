"""Every constant of `eep sim`, with its source: one table, rendered into docs/sim.md.

What this module promises: each `Constant` has a value, the range the evidence leaves (`low`,
`high`; equal where the figure is exact), a unit and a source. `kind` says what the source is:
- "spec": a vendor data sheet, a model's published configuration or a specification;
- "code": a default in a system's source code;
- "published": a figure a project or paper published (a report, an issue with a measurement);
- "eep": eep's own default or a figure measured on eep here (`eep bench ...`);
- "unknown": no source gives it; `value` is a stated assumption and the simulator reports the
  spread the range leaves (`eep sim paper` runs every system at `low` and at `high` as well).
No constant is fitted to the figures `eep sim paper` compares against (the paper's 11 / 8 /
52 / 348 s and SGLang's 6.2-6.8 s); those live in `PUBLISHED`, read only by the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Kind = Literal["spec", "code", "published", "eep", "unknown"]


@dataclass(frozen=True, slots=True)
class Constant:
    value: float
    unit: str
    kind: Kind
    source: str
    low: float | None = None
    high: float | None = None

    @property
    def range(self) -> tuple[float, float]:
        return (self.value if self.low is None else self.low, self.value if self.high is None else self.high)


_DSV3 = "DeepSeek-V3 technical report (arXiv:2412.19437)"
_INFER = "DeepSeek-V3/R1 inference system overview (deepseek-ai/open-infra-index, 2025-03-01)"

CONSTANTS: dict[str, Constant] = {
    # -- the cluster (the topology file holds the same figures)
    "nvlink_bytes_per_s": Constant(160e9, "B/s", "published", f"{_DSV3}, 3.2.2: NVLink 160 GB/s on H800 nodes"),
    "rdma_bytes_per_s": Constant(50e9, "B/s", "published", f"{_DSV3}, 3.2.2: InfiniBand 50 GB/s per GPU"),
    "pcie_bytes_per_s": Constant(64e9, "B/s", "spec", "PCI Express 5.0 x16: 32 GT/s x 16 lanes, ~64 GB/s each way "
                                 "(PCI-SIG); host memory <-> GPU"),
    "nvme_bytes_per_s": Constant(25e9, "B/s", "unknown", "a node's local NVMe read rate; one PCIe 4.0 data-center "
                                 "drive reads ~7 GB/s (e.g. Samsung PM9A3 data sheet: 6.9 GB/s), DGX H100 has 8 "
                                 "(data sheet); what a RAID of them gives a checkpoint read is not published",
                                 low=7e9, high=55e9),
    "host_memory_bytes": Constant(2e12, "B", "spec", "NVIDIA DGX H100 data sheet: 2 TB system memory per node"),
    # -- the model and its load
    "decode_step_s": Constant(0.0476, "s", "published", f"{_INFER}: 20-22 output tokens/s per user, i.e. one "
                              "decode step every 45-50 ms", low=0.0455, high=0.050),
    "decode_tokens_per_s_per_gpu": Constant(1850.0, "tokens/s", "published",
                                            f"{_INFER}: 14.8k output tokens/s per H800 node of 8 GPUs"),
    "prefill_tokens_per_s_per_gpu": Constant(9212.0, "tokens/s", "published",
                                             f"{_INFER}: 73.7k input tokens/s per node (cache hits included)"),
    "kv_tokens_per_request": Constant(4989.0, "tokens", "published",
                                      f"{_INFER}: average KV-cache length per output token 4,989"),
    # -- starting a rank process (every system pays these for a new or restarted process)
    "process_start_s": Constant(20.0, "s", "unknown", "Python + torch + CUDA context + NCCL/NVSHMEM set-up of one "
                                "serving process: no published figure for DeepSeek-V3 serving; eep's own CPU rank "
                                "starts in ~1 s (eep bench recovery), a GPU one adds the CUDA context",
                                low=5.0, high=60.0),
    "deepgemm_warmup_s": Constant(46.0, "s", "published", "SGLang issue #33111: DeepGEMM JIT warm-up, 46 s median",
                                  low=30.0, high=90.0),
    "cuda_graph_capture_s": Constant(30.0, "s", "unknown", "SGLang's 'Capture cuda graph end' log line for "
                                     "DeepSeek-V3 decode batch sizes; no systematic figure published",
                                     low=10.0, high=60.0),
    "cuda_graph_recapture_s": Constant(3.0, "s", "unknown", "re-capturing the decode graphs of an already warm "
                                       "process for a new EP membership (kernels compiled, memory pooled); assumed a "
                                       "tenth of a first capture", low=1.0, high=10.0),
    "scheduler_restart_s": Constant(60.0, "s", "unknown", "the orchestrator noticing a dead job and scheduling all "
                                    "its pods/processes again (Kubernetes, Slurm); no figure for LLM serving",
                                    low=15.0, high=180.0),
    # -- detection
    "deepep_timeout_s": Constant(100.0, "s", "code", "DeepEP csrc/kernels/configs.cuh: NUM_TIMEOUT_CYCLES 200G "
                                 "cycles, '~= 100s': a fixed-membership instance waits this long on a dead peer"),
    "sglang_dispatch_timeout_s": Constant(10.0, "s", "published", "SGLang Elastic EP with Mooncake EP: a rank that "
                                          "does not answer a dispatch within the timeout is masked out (PR #11657 "
                                          "and follow-ups)", low=5.0, high=30.0),
    "eep_failure_timeout_s": Constant(1.0, "s", "eep", "eep's --failure-timeout default: a hung rank's heartbeat "
                                      "silence, a lost host's lease/heartbeats"),
    "eep_death_notice_s": Constant(0.001, "s", "eep", "eep's death notice: a dead rank process is seen by its "
                                   "host's agent through its pidfd (< 1 ms measured, eep bench recovery)"),
    "eep_reprefill_share": Constant(0.5, "of a step", "eep", "eep's choice: the chunks that prefill a dead rank's "
                                    "requests again take at most this share of each step's work (the scheduler's "
                                    "prefill budget), so the survivors keep decoding meanwhile", low=0.25, high=0.75),
    # -- failures
    "failures_per_gpu_day": Constant(419 / (54 * 16384), "1/(GPU day)", "published",
                                     "Llama 3 report (arXiv:2407.21783): 419 unexpected interruptions in 54 days "
                                     "on 16,384 H100 GPUs"),
}

# The figures `eep sim paper` compares against; never an input.
PUBLISHED: dict[str, dict[str, float]] = {
    "eep_paper": {"recovery_pause_s": 11.0, "reintegration_pause_s": 8.0, "time_to_95_s": 52.0},
    "full_restart": {"unavailable_s": 348.0},
    "sglang": {"recovery_pause_s": 6.5},  # 6.2-6.8 s for 1-16 failed ranks of 32 (DeepSeek-V3.2)
}
PUBLISHED_SOURCES = {
    "eep_paper": "'Surviving Partial Rank Failures in Wide Expert-Parallel MoE Inference' (2026), EP 32",
    "full_restart": "the same paper: a full restart leaves the instance unavailable for 348 s",
    "sglang": "SGLang Elastic EP with Mooncake: 6.2-6.8 s interruption for 1, 2, 4, 8 and 16 failed ranks of 32",
}
SGLANG_PUBLISHED_RANGE_S = (6.2, 6.8)


def value(name: str, at: str = "value") -> float:
    """The constant `name` at its `value`, `low` or `high`."""
    c = CONSTANTS[name]
    return {"value": c.value, "low": c.range[0], "high": c.range[1]}[at]


def constants_at(at: str) -> dict[str, float]:
    """Every constant at `at` ("value", "low" or "high"): the simulator's inputs."""
    return {name: value(name, at) for name in CONSTANTS}


def with_value(name: str, new: float) -> Constant:
    return replace(CONSTANTS[name], value=new)


def _fmt(v: float, unit: str) -> str:
    if unit == "B/s":
        return f"{v / 1e9:g} GB/s"
    if unit == "B":
        return f"{v / 1e12:g} TB"
    if unit == "1/(GPU day)":
        return f"{v:.3g} /GPU/day"
    return f"{v:g} {unit}"


def markdown_table() -> str:
    """The constants table of docs/sim.md."""
    rows = ["| constant | value | range | kind | source |", "|---|---|---|---|---|"]
    for name, c in CONSTANTS.items():
        lo, hi = c.range
        span = "exact" if lo == hi else f"{_fmt(lo, c.unit)} - {_fmt(hi, c.unit)}"
        rows.append(f"| `{name}` | {_fmt(c.value, c.unit)} | {span} | {c.kind} | {c.source} |")
    return "\n".join(rows)
