"""Steady-state serving of one request set on the expert-parallel runtime, per data-plane backend.

What `run_steady_bench` promises: every backend serves the same requests (seeded random
token-id prompts, greedy, EOS ignored, so every request runs exactly `output_len` tokens) on
the same model, ranks and placement, after the same warm-up, timed the same way. Only decode
steps (every running request decodes one token, nothing prefills) count toward the decode
figures. Per step it records the wall time of the whole step (engine side: scheduling, the
ranks' forward and sampling, commit) and, per rank, the wall time of every dispatch and
combine call. Two exchange figures come from those:
- `exchange_ms_*`: per step, the mean over ranks of the time inside dispatch + combine. It
  includes waiting for peers that are still computing, which with more ranks than cores is
  mostly waiting for a core: it tracks the compute skew as much as the data plane.
- `exchange_critical_ms_*`: per step, the sum over its dispatch/combine calls of the shortest
  time any rank spent in that call. The rank that arrives last at an exchange waits for no one,
  so its time is the data plane's own cost (packing, transport, unpacking); this is the figure
  `exchange_speedup` compares.
The greedy outputs of all backends must agree; the result says whether they did.
"""

from __future__ import annotations

import datetime
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from eep.config import EngineConfig
from eep.control.config import BACKENDS, EPConfig
from eep.control.executor import EPExecutor
from eep.engine.engine import LLMEngine
from eep.engine.sampling import SamplingParams
from eep.errors import CheckpointFileMissing, ConfigError

logger = logging.getLogger(__name__)

FIRST_PROMPT_ID = 3  # ids 0..2 are special (pad/bos/eos) in the checkpoints eep builds


def checkpoint_vocab(model_path: str) -> int:
    """`vocab_size` of the checkpoint at `model_path` (the range of the benches' random prompts)."""
    config_file = Path(model_path) / "config.json"
    if not config_file.exists():
        raise CheckpointFileMissing(f"{config_file} not found: pass a checkpoint directory")
    return int(json.loads(config_file.read_text())["vocab_size"])


