"""The tiny random-weight MoE models eep runs when no checkpoint is given.

`init_model` writes a Hugging Face checkpoint directory (config.json, generation_config.json,
model.safetensors with per-expert tensor names as `transformers` 5.23 saves them, tokenizer
files) for Qwen3-MoE or DeepSeek-V3. Guarantees:
- the weights come from our own seeded generator (never from transformers): same bytes every run;
- the directory appears whole or not at all (built in a temporary sibling, then renamed);
- `ensure_default_model` builds it on first use and reuses it afterwards.
Changing anything that alters the bytes must bump `_VERSION`, which is part of the name.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from eep.errors import ConfigError
from eep.tokenizer import EOS_TOKEN_ID, VOCAB_SIZE, train_tokenizer, write_tokenizer_config

logger = logging.getLogger(__name__)

ARCHES = ("qwen3_moe", "deepseek_v3")
DEFAULT_ARCH = "qwen3_moe"
_VERSION = "v1"
_SEED = 20240917
_INIT_STD = 0.02  # HF's initializer_range
_BIAS_RANGE = 0.05  # DeepSeek-V3 e_score_correction_bias ~ U(-0.05, 0.05)
# --router-skew ALPHA: expert e of a layer, the r-th in that layer's (seeded) order, gets the selection
# bias -ALPHA * _SKEW_UNIT * ln(r): a Zipf-like preference whose hot experts differ from layer to
# layer. _SKEW_UNIT is about the spread of the router's sigmoid scores at init (logit std 0.32 x
# slope 0.25), so ALPHA 1 moves an expert by one score spread per e-fold of its rank.
_SKEW_UNIT = 0.08
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
)  # fmt: skip

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "intermediate_size": 512,
    "moe_intermediate_size": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": _INIT_STD,
    "bos_token_id": EOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": EOS_TOKEN_ID,
    "use_cache": True,
}
_ARCH_CONFIG: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_key_value_heads": 4,
        "head_dim": 32,
        "num_experts": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": 0.001,
        "use_sliding_window": False,
        "sliding_window": None,
    },
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "num_key_value_heads": 8,
        "first_k_dense_replace": 1,
        "q_lora_rank": 96,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 64,
        "n_group": 8,
        "topk_group": 4,
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "rope_interleave": True,
        "num_nextn_predict_layers": 0,
        "moe_layer_freq": 1,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
    },
}


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise ConfigError(f"unknown default-model arch {arch!r}; choose one of {', '.join(ARCHES)}")


def default_model_name(arch: str, router_skew: float = 0.0) -> str:
    _check_arch(arch)
    return f"eep-tiny-{arch}-{_VERSION}" + (f"-skew{router_skew:g}" if router_skew else "")


def default_model_dir(cache_dir: Path, arch: str = DEFAULT_ARCH, router_skew: float = 0.0) -> Path:
    return Path(cache_dir) / "models" / default_model_name(arch, router_skew)


def _check_skew(arch: str, router_skew: float) -> None:
    if not (router_skew >= 0 and router_skew < float("inf")):
        raise ConfigError(f"router_skew={router_skew} must be a finite number >= 0")
    if router_skew and arch != "deepseek_v3":
        raise ConfigError("--router-skew needs --arch deepseek_v3: its routers' selection bias "
                          "(e_score_correction_bias) carries the skew; Qwen3-MoE's routers have no bias")


def skew_bias(name: str, num_experts: int, router_skew: float) -> torch.Tensor:
    """The selection bias `[E]` float32 of the router named `name` (see _SKEW_UNIT)."""
    g = torch.Generator().manual_seed((_SEED << 32) | zlib.crc32(("skew:" + name).encode()))
    order = torch.randperm(num_experts, generator=g)  # order[r] = the expert of rank r + 1
    rank = torch.empty(num_experts, dtype=torch.float64)
    rank[order] = torch.arange(1, num_experts + 1, dtype=torch.float64)
    return (-router_skew * _SKEW_UNIT * torch.log(rank)).float()


def default_hf_config(arch: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The config.json of the default model of `arch` (a fresh dict, safe to modify)."""
    _check_arch(arch)
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype} is not supported; use one of {', '.join(_DTYPES.values())}")
    cfg = {"model_type": arch, **copy.deepcopy(_COMMON), **copy.deepcopy(_ARCH_CONFIG[arch])}
    cfg["dtype"] = _DTYPES[dtype]
    return dict(sorted(cfg.items()))


