"""Where each architecture keeps its blocks, MoE routers, experts and MLPs, and how it routes.

Capture, probes and influence never reach into a model by attribute names: they ask an :class:`Adapter` for
the model's :class:`MoELayer` s (block, MoE module, router, experts, the router's weight matrix) and its
:class:`~workbench.models.routing.Routing` (how the routers score and weight experts).

For a transformers model the adapter is derived from transformers itself, so that a new architecture mostly
works unregistered: the routers are the modules transformers records router logits from
(``_can_record_outputs["router_logits"]``, matched as transformers matches them) and the recorder's output
index says which output carries the logits; the blocks are the module list that holds the routers; a
router's MoE module is its parent, the experts are that module's child named ``experts`` or holding fused 3-D
weights, and the router's weight matrix is its one 2-D parameter (its own, or a child linear's such as
``.gate``, ``.wg``, ``.layer``, ``.classifier``, ``.proj``). The scoring rule comes from the config
(``scoring_func``, ``expert_selection_fn``) or from the registry, and otherwise is inferred once from what
the routers return (:func:`workbench.models.routing.infer_scoring`). ``REGISTERED`` declares, per model type,
what cannot be derived (and refuses what cannot be measured, saying why); :func:`register_adapter` adds more.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from workbench.errors import NotMoEError, UnknownArchitectureError
from workbench.models.routing import DISTRIBUTIONS, Routing

_LAYER_PATHS = ("model.layers", "gpt_neox.layers", "transformer.h", "transformer.blocks", "model.decoder.layers",
                "layers")
# A block's child is part of its MLP when its class says so (dense MLPs, MoE modules, shared experts; not
# attention, mamba mixers or norms).
# (Model prefixes hold "Moe" too, as in Qwen2MoeRMSNorm: an MoE module's name ends with it.)
_MLP_CLASS = re.compile(r"MLP|Mlp|FFN|FeedForward|Expert|(MoE|Moe)(Block|Layer)?$")
_NOT_MLP_CLASS = re.compile(r"Norm|Attention|Attn|Mamba|Mixer|Rotary|Embedding")
_HOW_TO_REGISTER = ("register it: workbench.models.register_adapter(model_type, Adapter(name, layers_path=..., "
                    "router_path=..., routing=Routing(...))); the README's 'Registering an architecture' says how")


def attribute_at(obj, dotted: str):
    """``obj.a.b.c`` for ``dotted = "a.b.c"`` (``obj`` itself for ``""``), or None where a part is missing."""
    if not dotted:
        return obj
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def join_path(*parts: str) -> str:
    """Attribute paths joined with dots, empty ones left out."""
    return ".".join(p for p in parts if p)


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) if cfg is not None else None


@dataclass
class MoELayer:
    """One mixture-of-experts layer of a model: where its parts are (paths inside the block)."""

    index: int  # block index
    prefix: str  # qualified name of the block
    block: nn.Module
    moe: nn.Module  # the module that routes and combines (the block itself for Gemma 4)
    moe_path: str
    router: nn.Module
    router_path: str
    experts: nn.Module | None
    experts_path: str | None


@dataclass(frozen=True)
class Adapter:
    """How to find the parts of one family of models and how its routers route.

    Paths are attribute paths: ``layers_path`` in the model, the others inside a block (``router_path``:
    ``"mlp.gate"``; ``moe_path``: the MoE module, ``""`` for the block itself, None for the router's parent;
    ``experts_path``: None to find the experts in the MoE module), ``router_weight`` inside the router. A
    block without a router (of ``router_classes``, when given) is dense. ``mlp_names``: the block children
    that make up its MLP (None: those whose class name says MLP, FFN, MoE or Expert). ``refuse``: why this
    architecture cannot be measured; every use raises it.
    """

    name: str
    layers_path: str | None = None
    router_path: str | None = None
    moe_path: str | None = None
    experts_path: str | None = None
    router_weight: str | None = None
    routing: Routing | None = None
    router_classes: tuple[type, ...] = field(default=())
    mlp_names: tuple[str, ...] | None = None
    mlp_linear_names: tuple[str, ...] = ()
    refuse: str | None = None

    # --- blocks and MoE layers ---------------------------------------------------------------------------
    def _check(self) -> None:
        if self.refuse:
            raise UnknownArchitectureError(f"the workbench cannot measure {self.name} models: {self.refuse}")

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        self._check()
        layers = attribute_at(model, self.layers_path or "")
        if self.layers_path is None or layers is None:
            raise UnknownArchitectureError(
                f"the {self.name} adapter expected decoder layers at '{self.layers_path}' but the model has "
                "none there; the checkpoint may be of another architecture than its config says"
            )
        return list(layers)

    def router_of(self, block: nn.Module) -> nn.Module | None:
        router = attribute_at(block, self.router_path) if self.router_path else None
        if router is not None and self.router_classes and not isinstance(router, self.router_classes):
            return None  # e.g. DeepSeek-V4's hash-routed layers: not a learned router
        return router

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """Every MoE layer, in depth order."""
        out = []
        for i, block in enumerate(self.blocks(model)):
            router = self.router_of(block)
            if router is None:
                continue
            moe_path = self.moe_path if self.moe_path is not None else self.router_path.rpartition(".")[0]
            moe = attribute_at(block, moe_path)
            experts_path = self.experts_path if self.experts_path is not None else _find_experts(moe, moe_path)
            experts = attribute_at(block, experts_path) if experts_path is not None else None
            out.append(MoELayer(i, f"{self.layers_path}.{i}", block, moe, moe_path, router, self.router_path,
                                experts, experts_path))
        return out

    def require_moe(self, model: nn.Module) -> list[MoELayer]:
        layers = self.moe_layers(model)
        if not layers:
            raise NotMoEError(
                f"this {self.name} model has no mixture-of-experts layers, so it has no routing to measure; "
                "give routing probes an MoE model (OLMoE, Mixtral, Qwen2-MoE or the built-in run) or leave "
                "routing out of the capture (routing=False)"
            )
        return layers

    # --- the router's weight matrix ------------------------------------------------------------------------
    def router_weight_of(self, router: nn.Module) -> torch.Tensor:
        """The router's weight matrix [experts (+ shared rows), d_model], as the parameter itself."""
        w = attribute_at(router, self.router_weight) if self.router_weight else None
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise UnknownArchitectureError(
                f"{self.name}'s router ({type(router).__name__}) has no single [experts, d_model] weight matrix "
                f"(found {self.router_weight!r}), so there are no routing embeddings (consistency) and no linear "
                f"router to track; if it has one, {_HOW_TO_REGISTER} with router_weight='path.in.router'"
            )
        return w

    # --- MLP parts (dense MLPs, MoE modules, shared experts) -----------------------------------------------
    def mlp_parts(self, block: nn.Module) -> list[tuple[str, nn.Module]]:
        """(path inside the block, module) of everything that makes up the block's MLP: the MoE module (or,
        when that is the block itself, its router and experts), dense MLPs and shared experts beside it."""
        parts: list[tuple[str, nn.Module]] = []
        router = self.router_of(block)
        if router is not None:
            moe_path = self.moe_path if self.moe_path is not None else self.router_path.rpartition(".")[0]
            if moe_path:
                parts.append((moe_path, attribute_at(block, moe_path)))
            else:
                experts_path = self.experts_path if self.experts_path is not None else _find_experts(block, "")
                parts += [(self.router_path, router)] + ([(experts_path, attribute_at(block, experts_path))]
                                                         if experts_path else [])
        taken = {id(m) for _, m in parts}
        names = self.mlp_names if self.mlp_names is not None else [
            n for n, c in block.named_children() if _looks_mlp(c)]
        for n in names:
            m = attribute_at(block, n)
            if m is not None and id(m) not in taken and not any(m is sub for _, p in parts for sub in p.modules()):
                parts.append((n, m))
        return parts

    def mlp_linear_modules(self, model: nn.Module) -> list[str]:
        """Qualified names of the nn.Linear layers of every block's MLP (dense MLPs, shared experts)."""
        names = []
        for i, block in enumerate(self.blocks(model)):
            for path, part in self.mlp_parts(block):
                for sub, mod in part.named_modules():
                    if isinstance(mod, nn.Linear) and (not self.mlp_linear_names
                                                       or sub.split(".")[-1] in self.mlp_linear_names):
                        names.append(join_path(self.layers_path, str(i), path, sub))
        return names


