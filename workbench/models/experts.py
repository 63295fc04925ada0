"""How a mixture-of-experts layer keeps its experts' weights and calls them.

An :class:`ExpertLayout` says which parameters of an experts module hold each expert's matrices, how they are
stored (``[experts, out, in]``, transposed ``[experts, in, out]``, or flattened ``[experts·out, in]``), with
which biases, how their outputs combine (a fused gate-and-up projection, separate gate and up, or an up
projection alone) and how the MoE block calls the module. Influence tracks experts from it.

:func:`expert_layout` derives the layout from what transformers itself declares on an experts class
(``use_experts_implementation``'s ``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``)
and knows the few experts classes transformers declares nothing on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.models.adapters import attribute_at
from workbench.models.toy import Experts as BuiltinExperts

#: How the MoE block calls its experts. ``topk``: ``experts(hidden [T, d], top_k_index, top_k_weights)`` and
#: the module weights each expert's output (transformers 5.x); ``gates``: ``experts(hidden, gates [T, E])``
#: (the built-in model); ``dense``: ``experts(hidden [E·T, d])``, every expert on every token, the weights
#: already applied to the inputs (Llama 4). ``gates`` also stands for shared experts called as
#: ``experts(hidden, gammas [T, S])``: every token to every one of them, weighted. ``jetmoe``: the layout
#: is the MoE module's own (JetMoE): it routes and calls its experts in the router's sorted order.
CALLS = ("topk", "gates", "dense", "jetmoe")


@dataclass(frozen=True)
class ExpertMatrix:
    """One weight of every expert: ``param`` (path in the experts module), stored ``[E, out, in]`` unless
    ``transposed`` (``[E, in, out]``) or ``flat`` (``[E·out, in]``), with an optional ``bias`` ``[E, out]``."""

    param: str
    transposed: bool = False
    flat: bool = False
    bias: str | None = None

    def weight(self, module: nn.Module, n_experts: int) -> torch.Tensor:
        """The first ``n_experts`` experts' weights as ``[E, out, in]`` (a view of the parameter)."""
        w = attribute_at(module, self.param)
        if self.flat:
            w = w.view(n_experts, -1, w.shape[-1])
        return (w.mT if self.transposed else w)[:n_experts]

    def bias_of(self, module: nn.Module) -> torch.Tensor | None:
        return attribute_at(module, self.bias) if self.bias else None


@dataclass(frozen=True)
class ExpertLayout:
    """The matrices of one experts module and how they combine.

    inputs: the matrices applied to the token (a fused gate-and-up, or gate then up, or up alone);
    output: the matrix applied to the activation; combine: ``"gate_up"`` (the module's ``_apply_gate`` on the
    fused output, else act(gate) * up of its halves), ``"gated"`` (act(gate) * up of two matrices) or ``"act"``
    (act(up)); act: attribute path of the activation in the module (``"gelu"``: F.gelu); call: see ``CALLS``;
    post_norm: a ``post_expert_norm`` module after the output matrix; identity: experts after the real ones
    that pass the token through unchanged (LongCat's zero-compute experts).
    """

    inputs: tuple[ExpertMatrix, ...]
    output: ExpertMatrix
    combine: str = "gate_up"
    act: str = "act_fn"
    call: str = "topk"
    post_norm: bool = False
    identity: int = 0

    @property
    def matrices(self) -> tuple[ExpertMatrix, ...]:
        return self.inputs + (self.output,)

    def n_experts(self, module: nn.Module) -> int:
        if self.output.flat:
            return int(module.num_experts)
        return attribute_at(module, self.output.param).shape[0]


def attribute_at(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _param3(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.dim() == 3


def _bias(module: nn.Module, name: str) -> str | None:
    return f"{name}_bias" if isinstance(getattr(module, f"{name}_bias", None), nn.Parameter) else None


#: Layouts of experts classes that declare none (by class name); :func:`register_expert_layout` adds more.
EXPERT_LAYOUTS: dict[str, ExpertLayout] = {
    # Llama 4: transposed, every expert on every token, the routing weights already on the inputs
    "Llama4TextExperts": ExpertLayout((ExpertMatrix("gate_up_proj", transposed=True),),
                                      ExpertMatrix("down_proj", transposed=True), call="dense"),
    # DBRX: flattened [E·ffn, d] weights in .mlp, separate gate (w1) and up (v1); w2 is applied as x @ w2_e
    "DbrxExperts": ExpertLayout((ExpertMatrix("mlp.w1", flat=True), ExpertMatrix("mlp.v1", flat=True)),
                                ExpertMatrix("mlp.w2", flat=True, transposed=True), combine="gated",
                                act="mlp.activation_fn"),
    # JetMoE: the MoE module itself, JetMoeParallelExperts [E, out, in] fed in the router's sorted order
    "JetMoeMoE": ExpertLayout((ExpertMatrix("input_linear.weight"),), ExpertMatrix("output_linear.weight"),
                              act="activation", call="jetmoe"),
    # Inkling's shared experts: 3-D gate, up and down, every token to every one, weighted by the router's gammas
    "InklingSharedExperts": ExpertLayout((ExpertMatrix("gate_proj"), ExpertMatrix("up_proj")),
                                         ExpertMatrix("down_proj"), combine="gated", call="gates"),
}


def register_expert_layout(class_name: str, layout: ExpertLayout) -> None:
    """Teach influence the layout of an experts class transformers declares none on."""
    EXPERT_LAYOUTS[class_name] = layout


def expert_layout(module: nn.Module) -> ExpertLayout | None:
    """The layout of an experts module, or None when it is not one the workbench knows."""
    if isinstance(module, BuiltinExperts):
        return ExpertLayout((ExpertMatrix("up_proj"),), ExpertMatrix("down_proj"), combine="act", act="gelu",
                            call="gates")
    if type(module).__name__ in EXPERT_LAYOUTS:
        return EXPERT_LAYOUTS[type(module).__name__]
    if not hasattr(module, "has_gate") and not hasattr(module, "act_fn"):
        return None  # neither decorated by transformers' use_experts_implementation nor shaped like it
    transposed = bool(getattr(module, "is_transposed", False))
    first = "gate_up_proj" if _param3(module, "gate_up_proj") else "up_proj" if _param3(module, "up_proj") else None
    if first is None or not _param3(module, "down_proj"):
        return None
    return ExpertLayout(
        (ExpertMatrix(first, transposed, bias=_bias(module, first)),),
        ExpertMatrix("down_proj", transposed, bias=_bias(module, "down_proj")),
        combine="gate_up" if first == "gate_up_proj" else "act",
        post_norm=bool(getattr(module, "has_post_expert_norm", False)),
        identity=int(getattr(module, "zero_expert_num", 0) or 0),
    )


__all__ = ["CALLS", "EXPERT_LAYOUTS", "ExpertLayout", "ExpertMatrix", "expert_layout", "register_expert_layout"]