def _tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the checkpoint, in the HF per-expert layout."""
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        if cfg["model_type"] == "qwen3_moe":
            shapes |= _qwen3_layer(cfg, p)
        else:
            shapes |= _deepseek_v3_layer(cfg, p, layer)
    return shapes | {"model.norm.weight": (d,), "lm_head.weight": (v, d)}


def _mlp(prefix: str, d: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "gate_proj.weight": (inter, d),
        prefix + "up_proj.weight": (inter, d),
        prefix + "down_proj.weight": (d, inter),
    }


def _experts(prefix: str, d: int, inter: int, n: int) -> dict[str, tuple[int, ...]]:
    return {k: s for e in range(n) for k, s in _mlp(f"{prefix}experts.{e}.", d, inter).items()}


def _qwen3_layer(cfg: dict[str, Any], p: str) -> dict[str, tuple[int, ...]]:
    d, hd, e = cfg["hidden_size"], cfg["head_dim"], cfg["num_experts"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    a = p + "self_attn."
    return {
        a + "q_proj.weight": (q, d), a + "k_proj.weight": (kv, d), a + "v_proj.weight": (kv, d),
        a + "o_proj.weight": (d, q), a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,),
        p + "mlp.gate.weight": (e, d),
        **_experts(p + "mlp.", d, cfg["moe_intermediate_size"], e),
    }  # fmt: skip


def _deepseek_v3_layer(cfg: dict[str, Any], p: str, layer: int) -> dict[str, tuple[int, ...]]:
    d, h, e = cfg["hidden_size"], cfg["num_attention_heads"], cfg["n_routed_experts"]
    qr, kvr, rope = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    nope, vd = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    a = p + "self_attn."
    shapes = {
        a + "q_a_proj.weight": (qr, d), a + "q_a_layernorm.weight": (qr,),
        a + "q_b_proj.weight": (h * (nope + rope), qr),
        a + "kv_a_proj_with_mqa.weight": (kvr + rope, d), a + "kv_a_layernorm.weight": (kvr,),
        a + "kv_b_proj.weight": (h * (nope + vd), kvr), a + "o_proj.weight": (d, h * vd),
    }  # fmt: skip
    if layer < cfg["first_k_dense_replace"]:
        return shapes | _mlp(p + "mlp.", d, cfg["intermediate_size"])
    inter = cfg["moe_intermediate_size"]
    return shapes | {
        p + "mlp.gate.weight": (e, d), p + "mlp.gate.e_score_correction_bias": (e,),
        **_experts(p + "mlp.", d, inter, e),
        **_mlp(p + "mlp.shared_experts.", d, inter * cfg["n_shared_experts"]),
    }  # fmt: skip


def _make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # One seed per name: a tensor's values do not depend on which other tensors exist.
    # float64 because randn's float32 CPU kernel has an AVX2 variant whose bytes differ.
    g = torch.Generator().manual_seed((_SEED << 32) | zlib.crc32(name.encode()))
    if name.endswith("e_score_correction_bias"):  # float32, as DeepSeek-V3 ships it
        return ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * _BIAS_RANGE).float()
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * _INIT_STD).to(dtype)


def _write_model(out_dir: Path, arch: str, dtype: torch.dtype, router_skew: float = 0.0) -> None:
    cfg = default_hf_config(arch, dtype)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tensors = {name: _make_tensor(name, shape, dtype) for name, shape in _tensor_shapes(cfg).items()}
    if router_skew:
        for name, shape in _tensor_shapes(cfg).items():
            if name.endswith("e_score_correction_bias"):
                tensors[name] = skew_bias(name, shape[0], router_skew)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    n_params = sum(t.numel() for t in tensors.values())
    logger.info("wrote %d tensors (%.1fM parameters) of %s", len(tensors), n_params / 1e6, arch)
    train_tokenizer(out_dir / "tokenizer.json")
    write_tokenizer_config(out_dir, cfg["max_position_embeddings"])


def init_model(
    out_dir: Path, arch: str = DEFAULT_ARCH, *, force: bool = False, dtype: torch.dtype = torch.bfloat16,
    router_skew: float = 0.0,
) -> Path:
    """Writes the default `arch` model into `out_dir` and returns it; with `router_skew` > 0 its
    routers prefer some experts over others (Zipf-like, different ones per layer; deepseek_v3).

    Raises ConfigError if `out_dir` is a non-empty directory and `force` is false.
    """
    default_hf_config(arch, dtype)  # checks both before any work
    _check_skew(arch, router_skew)
    out_dir = Path(out_dir)
    if not force and _occupied(out_dir):
        raise ConfigError(f"{out_dir} already exists and is not empty; pass force=True to rebuild it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    try:
        logger.info("building the default %s model in %s", arch, tmp)
        _write_model(tmp, arch, dtype, router_skew)
        _make_readable(tmp)
        _publish(tmp, out_dir, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only if something failed
    logger.info("default %s model ready in %s (%.1f s)", arch, out_dir, time.perf_counter() - start)
    return out_dir


def _make_readable(model_dir: Path) -> None:
    # mkdtemp and safetensors create owner-only modes; other users may share the cache.
    model_dir.chmod(0o755)
    for f in model_dir.iterdir():
        f.chmod(0o644)


def _occupied(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _publish(tmp: Path, out_dir: Path, force: bool) -> None:
    old = None
    if force and _occupied(out_dir):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
        os.replace(out_dir, old)  # onto the empty dir mkdtemp made
    try:
        os.replace(tmp, out_dir)  # atomic; fails if another process published first
    except OSError as e:
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)  # put the previous model back rather than leave none
        raise ConfigError(f"{out_dir} appeared while it was being built: {e}") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_complete(model_dir: Path) -> bool:
    """True if `model_dir` holds every file `init_model` writes."""
    return all((Path(model_dir) / f).is_file() for f in MODEL_FILES)


def ensure_default_model(cache_dir: Path, arch: str = DEFAULT_ARCH, router_skew: float = 0.0) -> Path:
    """Returns the default `arch` model under `cache_dir` (skewed: `router_skew`), building it on first use."""
    out_dir = default_model_dir(cache_dir, arch, router_skew)
    _remove_stale_partials(out_dir)
    if is_complete(out_dir):
        return out_dir
    try:
        return init_model(out_dir, arch, force=_occupied(out_dir), router_skew=router_skew)
    except ConfigError:
        if is_complete(out_dir):  # a concurrent process built the same bytes first
            return out_dir
        raise


def _remove_stale_partials(out_dir: Path) -> None:
    """Deletes temporary dirs of earlier builds whose process is gone (killed mid-build)."""
    for path in out_dir.parent.glob(f".{out_dir.name}.*-*-*"):
        pid = path.name[len(out_dir.name) + 2 :].split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            logger.info("removing %s, left by an interrupted build", path)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True