def _looks_mlp(module: nn.Module) -> bool:
    if isinstance(module, nn.ModuleList):
        return len(module) > 0 and all(_looks_mlp(m) for m in module)
    name = type(module).__name__
    return bool(_MLP_CLASS.search(name)) and not _NOT_MLP_CLASS.search(name)


def _has_3d(module: nn.Module) -> bool:
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def _find_experts(moe: nn.Module | None, moe_path: str) -> str | None:
    """The path (inside the block) of the MoE module's experts: its child named ``experts``, else its one child
    with fused 3-D weights; None when there is none (the experts are the MoE module's own parameters)."""
    if moe is None:
        return None
    if isinstance(getattr(moe, "experts", None), nn.Module):
        return join_path(moe_path, "experts")
    found = [n for n, c in moe.named_children() if _has_3d(c) and "shared" not in n]
    return join_path(moe_path, found[0]) if len(found) == 1 else None


# --- what transformers records ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Recorder:
    target_class: type | None
    class_name: str | None
    layer_name: str | None
    index: int


def _router_recorders(cls: type) -> list[_Recorder]:
    """The ``router_logits`` recorders a transformers model class declares, normalized as transformers does
    (a bare class or class name records output 1)."""
    rec = getattr(cls, "_can_record_outputs", None)
    specs = rec.get("router_logits") if isinstance(rec, dict) else None
    if specs is None:
        return []
    out = []
    for s in specs if isinstance(specs, list) else [specs]:
        if isinstance(s, type):
            out.append(_Recorder(s, None, None, 1))
        elif isinstance(s, str):
            out.append(_Recorder(None, s, None, 1))
        else:
            out.append(_Recorder(getattr(s, "target_class", None), getattr(s, "class_name", None),
                                 getattr(s, "layer_name", None), int(getattr(s, "index", 0))))
    return out


