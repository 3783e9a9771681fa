"""CheckpointReader on real files: good checkpoints read back bit-exactly, bad ones fail early
with the right exception and a message that names the file, the tensor and what was expected."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eep.errors import CheckpointCorrupt, CheckpointFileMissing, TensorMismatch
from eep.model.checkpoint import FLOAT_DTYPES, CheckpointReader

CONFIG = {"model_type": "qwen3_moe", "hidden_size": 8, "num_hidden_layers": 1}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.experts.0.up_proj.weight": torch.randn(6, 8, generator=g).half(),
        "model.norm.weight": torch.ones(8),
        "model.layers.0.token_ids": torch.arange(5, dtype=torch.int32),
    }


def _write_config(d: Path) -> None:
    (d / "config.json").write_text(json.dumps(CONFIG))


@pytest.fixture
def single(tmp_path: Path) -> Path:
    d = tmp_path / "single"
    d.mkdir()
    _write_config(d)
    save_file(_tensors(), str(d / "model.safetensors"))
    return d


SHARDS = {
    "model-00001-of-00002.safetensors": ["model.embed_tokens.weight", "model.layers.0.mlp.gate.weight"],
    "model-00002-of-00002.safetensors": [
        "model.layers.0.mlp.experts.0.up_proj.weight",
        "model.norm.weight",
        "model.layers.0.token_ids",
    ],
}


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    d = tmp_path / "sharded"
    d.mkdir()
    _write_config(d)
    tensors = _tensors()
    weight_map = {}
    for shard, names in SHARDS.items():
        save_file({n: tensors[n] for n in names}, str(d / shard))
        weight_map.update(dict.fromkeys(names, shard))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


# ---- good checkpoints ------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_reads_back_bit_exactly(layout: str, request: pytest.FixtureRequest) -> None:
    d = request.getfixturevalue(layout)
    expected = _tensors()
    with CheckpointReader(d) as reader:
        assert reader.keys() == sorted(expected)
        assert reader.config == CONFIG
        assert reader.model_dir == d.resolve()
        for name, ref in expected.items():
            assert name in reader
            got = reader.get(name, shape=ref.shape, dtypes=None)
            assert got.dtype == ref.dtype
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    assert "no.such.tensor" not in reader


def test_file_of(single: Path, sharded: Path) -> None:
    reader = CheckpointReader(single)
    assert reader.file_of("model.norm.weight") == single.resolve() / "model.safetensors"
    reader = CheckpointReader(sharded)
    for shard, names in SHARDS.items():
        for name in names:
            assert reader.file_of(name) == sharded.resolve() / shard


def test_index_preferred_over_single_file(sharded: Path) -> None:
    save_file({"only.in.single": torch.zeros(2)}, str(sharded / "model.safetensors"))
    reader = CheckpointReader(sharded)
    assert "only.in.single" not in reader
    assert reader.keys() == sorted(_tensors())


def test_close_is_idempotent_and_tensors_stay_valid(sharded: Path) -> None:
    reader = CheckpointReader(sharded)
    t = reader.get("model.embed_tokens.weight")
    reader.close()
    reader.close()
    assert torch.equal(t, _tensors()["model.embed_tokens.weight"])
    # the reader reopens files on demand after close()
    assert torch.equal(reader.get("model.norm.weight"), torch.ones(8))
    reader.close()


def test_context_manager_closes(single: Path) -> None:
    with CheckpointReader(single) as reader:
        reader.get("model.norm.weight")
        assert reader._handles
    assert not reader._handles


def test_transformers_checkpoint(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.Qwen3MoeForCausalLM(cfg)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()

    saved = {name: (shard, t) for shard in shards for name, t in load_file(str(shard)).items()}
    with CheckpointReader(tmp_path) as reader:
        assert reader.config["model_type"] == "qwen3_moe"
        assert set(reader.keys()) == set(saved)
        for name, (shard, ref) in saved.items():
            assert reader.file_of(name) == shard.resolve()
            assert torch.equal(reader.get(name, shape=ref.shape), ref)
        assert reader.get("model.layers.0.mlp.experts.0.gate_proj.weight").shape == (16, 32)
        assert reader.get("model.layers.1.mlp.experts.3.down_proj.weight").shape == (32, 16)
        assert reader.get("model.layers.0.mlp.gate.weight").shape == (4, 32)


# ---- bad directories and JSON ----------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    d = tmp_path / "nope"
    with pytest.raises(CheckpointFileMissing, match="does not exist") as ei:
        CheckpointReader(d)
    assert str(d) in str(ei.value)


def test_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointFileMissing, match="is not a directory"):
        CheckpointReader(f)


def test_missing_config(single: Path) -> None:
    (single / "config.json").unlink()
    with pytest.raises(CheckpointFileMissing) as ei:
        CheckpointReader(single)
    assert str(single.resolve() / "config.json") in str(ei.value)


def test_invalid_config_json(single: Path) -> None:
    (single / "config.json").write_text('{"model_type": "qwen3_moe",\n  "hidden_size": }')
    with pytest.raises(CheckpointCorrupt) as ei:
        CheckpointReader(single)
    msg = str(ei.value)
    assert "config.json" in msg and "not valid JSON" in msg and "line 2" in msg


def test_config_not_an_object(single: Path) -> None:
    (single / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointCorrupt, match="must be a JSON object"):
        CheckpointReader(single)


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}', '{"weight_map": [1]}'])
def test_bad_index(sharded: Path, content: str) -> None:
    (sharded / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointCorrupt, match=r"model\.safetensors\.index\.json"):
        CheckpointReader(sharded)


def test_missing_shard(sharded: Path) -> None:
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointFileMissing) as ei:
        CheckpointReader(sharded)
    msg = str(ei.value)
    assert "model-00002-of-00002.safetensors" in msg
    assert "model.safetensors.index.json" in msg
    assert "3 tensors" in msg


def test_index_names_tensor_absent_from_shard(sharded: Path) -> None:
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.0.ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(TensorMismatch) as ei:
        CheckpointReader(sharded)
    msg = str(ei.value)
    assert "model.layers.0.ghost.weight" in msg and "model-00001-of-00002.safetensors" in msg


def test_no_safetensors_at_all(single: Path) -> None:
    (single / "model.safetensors").unlink()
    with pytest.raises(CheckpointFileMissing) as ei:
        CheckpointReader(single)
    msg = str(ei.value)
    assert "no safetensors weights" in msg and str(single.resolve()) in msg
    assert "not supported" not in msg


def test_pytorch_bin_not_supported(single: Path) -> None:
    (single / "model.safetensors").unlink()
    (single / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointFileMissing, match=r"pytorch_model\*\.bin checkpoints are not supported"):
        CheckpointReader(single)


# ---- bad safetensors files -------------------------------------------------------------


def _write_raw(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_garbage_bytes(single: Path) -> None:
    (single / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointCorrupt, match=r"model\.safetensors"):
        CheckpointReader(single)


def test_tiny_file(single: Path) -> None:
    (single / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointCorrupt, match="too small"):
        CheckpointReader(single)


def test_bad_header_json(single: Path) -> None:
    _write_raw(single / "model.safetensors", b'{"a": {"dtype": "F32",', b"\0" * 8)
    with pytest.raises(CheckpointCorrupt) as ei:
        CheckpointReader(single)
    assert "model.safetensors" in str(ei.value) and "not valid JSON" in str(ei.value)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype 'F33'"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "invalid data_offsets"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "spans 8 bytes but shape [3] of F32 needs 12"),
        ("oops", "not an object"),
    ],
)
def test_bad_header_entry(single: Path, entry: object, problem: str) -> None:
    _write_raw(single / "model.safetensors", json.dumps({"w": entry}).encode(), b"\0" * 8)
    with pytest.raises(CheckpointCorrupt) as ei:
        CheckpointReader(single)
    msg = str(ei.value)
    assert "model.safetensors" in msg and "'w'" in msg and problem in msg


def test_unreadable_data_is_wrapped(single: Path) -> None:
    # Overlapping data sections pass the header checks but safetensors refuses the file.
    header = {n: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]} for n in ("a", "b")}
    _write_raw(single / "model.safetensors", json.dumps(header).encode(), b"\0" * 8)
    reader = CheckpointReader(single)
    with pytest.raises(CheckpointCorrupt, match=r"model\.safetensors"):
        reader.get("a")


def test_truncated_shard(sharded: Path) -> None:
    shard = sharded / "model-00001-of-00002.safetensors"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-10])
    with pytest.raises(CheckpointCorrupt) as ei:
        CheckpointReader(sharded)
    msg = str(ei.value)
    assert shard.name in msg and "truncated" in msg
    assert f"implies {len(blob)} bytes" in msg and f"has {len(blob) - 10} bytes" in msg


def test_header_length_larger_than_file(single: Path) -> None:
    path = single / "model.safetensors"
    blob = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(blob) * 4) + blob[8:])
    with pytest.raises(CheckpointCorrupt) as ei:
        CheckpointReader(single)
    msg = str(ei.value)
    assert "model.safetensors" in msg and f"{len(blob) * 4}-byte header" in msg and f"{len(blob)} bytes" in msg


# ---- get() mismatches ------------------------------------------------------------------


def test_missing_tensor_suggests_close_names(sharded: Path) -> None:
    reader = CheckpointReader(sharded)
    with pytest.raises(TensorMismatch) as ei:
        reader.get("model.layers.0.mlp.gate.weights")
    msg = str(ei.value)
    assert "'model.layers.0.mlp.gate.weights' is missing from checkpoint" in msg
    assert str(sharded.resolve()) in msg
    assert "model.layers.0.mlp.gate.weight" in msg.split("did you mean")[1]
    with pytest.raises(TensorMismatch):
        reader.file_of("nothing.like.it")


def test_shape_mismatch(sharded: Path) -> None:
    reader = CheckpointReader(sharded)
    with pytest.raises(TensorMismatch) as ei:
        reader.get("model.embed_tokens.weight", shape=(16, 9))
    msg = str(ei.value)
    assert "'model.embed_tokens.weight'" in msg and "model-00001-of-00002.safetensors" in msg
    assert "[16, 8]" in msg and "expected [16, 9]" in msg


def test_dtype_mismatch(sharded: Path) -> None:
    reader = CheckpointReader(sharded)
    with pytest.raises(TensorMismatch) as ei:
        reader.get("model.layers.0.token_ids", shape=(5,))
    msg = str(ei.value)
    assert "'model.layers.0.token_ids'" in msg and "model-00002-of-00002.safetensors" in msg
    assert "torch.int32" in msg and all(str(d) in msg for d in FLOAT_DTYPES)
    # the same tensor is fine when the caller accepts it
    assert torch.equal(reader.get("model.layers.0.token_ids", dtypes=(torch.int32,)), torch.arange(5, dtype=torch.int32))

