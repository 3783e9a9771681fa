"""`eep.LLM`: the offline Python entry point, in the style of vLLM's `LLM`.

    from eep import LLM, SamplingParams
    with LLM(ep_size=4, ep_num_redundant_experts=8) as llm:
        outs = llm.generate(["Expert parallelism is"], SamplingParams(max_tokens=32))

With `ep_size > 1` the instance runs N rank processes (see `eep.runtime`); `close()` (or the
`with` block) stops them and removes their shared memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from eep.config import EngineConfig
from eep.engine.engine import Executor, LLMEngine, Prompt
from eep.engine.request import RequestOutput
from eep.engine.sampling import SamplingParams
from eep.errors import ConfigError

if TYPE_CHECKING:
    from eep.control.config import EPConfig


def build_engine(config: EngineConfig, ep: EPConfig | None = None) -> LLMEngine:
    """The engine of one instance: in this process, or over `ep.ep_size` rank processes.

    Shared by `eep.LLM` and `eep serve`, so that both build an instance the same way. On
    error nothing is left running (the executor stops the ranks it started).
    """
    executor: Executor | None = None
    if ep is not None and ep.num_ranks > 1:
        from eep.control.executor import EPExecutor

        executor = EPExecutor(config, ep)
    try:
        restart = (lambda: EPExecutor(config, ep)) if ep is not None and ep.fault_policy == "restart" else None
        return LLMEngine(config, executor, restart=restart)
    except BaseException:
        if executor is not None:
            executor.close()
        raise


class LLM:
    def __init__(
        self,
        model_path: str | None = None,
        *,
        ep_size: int = 1,
        ep_num_redundant_experts: int = 0,
        ep_backend: str = "shm",
        dtype: str = "auto",
        max_num_seqs: int = 32,
        max_model_len: int = 1024,
        max_num_batched_tokens: int = 2048,
        max_prefill_tokens: int = 16,
        cache_dir: str | Path | None = None,
        ep_config: EPConfig | None = None,
    ) -> None:
        if model_path is None:
            from eep.model.default_model import ensure_default_model

            model_path = str(ensure_default_model(Path(cache_dir or Path.home() / ".cache" / "eep")))
        self.config = EngineConfig(
            model_path, dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens, max_prefill_tokens=max_prefill_tokens,
        )
        from eep.control.config import EPConfig

        # ep_config sets everything at once (failure timeout, rejoin policy, ...); else the shorthands
        ep = ep_config or EPConfig(ep_size=ep_size, num_redundant_experts=ep_num_redundant_experts, backend=ep_backend)
        self.engine = build_engine(self.config, ep)

    def generate(
        self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run every prompt to completion (batched); outputs in prompt order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.engine.generate(prompts, sampling_params or SamplingParams())

    def status(self) -> dict[str, object]:
        """Membership view, expert coverage (experts with 0 / 1 / >= 2 live replicas), whether
        admission is paused and why, the repairs and the event timeline (expert-parallel
        instances; a single-process instance has one rank and no events)."""
        elastic = self.engine.executor.elastic
        if elastic is None:
            return {"view": {"epoch": 0, "ranks": [{"rank": 0, "state": "active"}], "active": [0]},
                    "coverage": None, "paused": None, "degraded": False, "repairs": [], "events": []}
        return elastic.status()

    def rejoin(self, rank: int) -> None:
        """Start a replacement for failed `rank`; it is switched in by a later `generate` step
        once it has loaded (rejoin "manual"; with "auto" the instance does this itself)."""
        elastic = self.engine.executor.elastic
        if elastic is None:
            raise ConfigError("rejoin needs an expert-parallel instance (ep_size > 1)")
        elastic.rejoin(rank)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
