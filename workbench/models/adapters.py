"""Where each architecture keeps its blocks, MoE routers and MLP layers.

Probes and capture never reach into a model by attribute names; they ask an :class:`Adapter`. Adapters
are found by the model's ``config.model_type``; transformers models of an unknown type fall back to a
generic adapter that finds the decoder layers and the classes transformers itself records router logits
from (``_can_record_outputs["router_logits"]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from workbench.errors import NotMoEError, UnknownArchitectureError

_LAYER_PATHS = ("model.layers", "gpt_neox.layers", "transformer.h", "model.decoder.layers", "layers")


def attribute_at(obj, dotted: str):
    """``obj.a.b.c`` for ``dotted = "a.b.c"``, or None where a part is missing."""
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) if cfg is not None else None


@dataclass(frozen=True)
class Adapter:
    """How to find the parts of one family of models.

    ``router_name`` and ``mlp_name`` are attribute paths inside a block; a block whose router path is
    missing is dense (Qwen2-MoE can mix dense and sparse layers).
    """

    name: str
    layers_path: str
    mlp_name: str = "mlp"
    router_name: str | None = None
    experts_name: str | None = None
    mlp_linear_names: tuple[str, ...] = ()
    extra_router_classes: tuple[type, ...] = field(default=())

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        layers = attribute_at(model, self.layers_path)
        if layers is None:
            raise UnknownArchitectureError(
                f"the {self.name} adapter expected decoder layers at '{self.layers_path}' but the model has "
                "none there; the checkpoint may be of another architecture than its config says"
            )
        return list(layers)

    def mlp(self, block: nn.Module) -> nn.Module:
        return attribute_at(block, self.mlp_name)

    def routers(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(block index, router module) for every MoE layer, in depth order."""
        out = []
        for i, block in enumerate(self.blocks(model)):
            router = attribute_at(block, self.router_name) if self.router_name else None
            if router is None and self.extra_router_classes:
                router = next((m for m in block.modules() if isinstance(m, self.extra_router_classes)), None)
            if router is not None:
                out.append((i, router))
        return out

    def require_moe(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        routers = self.routers(model)
        if not routers:
            raise NotMoEError(
                f"this {self.name} model has no mixture-of-experts layers, so it has no routing to measure; "
                "give routing probes an MoE model (OLMoE, Mixtral, Qwen2-MoE or the built-in run) or leave "
                "routing out of the capture (routing=False)"
            )
        return routers

    def mlp_linear_modules(self, model: nn.Module) -> list[str]:
        """Qualified names of the nn.Linear layers of every block's MLP (dense MLPs, shared experts)."""
        names = []
        prefix = self.layers_path
        for i, block in enumerate(self.blocks(model)):
            mlp = self.mlp(block)
            if mlp is None:
                continue
            for sub, mod in mlp.named_modules():
                if isinstance(mod, nn.Linear) and (not self.mlp_linear_names or sub.split(".")[-1] in self.mlp_linear_names):
                    names.append(f"{prefix}.{i}.{self.mlp_name}.{sub}".rstrip("."))
        return names


def router_weight(router: nn.Module) -> torch.Tensor:
    w = getattr(router, "weight", None)
    if w is None or w.dim() != 2:
        raise UnknownArchitectureError(
            f"router {type(router).__name__} has no 2-D weight matrix; the workbench needs a linear router "
            "(experts x d_model) to compute routing embeddings"
        )
    return w


ADAPTERS: dict[str, Adapter] = {
    "workbench-moe": Adapter("workbench-moe", "layers", router_name="mlp.gate", experts_name="mlp.experts"),
    "olmoe": Adapter("olmoe", "model.layers", router_name="mlp.gate", experts_name="mlp.experts"),
    "mixtral": Adapter("mixtral", "model.layers", router_name="mlp.gate", experts_name="mlp.experts"),
    "qwen2_moe": Adapter("qwen2_moe", "model.layers", router_name="mlp.gate", experts_name="mlp.experts"),
    "qwen3_moe": Adapter("qwen3_moe", "model.layers", router_name="mlp.gate", experts_name="mlp.experts"),
    "gpt_neox": Adapter("gpt_neox", "gpt_neox.layers", mlp_linear_names=("dense_h_to_4h", "dense_4h_to_h")),
    "llama": Adapter("llama", "model.layers", mlp_linear_names=("gate_proj", "up_proj", "down_proj")),
    "gpt2": Adapter("gpt2", "transformer.h", mlp_linear_names=()),
}


def register_adapter(model_type: str, adapter: Adapter) -> None:
    """Teach the workbench a new architecture."""
    ADAPTERS[model_type] = adapter


def _generic(model: nn.Module) -> Adapter | None:
    path = next((p for p in _LAYER_PATHS if isinstance(attribute_at(model, p), nn.ModuleList)), None)
    if path is None:
        return None
    router_classes: tuple[type, ...] = ()
    for m in model.modules():
        rec = getattr(type(m), "_can_record_outputs", None) or {}
        spec = rec.get("router_logits") if isinstance(rec, dict) else None
        cls = getattr(spec, "target_class", None) or (spec if isinstance(spec, type) else None)
        if cls is not None:
            router_classes = (cls,)
            break
    return Adapter(_model_type(model) or type(model).__name__, path, extra_router_classes=router_classes)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``, by ``config.model_type``, else a generic one; raises if none fits."""
    mt = _model_type(model)
    if mt in ADAPTERS:
        return ADAPTERS[mt]
    generic = _generic(model)
    if generic is None:
        raise UnknownArchitectureError(
            f"no adapter knows the architecture of {type(model).__name__} (model_type={mt!r}) and no decoder "
            f"layers were found at {', '.join(_LAYER_PATHS)}; register one with "
            "workbench.models.register_adapter(model_type, Adapter(...))"
        )
    return generic


