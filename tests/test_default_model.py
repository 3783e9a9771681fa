"""The default model loads in transformers as written, is reproducible, and is built safely."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from eep.errors import CheckpointFileMissing, ConfigError
from eep.model.default_model import (
    ARCHES,
    MODEL_FILES,
    default_hf_config,
    default_model_dir,
    ensure_default_model,
    init_model,
)
from eep.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["def add(a, b):\n    return a + b  # simple", "Grüße, 世界! 🙂"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: init_model(root / arch, arch) for arch in ARCHES}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ARCHES)
def test_loads_in_transformers_without_missing_keys(built: dict[str, Path], arch: str) -> None:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        built[arch], dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == default_hf_config(arch)["architectures"][0]
    ids = torch.tensor([Tokenizer.from_dir(built[arch]).encode(TEXTS[0])])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 4096)
    assert torch.isfinite(logits).all() and logits.std() > 0


@pytest.mark.parametrize("arch", ARCHES)
def test_checkpoint_dtypes_and_names(built: dict[str, Path], arch: str) -> None:
    with safe_open(built[arch] / "model.safetensors", "pt") as f:
        names = set(f.keys())
        bias = [n for n in names if n.endswith("e_score_correction_bias")]
        for name in names:
            want = torch.float32 if name in bias else torch.bfloat16
            assert f.get_tensor(name).dtype == want, name
        assert "model.layers.7.mlp.experts.63.down_proj.weight" in names
        assert not any(n.startswith("model.layers.8.") for n in names)  # no MTP layer
        if arch == "deepseek_v3":
            assert len(bias) == 7 and "model.layers.0.mlp.gate_proj.weight" in names
            b = f.get_tensor(bias[0])
            assert b.dtype == torch.float32 and 0 < b.abs().max() <= 0.05
        else:
            assert not bias


@pytest.mark.parametrize("arch", ARCHES)
def test_init_is_deterministic(built: dict[str, Path], arch: str, tmp_path: Path) -> None:
    again = init_model(tmp_path / arch, arch)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(again / name) == _sha(built[arch] / name), name


def test_tokenizer_training_is_deterministic_across_processes(built: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tokenizer.json"
    code = f"import pathlib, eep.tokenizer as t; t.train_tokenizer(pathlib.Path({str(out)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert _sha(out) == _sha(built["qwen3_moe"] / "tokenizer.json")


def test_tokenizer_round_trips_and_matches_config(built: dict[str, Path]) -> None:
    model_dir = built["qwen3_moe"]
    tok = Tokenizer.from_dir(model_dir)
    assert tok.vocab_size == 4096
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and all(0 <= i < 4096 for i in ids) and tok.decode(ids) == text
    config = json.loads((model_dir / "config.json").read_text())
    assert tok.eos_token_id == config["eos_token_id"] == config["bos_token_id"] == 0
    assert tok.decode([0]) == "" and tok.decode([0], skip_special_tokens=False) == "<|endoftext|>"


def test_tokenizer_matches_transformers(built: dict[str, Path]) -> None:
    ours = Tokenizer.from_dir(built["qwen3_moe"])
    theirs = transformers.AutoTokenizer.from_pretrained(built["qwen3_moe"])
    assert theirs.eos_token_id == ours.eos_token_id and theirs.pad_token_id == ours.eos_token_id
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == text


def test_tokenizer_from_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFileMissing, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_ensure_default_model_creates_then_reuses(built: dict[str, Path], tmp_path: Path) -> None:
    model_dir = default_model_dir(tmp_path, "qwen3_moe")
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)  # reaped: its pid names no live process
    leftover = model_dir.parent / f".{model_dir.name}.partial-{gone.pid}-abc123"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")  # an init killed mid-write

    assert ensure_default_model(tmp_path) == model_dir
    assert all((model_dir / f).is_file() for f in MODEL_FILES) and not leftover.exists()
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(tmp_path) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]

    with pytest.raises(ConfigError, match="force=True"):
        init_model(model_dir)
    init_model(model_dir, force=True)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns != mtime
    assert _sha(model_dir / "model.safetensors") == _sha(built["qwen3_moe"] / "model.safetensors")
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]


def test_unknown_arch_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="qwen3_moe"):
        init_model(tmp_path / "x", "llama")
    assert not (tmp_path / "x").exists()


def test_failed_init_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("eep.model.default_model.train_tokenizer", crash)
    with pytest.raises(OSError, match="disk full"):
        init_model(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
