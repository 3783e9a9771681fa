"""`load_model` on checkpoints that do not match their config: each error names the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eep.errors import TensorMismatch, UnsupportedModel
from eep.model.config import ModelConfig
from eep.model.default_model import init_model
from eep.model.loader import load_model


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("good") / "m", "qwen3_moe")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_default_model_loads(good: Path) -> None:
    model = load_model(good, progress=False)
    assert model.dtype == torch.bfloat16  # "auto" follows the bf16 checkpoint
    assert model.moe_layers()[0].w13.shape == (64, 256, 128)  # [slots, H, 2I], pre-transposed


@pytest.mark.parametrize(("model_type", "fragment"), [("qwen2_moe", "Qwen2-MoE"), ("llama", "unknown"), (None, "None")])
def test_unsupported_model_type(good: Path, tmp_path: Path, model_type: str | None, fragment: str) -> None:
    path = _copy(good, tmp_path / "m")
    _edit_config(path, model_type=model_type)
    with pytest.raises(UnsupportedModel) as e:
        load_model(path, progress=False)
    assert fragment in str(e.value) and "qwen3_moe" in str(e.value)


@pytest.mark.parametrize(
    ("rope", "fragment"),
    [
        ({"rope_type": "longrope", "rope_theta": 10000.0}, "'longrope' is not supported"),
        ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}, "original_max_position_embeddings"),
    ],
)
def test_unsupported_rope_scaling(good: Path, tmp_path: Path, rope: dict[str, object], fragment: str) -> None:
    path = _copy(good, tmp_path / "m")
    _edit_config(path, rope_parameters=rope)
    with pytest.raises(UnsupportedModel, match=fragment):
        load_model(path, progress=False)


_MIXTRAL = {
    "model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
}


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"sliding_window": 4096}, "sliding_window=4096 is not supported"),
        ({"model_type": "olmoe", "num_experts": 4, "clip_qkv": -1.0}, "clip_qkv=-1.0 must be positive"),
    ],
)
def test_unsupported_mixtral_olmoe_options(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(UnsupportedModel, match=fragment):
        ModelConfig.from_hf({**_MIXTRAL, **changes})


def test_mixtral_config_defaults() -> None:
    cfg = ModelConfig.from_hf({**_MIXTRAL, "sliding_window": None})
    assert cfg.moe_intermediate_size == 16 and cfg.moe_layers == (0, 1) and cfg.head_dim == 8
    assert cfg.norm_topk_prob and cfg.qk_norm == "none" and cfg.rope_theta == 1e6  # MixtralConfig's default theta


def test_shape_mismatch_names_tensor_and_shapes(good: Path, tmp_path: Path) -> None:
    path = _copy(good, tmp_path / "m")
    _edit_config(path, moe_intermediate_size=32)  # the saved experts have 64
    with pytest.raises(TensorMismatch) as e:
        load_model(path, progress=False)
    msg = str(e.value)
    assert "experts.0.gate_proj.weight" in msg and "32" in msg and "64" in msg and "model.safetensors" in msg


def test_missing_expert_tensor(good: Path, tmp_path: Path) -> None:
    path = _copy(good, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.3.mlp.experts.17.down_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(TensorMismatch, match=r"model\.layers\.3\.mlp\.experts\.17\.down_proj\.weight"):
        load_model(path, progress=False)


def test_dtype_mismatch(good: Path, tmp_path: Path) -> None:
    path = _copy(good, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(TensorMismatch, match=r"model\.norm\.weight.*int32"):
        load_model(path, progress=False)
