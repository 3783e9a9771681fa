"""`eep.LLM`, the Python entry point: single process and expert-parallel give the same text."""

from __future__ import annotations

from pathlib import Path

import eep
from eep.model.default_model import init_model


def test_llm_single_and_expert_parallel_agree(tmp_path: Path) -> None:
    model = str(init_model(tmp_path / "m", "qwen3_moe"))
    params = eep.SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = ["Expert parallelism", "routing tables", "x"]
    with eep.LLM(model, dtype="float32", max_model_len=64) as llm:
        single = [o.text for o in llm.generate(prompts, params)]
    with eep.LLM(model, dtype="float32", max_model_len=64, ep_size=2, ep_num_redundant_experts=2) as llm:
        assert [o.text for o in llm.generate(prompts, params)] == single
        assert len(llm.generate("one bare prompt", params)) == 1
    assert all(single)
