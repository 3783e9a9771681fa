"""Decode throughput of eep against transformers' `generate`, on the same checkpoint and prompts.

What `run_engine_bench` promises: both systems run in this process, on one batch of identical
random prompts (seeded, so every run uses the same ids), greedy, ignoring EOS, in the same
dtype, each with one warm-up and the same timing method. Decode time is the median time to
generate `output_len` tokens minus the median time to generate one (which is prefill plus one
sampling step), so the figure compares the steady decode loop and not the prefill.
transformers is imported here only; the engine never needs it.
"""

from __future__ import annotations

import datetime
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eep.config import EngineConfig, resolve_dtype
from eep.errors import CheckpointFileMissing, ConfigError

logger = logging.getLogger(__name__)

_FIRST_ID = 3  # ids 0..2 are special (pad/bos/eos) in the checkpoints eep builds

# A generator: n new tokens for the whole batch -> generated ids [B, n].
Generate = Callable[[int], list[list[int]]]


def run_engine_bench(
    model_path: str,
    *,
    batch_size: int = 16,
    output_len: int = 64,
    prompt_len: int = 32,
    dtype: str = "auto",
    seed: int = 0,
    repeats: int = 3,
) -> dict[str, Any]:
    """Benchmark eep and transformers on `model_path`; return a JSON-able dict of the figures."""
    if batch_size < 1 or prompt_len < 1 or output_len < 2 or repeats < 1:
        raise ConfigError("need batch_size >= 1, prompt_len >= 1, output_len >= 2 and repeats >= 1")
    config_file = Path(model_path) / "config.json"
    if not config_file.exists():
        raise CheckpointFileMissing(f"{config_file} not found: pass a checkpoint directory")
    hf_config = json.loads(config_file.read_text())
    torch_dtype = resolve_dtype(dtype, hf_config)
    prompts = _random_prompts(batch_size, prompt_len, int(hf_config["vocab_size"]), seed)

    eep_gen = _eep_generator(model_path, dtype, prompts, output_len)
    eep_stats, eep_tokens = _measure("eep", eep_gen, batch_size, output_len, repeats)
    del eep_gen  # free the engine's KV cache and weights before loading the second model
    hf_gen = _transformers_generator(model_path, torch_dtype, prompts, hf_config)
    hf_stats, hf_tokens = _measure("transformers", hf_gen, batch_size, output_len, repeats)

    import transformers

    speedup = eep_stats["tokens_per_s"] / hf_stats["tokens_per_s"]
    return {
        "model_path": model_path,
        "model_type": hf_config.get("model_type"),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "output_len": output_len,
        "repeats": repeats,
        "seed": seed,
        "eep_tokens_per_s": eep_stats["tokens_per_s"],
        "transformers_tokens_per_s": hf_stats["tokens_per_s"],
        "speedup": speedup,
        "eep": eep_stats,
        "transformers": hf_stats,
        "greedy_token_agreement": _agreement(eep_tokens, hf_tokens),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _random_prompts(batch_size: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    if vocab_size <= _FIRST_ID:
        raise ConfigError(f"vocab_size {vocab_size} leaves no non-special token ids to draw prompts from")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(_FIRST_ID, vocab_size, (batch_size, prompt_len), generator=g).tolist()


def _eep_generator(model_path: str, dtype: str, prompts: list[list[int]], output_len: int) -> Generate:
    from eep.engine.engine import LLMEngine
    from eep.engine.sampling import SamplingParams

    batch_size, prompt_len = len(prompts), len(prompts[0])
    engine = LLMEngine(
        EngineConfig(
            model_path,
            dtype=dtype,
            max_num_seqs=batch_size,
            max_model_len=prompt_len + output_len + 8,
            max_num_batched_tokens=max(2048, batch_size * prompt_len),
            progress=False,
        )
    )

    def generate(n: int) -> list[list[int]]:
        outs = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        return [o.output_ids for o in outs]

    return generate


def _transformers_generator(
    model_path: str, torch_dtype: torch.dtype, prompts: list[list[int]], hf_config: dict[str, Any]
) -> Generate:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).eval()
    input_ids = torch.tensor(prompts, dtype=torch.int64)
    mask = torch.ones_like(input_ids)  # equal-length prompts: no padding anywhere
    pad = hf_config.get("pad_token_id")
    pad = pad if pad is not None else (hf_config.get("eos_token_id") or 0)
    pad = pad[0] if isinstance(pad, list) else pad

    def generate(n: int) -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,  # with do_sample=False this is greedy that never stops at EOS
                do_sample=False,
                pad_token_id=pad,
            )
        return out[:, input_ids.shape[1] :].tolist()

    return generate


def _measure(
    name: str, generate: Generate, batch_size: int, output_len: int, repeats: int
) -> tuple[dict[str, float], list[list[int]]]:
    """Warm up once, then time 1-token and `output_len`-token runs; return figures and the tokens."""
    logger.info("%s: warm-up (%d x %d tokens)", name, batch_size, output_len)
    tokens = generate(output_len)
    # Interleaved, so that load from other processes weighs on both kinds of run alike.
    pairs = [(_timed(generate, 1), _timed(generate, output_len)) for _ in range(repeats)]
    prefill = statistics.median(p for p, _ in pairs)
    full = statistics.median(f for _, f in pairs)
    decode = full - prefill
    if decode <= 0:
        raise ConfigError(
            f"{name}: decode time {decode:.4f} s is not positive (timings too noisy): "
            "raise output_len or repeats, or run on a less loaded machine"
        )
    stats = {
        "prefill_s": prefill,
        "total_s": full,
        "decode_s": decode,
        "ms_per_step": 1e3 * decode / (output_len - 1),
        "tokens_per_s": batch_size * (output_len - 1) / decode,
    }
    logger.info("%s: %.1f decode tokens/s (%.2f ms/step)", name, stats["tokens_per_s"], stats["ms_per_step"])
    return stats, tokens


def _timed(generate: Generate, n: int) -> float:
    start = time.perf_counter()
    generate(n)
    return time.perf_counter() - start


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where the two greedy outputs pick the same token."""
    pairs = [(x, y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)