def _is_pretrained(module: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__)


def recorded_routers(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(qualified name, module, output index) of every module transformers records router logits from, in
    module order; each submodel (a PreTrainedModel inside the model) applies its own recorders, as in
    transformers' ``recursively_install_hooks``."""
    found = []

    def walk(module: nn.Module, name: str, recorders: list[_Recorder]) -> None:
        if _is_pretrained(module):
            recorders = _router_recorders(type(module)) or (recorders if name else [])
        for r in recorders:
            if (r.target_class is not None and isinstance(module, r.target_class)) or (
                    r.class_name is not None and name.endswith(r.class_name)):
                if r.layer_name is None or f".{r.layer_name.strip('.')}." in f".{name}.":
                    found.append((name, module, r.index))
                    break
        for child_name, child in module.named_children():
            walk(child, join_path(name, child_name), recorders)

    walk(model, "", [])
    return found


def _split(model: nn.Module, name: str) -> tuple[str, int, str]:
    """'model.layers.3.mlp.gate' -> ('model.layers', 3, 'mlp.gate'): the module list of blocks, the block
    index and the path inside the block."""
    parts = name.split(".")
    for j, part in enumerate(parts):
        if part.isdigit() and isinstance(attribute_at(model, ".".join(parts[:j])), nn.ModuleList):
            return ".".join(parts[:j]), int(part), ".".join(parts[j + 1:])
    raise UnknownArchitectureError(
        f"the router {name!r} is not inside a list of blocks, so the workbench cannot tell its layer; "
        + _HOW_TO_REGISTER)


_SCORING_KEYS = ("scoring_func", "expert_selection_fn", "score_func")


def _configured_scoring(router: nn.Module, config) -> str | None:
    """A scoring rule the router or its config names (``scoring_func="sigmoid"``...), when it is one of ours."""
    for obj in (router, config, getattr(config, "get_text_config", lambda: None)()):
        for key in _SCORING_KEYS:
            v = getattr(obj, key, None) if obj is not None else None
            if isinstance(v, str) and v in DISTRIBUTIONS:
                return v
    return None


def _router_weight_path(router: nn.Module) -> str | None:
    """The path (in the router) of its one 2-D parameter: its own ``weight`` first, else the only 2-D
    parameter it holds (a child linear's); None when there are several (an MLP router) or none."""
    own = getattr(router, "weight", None)
    if isinstance(own, nn.Parameter) and own.dim() == 2:
        return "weight"
    found = [n for n, p in router.named_parameters() if p.dim() == 2]
    return found[0] if len(found) == 1 else None


def derive(model: nn.Module, base: Adapter | None = None) -> Adapter | None:
    """An adapter for a transformers MoE model from what transformers records, with ``base``'s declared
    fields taking precedence; None when transformers records no router logits for this model."""
    routers = recorded_routers(model)
    if not routers:
        return None
    base = base or Adapter(_model_type(model) or type(model).__name__)
    where = [(_split(model, n), m, idx) for n, m, idx in routers]
    layers_paths = {w[0][0] for w in where}
    if len(layers_paths) != 1:
        raise UnknownArchitectureError(
            f"{base.name}'s routers are in several lists of blocks ({sorted(layers_paths)}); " + _HOW_TO_REGISTER)
    paths = sorted({w[0][2] for w in where})
    router_path = base.router_path
    if router_path is None:
        if len(paths) != 1:
            raise UnknownArchitectureError(
                f"{base.name} has routers at {len(paths)} places in a block ({', '.join(paths)}); the "
                f"workbench measures one MoE layer per block: {_HOW_TO_REGISTER} with router_path= the one to "
                "measure")
        router_path = paths[0]
    chosen = [(m, idx) for (_, _, p), m, idx in where if p == router_path]
    if not chosen:
        raise UnknownArchitectureError(f"{base.name} has no recorded router at {router_path!r} (routers: {paths})")
    first, index = chosen[0]
    routing = base.routing or Routing(scoring=_configured_scoring(first, getattr(model, "config", None)),
                                      logits_index=index, weights_index=None, indices_index=None)
    return replace(
        base,
        layers_path=base.layers_path or next(iter(layers_paths)),
        router_path=router_path,
        router_weight=base.router_weight if base.router_weight is not None else _router_weight_path(first),
        routing=routing,
        router_classes=base.router_classes or tuple(dict.fromkeys(type(m) for m, _ in chosen)),
    )


# --- the registry ----------------------------------------------------------------------------------------------
def _softmax(**kw) -> Routing:
    return Routing(scoring="softmax", **kw)


def _sigmoid(**kw) -> Routing:
    return Routing(scoring="sigmoid", **kw)


_DEEPSEEK_V3 = dict(selection_bias=True, grouped=True)

#: What cannot be derived from transformers, per model type: the scoring rule of routers whose config does
#: not name it (so that it is declared rather than inferred), routers at unusual output positions or in
#: unusual formats, and the architectures the workbench refuses, with the reason. A value may be an Adapter
#: or a function of the model's config giving one.
REGISTERED: dict[str, Adapter | Callable[[object], Adapter]] = {
    # softmax over all experts, top-k, weights renormalized or not (norm_topk_prob)
    **{t: Adapter(t, routing=_softmax()) for t in (
        "olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe_text", "qwen4_exp_text",
        "flex_olmo", "minimax", "jamba", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid",
        "hunyuan_v1_moe", "mellum", "lara_mini", "aria_text", "gpt_oss")},
    "deepseek_v2": Adapter("deepseek_v2", routing=_softmax(grouped=True)),
    "ernie4_5_moe": Adapter("ernie4_5_moe", routing=_softmax(selection_bias=True)),
    "longcat_flash": Adapter("longcat_flash", routing=_softmax(
        selection_bias=True, note="zero-compute (identity) experts are scored and selected like the others")),
    "cohere2_moe": lambda cfg: Adapter("cohere2_moe", routing=Routing(
        scoring=getattr(cfg, "expert_selection_fn", "softmax"))),
    # DBRX: the router returns logits only; the FFN takes softmax, top-k and a p-norm renormalization, and
    # hands the weights to its experts, where capture reads them.
    "dbrx": Adapter("dbrx", routing=_softmax(weights="experts", weights_index=None, indices_index=None)),
    # sigmoid scores; selection with a bias (and within groups); weights renormalized and scaled
    **{t: Adapter(t, routing=_sigmoid(**_DEEPSEEK_V3)) for t in (
        "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "dots1", "dots3_note_text",
        "exaone_moe", "kimi_linear", "bailing_hybrid", "axk1", "axk2", "beam", "hy_v4", "mimo_v2_flash",
        "solar_open", "sarvam_mla", "sarvam_moe", "nemotron_h")},
    **{t: Adapter(t, routing=_sigmoid(selection_bias=True)) for t in (
        "minimax_m2", "minimax_m3_vl_text", "hy_v3", "afmoe", "lfm2_moe", "laguna", "kolibri1", "flint",
        "inkling2_text", "inkling2_loop_text")},
    "inkling_text": Adapter("inkling_text", routing=_sigmoid(
        selection_bias=True, note="a shared-expert sink: the shared experts' logit joins the top-k weights' "
                                  "normalization; the router matrix's routed rows are used")),
    "deepseek_v4": Adapter("deepseek_v4", routing=Routing(
        scoring="sqrtsoftplus", selection_bias=True,
        note="hash-routed layers (a fixed token-to-expert table) are not measured as routing layers")),
    "gemma4_text": Adapter("gemma4_text", routing=Routing(
        scoring="probabilities", proportional=False,
        note="weights renormalized, then times a learned per-expert scale; the MoE runs beside a dense MLP")),
    "llama4_text": Adapter("llama4_text", routing=Routing(
        scoring="sigmoid", logits_index=1, weights="dense", weights_index=0, indices_index=None,
        note="top-k of the logits; sigmoid weights multiply the experts' inputs")),
    "phimoe": Adapter("phimoe", routing=Routing(
        scoring="softmax", proportional=False,
        note="sparsemixer: each selected expert's weight is a softmax over a jitter-masked set of logits")),
    "jetmoe": Adapter("jetmoe", router_path="mlp.router", routing=Routing(
        scoring="softmax", logits_index=4, weights="sorted", weights_index=None, indices_index=None,
        note="the MLP experts' router; the attention experts (MoA) are not measured")),
    "doge": Adapter("doge", refuse=(
        "its router scores pairs of product keys, not experts (no logit per expert), and mixes the tokens of "
        "a batch, so a sample's routing depends on the other samples in its batch")),
    "zaya": Adapter("zaya", refuse=(
        "its router is a small network fed with the previous layer's router state (no [experts, d_model] "
        "router matrix), and it reports a selected skip class as expert 0 with weight 0")),
}

#: Adapters of the models that are not transformers MoE models (and of the built-in model).
ADAPTERS: dict[str, Adapter] = {
    "workbench-moe": Adapter("workbench-moe", "layers", router_path="mlp.gate", experts_path="mlp.experts",
                             router_weight="weight", routing=_softmax()),
    "gpt_neox": Adapter("gpt_neox", "gpt_neox.layers", mlp_linear_names=("dense_h_to_4h", "dense_4h_to_h")),
    "llama": Adapter("llama", "model.layers", mlp_linear_names=("gate_proj", "up_proj", "down_proj")),
    "gpt2": Adapter("gpt2", "transformer.h", mlp_linear_names=()),
}


def register_adapter(model_type: str, adapter: Adapter | Callable[[object], Adapter]) -> None:
    """Teach the workbench an architecture: fields left None are derived from transformers as for an
    unregistered one; a function of the config may stand for the adapter."""
    REGISTERED[model_type] = adapter
    _CACHE.clear()


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _dense(model: nn.Module, name: str) -> Adapter | None:
    path = next((p for p in _LAYER_PATHS if isinstance(attribute_at(model, p), nn.ModuleList)), None)
    return Adapter(name, path) if path is not None else None


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``: registered by ``config.model_type`` and completed from what transformers
    records; a plain adapter (blocks only) for dense models; raises if no blocks are found."""
    if model in _CACHE:
        return _CACHE[model]
    mt = _model_type(model)
    name = mt or type(model).__name__
    reg = REGISTERED.get(mt)
    if reg is not None and not isinstance(reg, Adapter):
        reg = reg(model.config)
    if mt in ADAPTERS:
        adapter = ADAPTERS[mt]
    elif reg is not None and reg.refuse:
        adapter = reg
    else:  # a transformers MoE model, or a dense one (no recorded routers): blocks only
        adapter = derive(model, reg)
        if adapter is None:
            dense = _dense(model, name)
            adapter = replace(reg, layers_path=reg.layers_path or dense.layers_path) if reg and dense else dense
    if adapter is None:
        raise UnknownArchitectureError(
            f"no adapter knows the architecture of {type(model).__name__} (model_type={mt!r}) and no decoder "
            f"layers were found at {', '.join(_LAYER_PATHS)}; " + _HOW_TO_REGISTER
        )
    _CACHE[model] = adapter
    return adapter


__all__ = ["ADAPTERS", "Adapter", "MoELayer", "REGISTERED", "adapter_for", "attribute_at", "derive", "join_path",
           "recorded_routers", "register_adapter"]
