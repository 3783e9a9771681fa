"""eep: elastic expert-parallel Mixture-of-Experts inference.

The single-process engine (`eep.engine.LLMEngine`) runs Hugging Face MoE checkpoints
(Qwen3-MoE, DeepSeek-V3) with our own model code; later layers distribute its MoE layers
over rank processes whose membership can change at run time.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "Client", "SamplingParams"]


def __getattr__(name: str) -> object:
    # lazy: `import eep` stays cheap (no torch) until the API is used
    if name == "LLM":
        from eep.llm import LLM

        return LLM
    if name == "Client":
        from eep.client import Client

        return Client
    if name == "SamplingParams":
        from eep.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'eep' has no attribute {name!r}")
