"""Numerical parity with transformers, the oracle: logits to 1e-4 in fp32, greedy tokens identical.

The checkpoints are made by transformers itself (`save_pretrained` of a randomly initialised
model), so this also proves that eep reads the Hugging Face layout as transformers writes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from eep.config import EngineConfig  # noqa: E402
from eep.engine.engine import LLMEngine  # noqa: E402
from eep.engine.sampling import SamplingParams  # noqa: E402
from eep.model.attention import KVCache, StepLayout  # noqa: E402
from eep.model.loader import load_model  # noqa: E402

VOCAB = 512
PROMPT_LENS = [7, 1, 19, 4, 12, 30, 2, 9]  # batch of 8 with different lengths (one 1-token prompt)


def _qwen3_moe(path: Path) -> None:
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, max_position_embeddings=256, eos_token_id=None,
    )
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(path)


def _deepseek_v3(path: Path, **extra: object) -> None:
    options = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5,
        max_position_embeddings=256, eos_token_id=None,  # no early stop: both sides run all 32 tokens
    )
    cfg = transformers.DeepseekV3Config(**{**options, **extra})
    model = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # transformers initialises the correction bias to zeros: exercise it
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(-0.1, 0.1)
    model.save_pretrained(path)


def _deepseek_v3_yarn(path: Path) -> None:
    """DeepSeek-V3 as it ships: YaRN RoPE with mscale (changes frequencies, cos/sin and softmax scale)."""
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
    _deepseek_v3(path, rope_parameters=yarn, q_lora_rank=None)


def _mixtral(path: Path) -> None:
    """Saved by transformers as `block_sparse_moe.experts.{e}.w1/w3/w2` (the original Mixtral names)."""
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=16, num_experts_per_tok=2, max_position_embeddings=256,
        eos_token_id=None,  # the oracle's min_new_tokens would mask it while eep's ignore_eos samples it
    )
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)


def _olmoe(path: Path) -> None:
    """q/k RMSNorm over the whole projection, `clip_qkv` that clips, top-k weights not renormalised."""
    cfg = transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, max_position_embeddings=256, clip_qkv=1.0,
        eos_token_id=None,  # the default, 50279, lies outside this vocabulary
    )
    model = transformers.OlmoeForCausalLM(cfg)
    with torch.no_grad():  # transformers initialises RMSNorm weights to ones: make the q/k norm weights matter
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)


BUILDERS = {
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
    "deepseek_v3_yarn": _deepseek_v3_yarn,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
}


def test_mixtral_experts_under_mlp_load_the_same(tmp_path: Path) -> None:
    """transformers also loads Mixtral checkpoints with `mlp.` in place of `block_sparse_moe.`: so does eep."""
    torch.manual_seed(0)
    _mixtral(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in tensors
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    renamed = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    a, b = (load_model(tmp_path / d, dtype=torch.float32, max_len=16, progress=False) for d in "ab")
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](path)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, oracle


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g).tolist() for length in PROMPT_LENS[:n]]


@torch.inference_mode()
def _oracle_logits(oracle: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return oracle(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("batch", [1, 8])
def test_logits_match_transformers(checkpoint: tuple[Path, torch.nn.Module], batch: int) -> None:
    """Prefill of a mixed-length batch, then decode steps: every logit within 1e-4 of transformers."""
    path, oracle = checkpoint
    model = load_model(path, dtype=torch.float32, max_len=128, progress=False)
    assert model.dtype == torch.float32
    kv = KVCache(model.cfg, batch, 128, torch.float32)
    seqs = _prompts(batch)
    slots = list(range(batch))
    layout = StepLayout.build(slots, [0] * batch, [len(s) for s in seqs])
    logits = model.compute_logits(model(torch.tensor(sum(seqs, [])), layout, kv))
    worst = 0.0
    offset = 0
    for s in seqs:
        ref = _oracle_logits(oracle, s)
        worst = max(worst, (logits[offset : offset + len(s)] - ref).abs().max().item())
        offset += len(s)
        s.append(int(ref[-1].argmax()))
    for _ in range(4):  # decode steps read the cache written by prefill and by earlier decodes
        layout = StepLayout.build(slots, [len(s) - 1 for s in seqs], [1] * batch)
        logits = model.compute_logits(model(torch.tensor([s[-1] for s in seqs]), layout, kv))
        for b, s in enumerate(seqs):
            ref = _oracle_logits(oracle, s)[-1]
            worst = max(worst, (logits[b] - ref).abs().max().item())
            s.append(int(ref.argmax()))
    assert worst <= 1e-4, f"max |eep - transformers| logit difference {worst:.3g} > 1e-4"


@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_continuations_identical(checkpoint: tuple[Path, torch.nn.Module], batch: int) -> None:
    path, oracle = checkpoint
    engine = LLMEngine(EngineConfig(str(path), dtype="float32", max_num_seqs=8, max_model_len=128, progress=False))
    prompts = _prompts(batch, seed=1)
    outs = engine.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = oracle.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0,
            )[0, len(prompt):].tolist()
        assert out.output_ids == ref, f"prompt of {len(prompt)} tokens diverged"
        assert out.finish_reason == "length"


def test_engine_logits_independent_of_batch(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    """The same prompt's next-token logits alone and inside a mixed batch agree to 1e-5."""
    path, _ = checkpoint
    model = load_model(path, dtype=torch.float32, max_len=128, progress=False)
    prompts = _prompts(8, seed=2)
    kv = KVCache(model.cfg, 8, 128, torch.float32)
    together = model.compute_logits(
        model(torch.tensor(sum(prompts, [])), StepLayout.build(list(range(8)), [0] * 8, [len(p) for p in prompts]), kv)
    )
    offset = 0
    for p in prompts:
        alone = model.compute_logits(model(torch.tensor(p), StepLayout.build([0], [0], [len(p)]), kv))
        assert torch.allclose(alone, together[offset : offset + len(p)], atol=1e-5, rtol=0)
        offset += len(p)
