"""The engine benchmark runs end to end on a tiny checkpoint and reports consistent figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from eep.bench.engine import run_engine_bench

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    config = transformers.Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_engine_bench_reports_consistent_figures_in_fp32(tiny_checkpoint: Path) -> None:
    result = run_engine_bench(
        str(tiny_checkpoint), batch_size=4, output_len=8, prompt_len=8, dtype="float32", repeats=1
    )
    json.dumps(result)  # JSON-able as promised
    for key in ("eep_tokens_per_s", "transformers_tokens_per_s", "speedup"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    for system in ("eep", "transformers"):
        for key in ("decode_s", "prefill_s", "ms_per_step"):
            assert math.isfinite(result[system][key]) and result[system][key] > 0, (system, key)
    assert result["speedup"] == pytest.approx(result["eep_tokens_per_s"] / result["transformers_tokens_per_s"])
    assert result["dtype"] == "float32" and result["model_type"] == "qwen3_moe"
    assert (result["batch_size"], result["output_len"], result["prompt_len"]) == (4, 8, 8)
    assert result["torch_threads"] >= 1 and result["torch_version"] and result["transformers_version"]
    assert result["timestamp"]
    # eep matches transformers exactly in fp32 greedy, so every generated token must agree.
    assert result["greedy_token_agreement"] == 1.0