def run_steady_bench(
    model_path: str,
    *,
    ep_size: int = 4,
    backends: tuple[str, ...] = BACKENDS,
    num_requests: int = 64,
    prompt_len: int = 128,
    output_len: int = 128,
    num_redundant_experts: int = 0,
    dtype: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Serve the same requests through each backend in `backends`; return a JSON-able dict.

    With both backends, `exchange_speedup` is gloo's median per-step critical exchange time
    over shm's (`exchange_speedup_incl_waits`: the same for the mean time inside the calls), and
    `throughput_ratio` is shm's decode tokens/s over gloo's.
    """
    if num_requests < 1 or prompt_len < 1 or output_len < 2:
        raise ConfigError("need num_requests >= 1, prompt_len >= 1 and output_len >= 2")
    if not backends or any(b not in BACKENDS for b in backends):
        raise ConfigError(f"backends must be a non-empty subset of {BACKENDS}, got {backends}")
    vocab = checkpoint_vocab(model_path)
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(FIRST_PROMPT_ID, vocab, (num_requests, prompt_len), generator=g).tolist()
    per_rank = -(-num_requests // ep_size)
    config = EngineConfig(
        model_path, dtype=dtype, max_num_seqs=per_rank, max_model_len=prompt_len + output_len + 8,
        max_num_batched_tokens=max(2048, per_rank * prompt_len), progress=False,
    )
    results: dict[str, dict[str, Any]] = {}
    outputs: dict[str, list[list[int]]] = {}
    for backend in backends:
        ep = EPConfig(ep_size=ep_size, num_redundant_experts=num_redundant_experts, backend=backend)
        results[backend], outputs[backend] = _serve(config, ep, prompts, output_len)
    first = outputs[backends[0]]
    result: dict[str, Any] = {
        "exchange_speedup": None,
        "exchange_speedup_incl_waits": None,
        "throughput_ratio": None,
        "outputs_identical": all(o == first for o in outputs.values()),
        "model_path": model_path,
        "ep_size": ep_size,
        "num_redundant_experts": num_redundant_experts,
        "num_requests": num_requests,
        "prompt_len": prompt_len,
        "output_len": output_len,
        "dtype": dtype,
        "seed": seed,
        **results,
        "torch_version": torch.__version__,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if "shm" in results and "gloo" in results:
        shm, gloo = results["shm"], results["gloo"]
        result["exchange_speedup"] = gloo["exchange_critical_ms_median"] / shm["exchange_critical_ms_median"]
        result["exchange_speedup_incl_waits"] = gloo["exchange_ms_median"] / shm["exchange_ms_median"]
        result["throughput_ratio"] = shm["decode_tokens_per_s"] / gloo["decode_tokens_per_s"]
    return result


def _serve(
    config: EngineConfig, ep: EPConfig, prompts: list[list[int]], output_len: int
) -> tuple[dict[str, Any], list[list[int]]]:
    """Start an instance, warm it up, serve `prompts` step by step, and time every step."""
    logger.info("%s: starting %d ranks", ep.backend, ep.ep_size)
    executor = EPExecutor(config, ep)
    engine = LLMEngine(config, executor)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    try:
        engine.generate([p[:16] for p in prompts[: 2 * ep.ep_size]], SamplingParams(max_tokens=8, ignore_eos=True))
        reqs = [engine.add_request(p, params) for p in prompts]
        steps: list[tuple[float, float, float, int]] = []  # decode steps: wall, exchange, critical (s), tokens
        start = time.perf_counter()
        while engine.has_work():
            decode = _is_decode_step(engine)
            running = sum(len(s.running) for s in engine.schedulers)
            t0 = time.perf_counter()
            engine.step()
            wall = time.perf_counter() - t0
            if decode:
                ranks = executor.last_step
                exchange = statistics.fmean(r.exchange_total_s for r in ranks)
                critical = sum(map(min, zip(*(r.exchange_s for r in ranks), strict=True)))
                steps.append((wall, exchange, critical, running))
        total = time.perf_counter() - start
    finally:
        engine.close()
    if not steps:
        raise ConfigError("no decode step was timed: raise output_len")
    walls = sorted(s[0] for s in steps)
    exchanges = sorted(s[1] for s in steps)
    critical = sorted(s[2] for s in steps)
    decode_s = sum(walls)
    stats = {
        "decode_tokens_per_s": sum(s[3] for s in steps) / decode_s,
        "total_tokens_per_s": len(prompts) * output_len / total,
        "decode_steps": len(steps),
        "step_ms_median": 1e3 * statistics.median(walls),
        "step_ms_p99": 1e3 * _percentile(walls, 0.99),
        "exchange_ms_median": 1e3 * statistics.median(exchanges),
        "exchange_ms_p99": 1e3 * _percentile(exchanges, 0.99),
        "exchange_ms_mean": 1e3 * statistics.fmean(exchanges),
        "exchange_fraction": sum(exchanges) / decode_s,
        "exchange_critical_ms_median": 1e3 * statistics.median(critical),
        "exchange_critical_ms_p99": 1e3 * _percentile(critical, 0.99),
        "total_s": total,
    }
    logger.info(
        "%s: %.0f decode tok/s, step %.2f ms (p99 %.2f), exchange %.2f ms per step (critical %.2f)",
        ep.backend, stats["decode_tokens_per_s"], stats["step_ms_median"], stats["step_ms_p99"],
        stats["exchange_ms_median"], stats["exchange_critical_ms_median"],
    )
    return stats, [r.output_ids for r in reqs]


def _is_decode_step(engine: LLMEngine) -> bool:
    """True when the next step is decode only: nothing waits and every running request has
    its whole history cached but the last token."""
    return all(
        not s.waiting and all(r.num_computed == r.num_tokens - 1 for r in s.running) for s in engine.schedulers
    ) and engine.has_work()


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]
