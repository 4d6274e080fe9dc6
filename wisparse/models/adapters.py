"""One small adapter per architecture family: which projections share an input (the four activation sites).

All model-specific knowledge lives here; everything else reads modules through an adapter. Adding a family means
adding one entry to `ADAPTERS`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wisparse.errors import WisparseError


@dataclass(frozen=True)
class Site:
    """One activation tensor inside a decoder block and the projections that read it."""

    name: str
    projections: tuple[str, ...]  # module paths relative to the decoder block


LLAMA_LIKE_SITES = (
    Site("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Site("attn_out", ("self_attn.o_proj",)),
    Site("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    Site("mlp_mid", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    sites: tuple[Site, ...] = LLAMA_LIKE_SITES
    blocks_path: str = "model.layers"
    gate_activation: str = "mlp.act_fn"  # act(gate): what CATS thresholds
    final_norm: str = "model.norm"
    bos_per_window: bool = False  # prepend BOS to every perplexity window (Gemma's tokenizer adds one)

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(p for site in self.sites for p in site.projections)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from the hidden states leaving the last block (what its forward computes)."""
        logits = model.get_output_embeddings()(model.get_submodule(self.final_norm)(hidden))
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def block_index(self, name: str) -> int:
        """The block number inside a fully qualified module name such as model.layers.3.mlp.down_proj."""
        return int(name[len(self.blocks_path) + 1:].split(".", 1)[0])

    def projection_names(self, model: nn.Module) -> list[str]:
        """Fully qualified names of every projection, block by block, in forward order."""
        return [f"{self.blocks_path}.{i}.{p}" for i in range(len(self.blocks(model))) for p in self.projections]


ADAPTERS = (
    Adapter("llama", ("llama",)),
    Adapter("mistral", ("mistral",)),
    Adapter("qwen2", ("qwen2",)),
    Adapter("gemma3", ("gemma3_text",), bos_per_window=True),
)


def supported_model_types() -> list[str]:
    return [t for adapter in ADAPTERS for t in adapter.model_types]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a `transformers` causal LM, or an error naming the supported architectures."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise WisparseError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
    )
