"""Build an `MoEModel` from a Hugging Face checkpoint directory, as it is on disk.

Tensor names are those transformers writes (`model.layers.{l}.mlp.experts.{e}.gate_proj.weight`
and so on; for Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2.weight`, also accepted under
`mlp.` as transformers accepts it). Every tensor is checked for shape and dtype before it is
copied, and any problem is raised as a `CheckpointError` naming the file, the tensor and what
was expected. Expert slots are filled from the logical expert the placement assigns to them,
so a process loads only the experts it serves.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from eep.config import resolve_dtype
from eep.model.checkpoint import CheckpointReader
from eep.model.config import ModelConfig
from eep.model.model import MoEModel
from eep.placement.routing import Placement, RoutingTables, identity_placement

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SlotRange:
    """The contiguous range of physical slots a process owns: `[offset, offset + count)`."""

    offset: int
    count: int


def load_model(
    model_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = "auto",
    max_len: int = 4096,
    placement: Placement | None = None,
    slots: SlotRange | None = None,
    progress: bool = True,
) -> MoEModel:
    """Load the checkpoint at `model_dir` into a new model on the CPU.

    `dtype` "auto" follows the checkpoint (see `resolve_dtype`); `placement` defaults to the
    identity layout (slot p = expert p) and `slots` to every slot.
    """
    with CheckpointReader(model_dir) as reader:
        cfg = ModelConfig.from_hf(reader.config)
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype, reader.config)
        if placement is None:
            placement = identity_placement(len(cfg.moe_layers), cfg.num_experts)
        slots = slots or SlotRange(0, placement.num_physical)
        tables = RoutingTables.from_placement(placement)
        model = MoEModel(cfg, tables, slots.offset, slots.count, dtype, max_len)
        _fill(model, reader, placement, slots, progress)
    logger.info(
        "loaded %s (%s, %s, %d layers, %d local expert slots)",
        Path(model_dir).name, cfg.model_type, dtype, cfg.num_layers, slots.count,
    )
    return model


def _fill(model: MoEModel, reader: CheckpointReader, placement: Placement, slots: SlotRange, progress: bool) -> None:
    cfg = model.cfg
    jobs = _jobs(model, cfg, placement, slots, reader)
    bar = tqdm(jobs, desc=f"loading {reader.model_dir.name}", unit="tensor", disable=not progress, leave=False)
    with torch.no_grad():
        for job in bar:
            job(reader)


Job = Callable[[CheckpointReader], None]


def _copy(dst: torch.Tensor, name: str, shape: tuple[int, ...] | None = None) -> Job:
    def run(reader: CheckpointReader) -> None:
        dst.copy_(reader.get(name, shape=shape or tuple(dst.shape)))

    return run


def _concat(dst: torch.Tensor, names: list[str], shapes: list[tuple[int, ...]]) -> Job:
    """Rows of several checkpoint tensors stacked into one fused weight (q/k/v, gate/up)."""

    def run(reader: CheckpointReader) -> None:
        row = 0
        for name, shape in zip(names, shapes):
            dst[row : row + shape[0]].copy_(reader.get(name, shape=shape))
            row += shape[0]

    return run



# Expert tensor names (gate, up, down) where they differ from transformers' gate_proj/up_proj/down_proj.
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}


def _moe_prefix(cfg: ModelConfig, reader: CheckpointReader, layer_prefix: str) -> str:
    """`block_sparse_moe.` for Mixtral checkpoints that use it (as transformers saves them), else `mlp.`."""
    block = layer_prefix + "block_sparse_moe."
    return block if cfg.model_type == "mixtral" and block + "gate.weight" in reader else layer_prefix + "mlp."


def _jobs(
    model: MoEModel, cfg: ModelConfig, placement: Placement, slots: SlotRange, reader: CheckpointReader
) -> list[Job]:
    h = cfg.hidden_size
    jobs = [_copy(model.embed, "model.embed_tokens.weight"), _copy(model.norm.weight, "model.norm.weight")]
    if not cfg.tie_word_embeddings:
        jobs.append(_copy(model.lm_head, "lm_head.weight"))
    moe_row = 0
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        jobs += [_copy(layer.input_norm.weight, p + "input_layernorm.weight"),
                 _copy(layer.post_attn_norm.weight, p + "post_attention_layernorm.weight")]
        jobs += _attention_jobs(layer.attn, cfg, p + "self_attn.")
        if cfg.moe_layer_mask[i]:
            phy2log = placement.physical_to_logical_map[moe_row]
            jobs += _moe_jobs(layer.mlp, cfg, _moe_prefix(cfg, reader, p), phy2log, slots)
            moe_row += 1
        else:
            jobs += _mlp_jobs(layer.mlp, p + "mlp.", cfg.intermediate_size, h)
    return jobs


def _mlp_jobs(mlp: torch.nn.Module, prefix: str, inter: int, h: int) -> list[Job]:
    return [
        _concat(mlp.w13, [prefix + "gate_proj.weight", prefix + "up_proj.weight"], [(inter, h), (inter, h)]),
        _copy(mlp.w2, prefix + "down_proj.weight"),
    ]


def _attention_jobs(attn: torch.nn.Module, cfg: ModelConfig, p: str) -> list[Job]:
    h = cfg.hidden_size
    if cfg.attention == "gqa":
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        names = [p + "q_proj.", p + "k_proj.", p + "v_proj."]
        jobs = [
            _concat(attn.wqkv, [n + "weight" for n in names], [(q_out, h), (kv_out, h), (kv_out, h)]),
            _copy(attn.wo, p + "o_proj.weight"),
        ]
        if cfg.attention_bias:
            jobs += [_concat(attn.bqkv, [n + "bias" for n in names], [(q_out,), (kv_out,), (kv_out,)]),
                     _copy(attn.bo, p + "o_proj.bias")]
        if cfg.qk_norm != "none":
            jobs += [_copy(attn.q_norm.weight, p + "q_norm.weight"), _copy(attn.k_norm.weight, p + "k_norm.weight")]
        return jobs
    jobs = []
    if cfg.q_lora_rank is None:
        jobs.append(_copy(attn.wq, p + "q_proj.weight"))
    else:
        jobs += [_copy(attn.wq_a, p + "q_a_proj.weight"), _copy(attn.q_a_norm.weight, p + "q_a_layernorm.weight"),
                 _copy(attn.wq_b, p + "q_b_proj.weight")]
    return jobs + [
        _copy(attn.wkv_a, p + "kv_a_proj_with_mqa.weight"),
        _copy(attn.kv_a_norm.weight, p + "kv_a_layernorm.weight"),
        _copy(attn.wkv_b, p + "kv_b_proj.weight"),
        _copy(attn.wo, p + "o_proj.weight"),
    ]


def _expert_job(w13: torch.Tensor, w2: torch.Tensor, cfg: ModelConfig, moe_prefix: str, expert: int) -> Job:
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    gate, up, down = _EXPERT_NAMES.get(cfg.model_type, ("gate_proj", "up_proj", "down_proj"))
    e = f"{moe_prefix}experts.{expert}."
    # experts are stored pre-transposed ([H, 2I], [I, H]): write through transposed views
    fill_w13 = _concat(w13.t(), [f"{e}{gate}.weight", f"{e}{up}.weight"], [(inter, h), (inter, h)])
    fill_w2 = _copy(w2.t(), f"{e}{down}.weight")

    def run(reader: CheckpointReader) -> None:
        fill_w13(reader)
        fill_w2(reader)

    return run


def load_expert(w13: torch.Tensor, w2: torch.Tensor, reader: CheckpointReader, moe_row: int, expert: int) -> None:
    """Read `expert` of the `moe_row`-th MoE layer from the checkpoint into `w13 [H, 2I]` and
    `w2 [I, H]` (a slot of a live model, or the host backup): the repair's disk source."""
    cfg = ModelConfig.from_hf(reader.config)
    layer = cfg.moe_layers[moe_row]
    with torch.no_grad():
        _expert_job(w13, w2, cfg, _moe_prefix(cfg, reader, f"model.layers.{layer}."), expert)(reader)


def _moe_jobs(moe: torch.nn.Module, cfg: ModelConfig, p: str, phy2log: torch.Tensor, slots: SlotRange) -> list[Job]:
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    jobs = [_copy(moe.router.weight, p + "gate.weight")]
    if moe.router.bias is not None:
        jobs.append(_copy(moe.router.bias, p + "gate.e_score_correction_bias"))
    if moe.shared is not None:
        jobs += _mlp_jobs(moe.shared, p + "shared_experts.", inter * cfg.n_shared_experts, h)
    for local in range(slots.count):
        expert = int(phy2log[slots.offset + local])
        if expert < 0:
            continue  # an empty slot keeps whatever it holds; no routing entry points at it
        jobs.append(_expert_job(moe.w13[local], moe.w2[local], cfg, p, expert))
    return jobs
