"""Mixture-of-experts layers as tracked modules: per-expert weight matrices and the router as a linear map.

In transformers 5.x (OLMoE, Mixtral, Qwen2-MoE, ...) the experts of a layer are fused 3-D parameters
(``gate_up_proj`` [experts, 2·inter, d], ``down_proj`` [experts, d, inter]) applied with ``F.linear`` on the
tokens routed to each expert, and the router is a module with a 2-D ``weight`` that is not an ``nn.Linear``:
an estimator that hooks linear layers silently skips both, which leaves most of an MoE model's MLP
parameters untracked. Here:

- :class:`TrackedExperts` gives every expert's matrices their own blocks (``<name>.down_proj.3`` is expert 3's
  down projection), with factors from the tokens routed to that expert only. The experts' blocks of one
  matrix form a stack (``<name>.down_proj``), so the estimator handles all experts of a layer in batched
  operations. While tracking, the experts' forward is replaced by one that computes the same thing with the
  token rows packed per expert (one batched matrix product per weight) and records each weight's rows of
  every expert in one call, with the example and token of each row; the original forward is restored
  afterwards.
- :class:`TrackedRouter` tracks the router's weight [experts, d] as a linear map from the hidden state to the
  router logits (``a`` = hidden state, ``s`` = gradient of the loss with respect to the logits).

The experts and the router see the layer's tokens flattened to [batch·tokens, d]; both trackers read the
batch shape from a pre-hook on the MoE block that holds them (``adapter.mlp(block)``).

:func:`lm_modules` is the default set for language models: the MLP linear layers of every block (found
through :func:`workbench.models.adapter_for`) plus, for MoE layers, the experts and the router;
:func:`mlp_coverage` reports what share of the MLP parameters that tracks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import InputError, UnknownArchitectureError
from workbench.models import adapter_for
from workbench.models.adapters import _get
from workbench.probes.influence.tracking import Block, Recorder, TrackedLinear, TrackedModule


class _BatchShape:
    """The [batch, tokens] shape of the MoE block's input, read by a forward pre-hook on the block."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.shape: tuple[int, int] | None = None

    def attach(self) -> object:
        def pre(module, args, kwargs):
            h = args[0] if args else next(iter(kwargs.values()))
            self.shape = (h.shape[0], h.shape[1]) if h.dim() == 3 else None

        return self.block.register_forward_pre_hook(pre, with_kwargs=True)

    def rows(self, n_rows: int, key: str) -> tuple[int, int]:
        if self.shape is None or self.shape[0] * self.shape[1] != n_rows:
            raise InputError(
                f"tracked MoE layer {key!r} got {n_rows} token rows, but its block's last input was "
                f"{self.shape}; the MoE block must be called with [batch, tokens, d] hidden states before its "
                "experts and router run"
            )
        return self.shape


def _example_position(idx: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.div(idx, tokens, rounding_mode="floor"), idx % tokens


class _Restore:
    """A handle that puts back a module's own forward when removed."""

    def __init__(self, module: nn.Module, had: bool, old):
        self.module, self.had, self.old = module, had, old

    def remove(self) -> None:
        if self.had:
            self.module.forward = self.old
        else:
            self.module.__dict__.pop("forward", None)


def _patch_forward(module: nn.Module, forward: Callable) -> _Restore:
    had = "forward" in module.__dict__
    handle = _Restore(module, had, module.__dict__.get("forward"))
    module.forward = forward
    return handle


# --- experts ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertLayout:
    """Where one experts module keeps its fused weights and how it applies them.

    ``first`` [experts, out, in] is applied to the token's hidden state, ``second`` [experts, d, inter] to the
    activation; ``kind`` says how the module is called: ``"hf"`` (transformers 5.x: ``forward(hidden,
    top_k_index, top_k_weights)``, ``act = _apply_gate(first_out)``) or ``"builtin"`` (the workbench model:
    ``forward(hidden, gates)`` with gates [tokens, experts], ``act = gelu(first_out)``).
    """

    first: str
    second: str
    kind: str


def expert_layout(module: nn.Module) -> ExpertLayout | None:
    """The layout of an experts module, or None when it is not one the workbench knows."""
    from workbench.models.toy import Experts as BuiltinExperts

    if isinstance(module, BuiltinExperts):
        return ExpertLayout("up_proj", "down_proj", "builtin")
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3:
        return ExpertLayout("gate_up_proj", "down_proj", "hf")
    up = getattr(module, "up_proj", None)
    if isinstance(up, nn.Parameter) and isinstance(down, nn.Parameter) and up.dim() == 3 and down.dim() == 3:
        return ExpertLayout("up_proj", "down_proj", "hf")
    return None


class TrackedExperts(TrackedModule):
    """Fused 3-D expert weights: two blocks per expert, fitted on the tokens routed to that expert.

    ``experts`` limits tracking to those expert indices (an expert no document is routed to has no curvature
    to fit; :func:`lm_modules` leaves such experts out when given the documents).
    """

    def __init__(self, name: str, module: nn.Module, block: nn.Module, experts: Sequence[int] | None = None):
        super().__init__(name, module)
        layout = expert_layout(module)
        if layout is None:
            raise UnknownArchitectureError(
                f"{name!r} ({type(module).__name__}) is not an experts module the workbench knows (fused 3-D "
                "gate_up_proj/up_proj and down_proj); leave experts out (lm_modules(..., experts=False))"
            )
        if layout.kind == "hf":
            flags = {f: getattr(module, f, False) for f in ("has_bias", "is_transposed", "has_post_expert_norm")}
            if any(flags.values()) or getattr(module, "is_concatenated", True) is not True:
                raise UnknownArchitectureError(
                    f"experts {name!r} use a layout the workbench does not track yet ({flags}, "
                    f"is_concatenated={getattr(module, 'is_concatenated', True)}); leave experts out "
                    "(lm_modules(..., experts=False))"
                )
        self.layout = layout
        self.shape = _BatchShape(block)
        first, second = getattr(module, layout.first), getattr(module, layout.second)
        self.n_experts = first.shape[0]
        self.experts = list(range(self.n_experts)) if experts is None else sorted(set(int(e) for e in experts))
        if not self.experts or not all(0 <= e < self.n_experts for e in self.experts):
            raise InputError(f"experts of {name!r} must be a non-empty subset of 0..{self.n_experts - 1}")
        # The experts in the order the forward packs them: tracked ones first (the stacks' members, in order).
        self._order = torch.tensor(self.experts + [e for e in range(self.n_experts) if e not in set(self.experts)])
        self._place = torch.argsort(self._order)  # each expert's place in that order
        self._dims = {layout.first: tuple(first.shape[1:]), layout.second: tuple(second.shape[1:])}

    def key(self, param: str, expert: int) -> str:
        return f"{self.name}.{param}.{expert}"

    def stack(self, param: str) -> str:
        """The key of the stack of every tracked expert's ``param`` matrix."""
        return f"{self.name}.{param}"

    def blocks(self) -> list[Block]:
        out = []
        for e in self.experts:
            for param in (self.layout.first, self.layout.second):
                o, i = self._dims[param]
                out.append(Block(self.key(param, e), o, i, (f"{self.name}.{param}",), o * i, self.stack(param)))
        return out

    @property
    def kind(self) -> str:
        return f"{type(self.module).__name__}[e]"

    def attach(self, recorder: Recorder) -> list:
        return [self.shape.attach(), _patch_forward(self.module, self._forward(recorder))]

    def _run(self, recorder: Recorder, hidden: torch.Tensor, expert: torch.Tensor, token: torch.Tensor,
             weight: torch.Tensor, act_fn) -> torch.Tensor:
        """The experts on (token, expert) slots sorted by expert, tokens in order: ``expert``, ``token`` and gate
        ``weight`` [S]. Returns the gate-weighted sum per token, [tokens, d].

        The slots are packed per expert, [experts, R, d] (R: the most slots of one expert; zero filler rows
        after each expert's own), and each weight applied to all experts in one batched product: the recorder
        gets each stack's rows in its own packed layout, without copying them again.
        """
        batch = self.shape.rows(hidden.shape[0], self.name)
        out = torch.zeros_like(hidden)
        if expert.numel() == 0:
            return out
        counts = torch.bincount(expert, minlength=self.n_experts)
        r = int(counts.max())
        index = torch.arange(expert.numel(), device=expert.device) - (torch.cumsum(counts, 0) - counts)[expert]
        # Where each slot goes in the packed [experts·R] rows: tracked experts first (the stacks' members, in
        # order), then the others.
        flat = self._place.to(expert.device)[expert] * r + index
        h = hidden.new_zeros(self.n_experts * r, hidden.shape[-1]).index_copy(0, flat, hidden.index_select(0, token))
        h = h.view(self.n_experts, r, -1)
        g = len(self.experts)
        u, u_tracked = self._apply(getattr(self.module, self.layout.first), h, g)
        act = act_fn(u)
        o, o_tracked = self._apply(getattr(self.module, self.layout.second), act, g)
        if torch.is_grad_enabled():
            example, position = _example_position(token, batch[1])
            where = torch.full((self.n_experts * r, 2), -1, dtype=torch.long, device=token.device)
            where.index_copy_(0, flat, torch.stack([example, position], 1))
            where = where.view(self.n_experts, r, 2)[:g]
            rows = dict(example=where[..., 0], position=where[..., 1], n_examples=batch[0])
            recorder.record(self.stack(self.layout.first), h[:g].detach(), u_tracked, **rows)
            recorder.record(self.stack(self.layout.second), act[:g].detach(), o_tracked, **rows)
        o = o.reshape(-1, o.shape[-1]).index_select(0, flat) * weight[:, None]
        return out.index_add(0, token, o.to(out.dtype))

    def _apply(self, weight: torch.Tensor, x: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [experts, R, in] (tracked experts first) times each expert's ``weight`` [experts, out, in]: the
        product and the tracked experts' part of it, a tensor on the loss's path (to be recorded)."""
        if g == self.n_experts:
            y = torch.bmm(x, weight.mT)
            return y, y
        w = weight[self._order.to(weight.device)]
        tracked = torch.bmm(x[:g], w[:g].mT)
        return torch.cat([tracked, torch.bmm(x[g:], w[g:].mT)]), tracked

    def _forward(self, recorder: Recorder):
        module, layout = self.module, self.layout

        if layout.kind == "builtin":
            def forward(hidden: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
                # (expert, token) pairs with a non-zero gate, expert-major: the rows sorted by expert.
                expert, token = gates.T.nonzero(as_tuple=True)
                return self._run(recorder, hidden, expert, token, gates[token, expert], F.gelu)

            return forward

        apply_gate = getattr(module, "_apply_gate", None)
        if layout.first == "gate_up_proj" and apply_gate is None:
            def apply_gate(x):
                gate, up = x.chunk(2, dim=-1)
                return module.act_fn(gate) * up
        act_fn = apply_gate if layout.first == "gate_up_proj" else module.act_fn

        def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args, **kwargs):
            k = top_k_index.shape[-1]
            flat = top_k_index.reshape(-1)
            # A stable sort keeps each expert's slots in token order; transformers marks dropped slots with an
            # index past the last expert, which sorts them last, where they are cut off.
            expert, slot = torch.sort(flat, stable=True)
            kept = ((expert >= 0) & (expert < self.n_experts))
            if not bool(kept.all()):
                expert, slot = expert[kept], slot[kept]
            return self._run(recorder, hidden, expert, slot // k, top_k_weights.reshape(-1)[slot], act_fn)

        return forward


# --- routers ------------------------------------------------------------------------------------------------
class TrackedRouter(TrackedModule):
    """A router with a 2-D weight [experts, d] (and optionally a bias), tracked as the linear map to its logits.

    The router's first output must be the logits tensor the rest of the layer uses (transformers 5.x routers
    and the built-in one return ``(router_logits, top_k_weights, top_k_index)``).
    """

    def __init__(self, name: str, module: nn.Module, block: nn.Module):
        super().__init__(name, module)
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise UnknownArchitectureError(
                f"router {name!r} ({type(module).__name__}) has no 2-D weight; leave routers out "
                "(lm_modules(..., routers=False))"
            )
        b = getattr(module, "bias", None)
        self.has_bias = isinstance(b, torch.Tensor)
        self.shape = _BatchShape(block)

    def blocks(self) -> list[Block]:
        w = self.module.weight
        names = (f"{self.name}.weight",) + ((f"{self.name}.bias",) if self.has_bias else ())
        n = w.numel() + (self.module.bias.numel() if self.has_bias else 0)
        return [Block(self.name, w.shape[0], w.shape[1] + int(self.has_bias), names, n)]

    def attach(self, recorder: Recorder) -> list:
        d = self.module.weight.shape[1]

        def hook(module, inputs, output):
            logits = output[0] if isinstance(output, (tuple, list)) else output
            a = inputs[0].detach().reshape(-1, d)
            if logits.shape != (a.shape[0], self.module.weight.shape[0]):
                raise UnknownArchitectureError(
                    f"router {self.name!r} returned {tuple(logits.shape)} as its first output; the workbench "
                    "tracks routers whose first output is the [tokens, experts] logits"
                )
            if self.has_bias:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=-1)
            b, t = self.shape.rows(a.shape[0], self.name)
            # The logits are the block's tokens flattened in order: recorded batch-first, no scatter needed.
            recorder.record(self.name, a.reshape(b, t, -1), logits)

        return [self.shape.attach(), self.module.register_forward_hook(hook)]


# --- linear layers that see flattened tokens ----------------------------------------------------------------
class TrackedTokenLinear(TrackedLinear):
    """An ``nn.Linear`` inside an MLP block, whose input may be the block's tokens flattened to [batch·tokens, d]
    (Qwen2-MoE's shared expert): such rows are laid out per example by the block's batch shape."""

    def __init__(self, name: str, module: nn.Module, block: nn.Module):
        super().__init__(name, module)
        self.shape = _BatchShape(block)

    @property
    def kind(self) -> str:
        return "Linear"

    def attach(self, recorder: Recorder) -> list:
        has_bias = self.module.bias is not None

        def hook(module, inputs, output):
            a = inputs[0].detach()
            if has_bias:
                a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
            if a.dim() != 2:
                recorder.record(self.name, a, output)
                return
            b, t = self.shape.rows(a.shape[0], self.name)
            recorder.record(self.name, a.reshape(b, t, -1), output)  # flattened in order: batch-first

        return [self.shape.attach(), self.module.register_forward_hook(hook)]


# --- the default set for language models ----------------------------------------------------------------------
class IdleExpertsWarning(UserWarning):
    """Some experts got no token of the documents and are left out of tracking."""


def _router_of(adapter, block, mlp):
    router = _get(block, adapter.router_name) if adapter.router_name else None
    if router is None and adapter.extra_router_classes:
        router = next((m for m in mlp.modules() if isinstance(m, adapter.extra_router_classes)), None)
    return router


@torch.no_grad()
def routed_token_counts(model: nn.Module, documents, *, loss_fn: Callable | None = None,
                        mask_fn: Callable | None = None, reaching_loss: bool = True) -> dict[int, torch.Tensor]:
    """Per MoE block index: how many (unpadded) document tokens each expert was routed to that the loss
    depends on, [experts] (``reaching_loss=False``: every unpadded routed token).

    Runs ``loss_fn(model, batch)`` (default: the LM task's loss) over the batches, reads the top-k expert
    indices each router returns, and counts a token only where the gradient of the loss reaches its MLP
    output. When only some positions are scored (an answer after a prompt), the tokens of the last blocks at
    the other positions never reach the loss: an expert that got only those has zero gradients on every
    document, adds nothing to any score, and has no curvature to fit. Without parameters that require
    gradients, every unpadded routed token counts.
    """
    from workbench.probes.influence.lm import LMTask
    from workbench.probes.influence.tasks import to_device

    if loss_fn is None:
        loss_fn, mask_fn = LMTask().loss, (LMTask.mask if mask_fn is None else mask_fn)
    adapter = adapter_for(model)
    counts: dict[int, torch.Tensor] = {}
    routed: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    sizes: dict[int, int] = {}
    handles = []
    for i, block in enumerate(adapter.blocks(model)):
        mlp = adapter.mlp(block)
        router = _router_of(adapter, block, mlp) if mlp is not None else None
        if router is None:
            continue
        sizes[i] = router_weight_rows(router)

        def on_router(module, inputs, output, i=i):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            idx = next((o for o in reversed(outs) if isinstance(o, torch.Tensor) and not o.is_floating_point()), None)
            if idx is None:
                raise UnknownArchitectureError(f"router of block {i} returns no expert indices; cannot count routing")
            routed[i] = idx.reshape(idx.shape[0], -1)

        def on_mlp(module, inputs, output, i=i):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.requires_grad:
                outputs[i] = out

        handles += [router.register_forward_hook(on_router), mlp.register_forward_hook(on_mlp)]
    device = next(model.parameters()).device
    try:
        for batch in documents:
            batch = to_device(batch, device)
            routed.clear()
            outputs.clear()
            mask = mask_fn(batch).reshape(-1).bool() if mask_fn is not None else None
            with torch.set_grad_enabled(reaching_loss):
                loss = loss_fn(model, batch)
                keys = [i for i in routed if i in outputs] if reaching_loss else []
                grads = dict(zip(keys, torch.autograd.grad(loss, [outputs[i] for i in keys], allow_unused=True))) \
                    if keys else {}
            for i, idx in routed.items():
                keep = torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device)
                if mask is not None and mask.numel() == idx.shape[0]:
                    keep &= mask.to(idx.device)
                if i in grads:  # a block without an output gradient to read counts every routed token
                    g = grads[i]
                    reach = torch.zeros_like(keep) if g is None else g.reshape(-1, g.shape[-1]).ne(0).any(-1)
                    if reach.numel() == idx.shape[0]:
                        keep &= reach.to(idx.device)
                n = sizes[i]
                c = torch.bincount(idx[keep].flatten().long().clamp(max=n), minlength=n + 1)[:n]
                counts[i] = counts.get(i, torch.zeros(n, dtype=torch.long)) + c.cpu()
    finally:
        for h in handles:
            h.remove()
    return counts


def router_weight_rows(router: nn.Module) -> int:
    w = getattr(router, "weight", None)
    n = getattr(router, "num_experts", None) or (w.shape[0] if isinstance(w, torch.Tensor) else None)
    if n is None:
        raise UnknownArchitectureError(f"cannot tell how many experts router {type(router).__name__} routes to")
    return int(n)


def lm_modules(model: nn.Module, *, mlp_linear: bool = True, experts: bool = True, routers: bool = True,
               layers: Sequence[int] | None = None, documents=None, loss_fn: Callable | None = None,
               mask_fn: Callable | None = None) -> list[TrackedModule]:
    """The default tracked modules of a causal LM: every block's MLP linear layers, MoE experts and routers.

    Blocks are found through :func:`workbench.models.adapter_for` (GPT-NeoX/Pythia, Llama, OLMoE, Mixtral,
    Qwen2-MoE, the built-in model, or the generic adapter). ``layers`` keeps only those block indices.
    With ``documents`` (the batches the factors will be fitted on), experts that no document token the loss
    depends on is routed to (:func:`routed_token_counts`) are left out, with an :class:`IdleExpertsWarning`
    naming them: their gradient is zero on every document, so they add nothing to any score and have no
    curvature to fit.
    """
    adapter = adapter_for(model)
    counts = routed_token_counts(model, documents, loss_fn=loss_fn, mask_fn=mask_fn) \
        if documents is not None and experts else {}
    tracked: list[TrackedModule] = []
    idle: list[str] = []
    prefix = adapter.layers_path
    for i, block in enumerate(adapter.blocks(model)):
        if layers is not None and i not in layers:
            continue
        mlp = adapter.mlp(block)
        if mlp is None:
            continue
        base = f"{prefix}.{i}.{adapter.mlp_name}"
        router = _router_of(adapter, block, mlp)
        experts_mod = _get(block, adapter.experts_name) if adapter.experts_name else None
        if experts_mod is None and router is not None:
            experts_mod = next((m for m in mlp.modules() if expert_layout(m) is not None), None)
        names = {id(m): f"{base}.{n}".rstrip(".") for n, m in mlp.named_modules()}
        if mlp_linear:
            for sub, mod in mlp.named_modules():
                if isinstance(mod, nn.Linear) and mod is not router and (
                        not adapter.mlp_linear_names or sub.split(".")[-1] in adapter.mlp_linear_names):
                    tracked.append(TrackedTokenLinear(f"{base}.{sub}".rstrip("."), mod, mlp))
        if routers and router is not None:
            if isinstance(router, nn.Linear):  # older layouts: a plain linear router
                tracked.append(TrackedTokenLinear(names[id(router)], router, mlp))
            else:
                tracked.append(TrackedRouter(names[id(router)], router, mlp))
        if experts and experts_mod is not None and expert_layout(experts_mod) is not None:
            active = None
            if i in counts:
                active = counts[i].nonzero().flatten().tolist()
                idle += [f"{names[id(experts_mod)]}[{e}]" for e in range(len(counts[i])) if counts[i][e] == 0]
            if active is None or active:
                tracked.append(TrackedExperts(names[id(experts_mod)], experts_mod, mlp, experts=active))
    if idle:
        warnings.warn(f"{len(idle)} experts got no document token the loss depends on and are not tracked (their "
                      f"gradient is zero on every document): {', '.join(idle[:8])}"
                      + (" ..." if len(idle) > 8 else ""), IdleExpertsWarning, stacklevel=2)
    if not tracked:
        raise InputError(
            f"found no MLP layer to track in {type(model).__name__}: no nn.Linear, experts or router in the MLPs "
            "of its blocks; pass modules= explicitly (module names or TrackedModule objects)"
        )
    return tracked


@dataclass
class Coverage:
    """What share of the MLP parameters (and of all parameters) a set of tracked modules covers."""

    tracked_mlp: int
    total_mlp: int
    tracked_all: int
    total_all: int
    untracked: list[tuple[str, int]]  # MLP parameters left out: (name, count)

    @property
    def mlp_fraction(self) -> float:
        return self.tracked_mlp / self.total_mlp if self.total_mlp else 0.0

    @property
    def fraction(self) -> float:
        return self.tracked_all / self.total_all if self.total_all else 0.0

    def __str__(self) -> str:
        s = (f"tracking {self.tracked_mlp:,} of {self.total_mlp:,} MLP parameters ({100 * self.mlp_fraction:.1f}%), "
             f"{self.tracked_all:,} of {self.total_all:,} parameters in all ({100 * self.fraction:.1f}%)")
        if self.untracked:
            s += "; MLP parameters left out: " + ", ".join(f"{n} ({c:,})" for n, c in self.untracked[:6])
        return s


def mlp_coverage(model: nn.Module, tracked: Sequence[TrackedModule]) -> Coverage:
    """The share of MLP parameters (everything under each block's ``adapter.mlp``) that ``tracked`` covers."""
    adapter = adapter_for(model)
    param_names = {id(p): n for n, p in model.named_parameters()}
    mlp_params: dict[str, torch.Tensor] = {}
    for block in adapter.blocks(model):
        mlp = adapter.mlp(block)
        if mlp is not None:
            for p in mlp.parameters():
                mlp_params[param_names[id(p)]] = p
    # Tracked elements per parameter tensor: an expert's block covers its slice of the fused weight.
    params = dict(model.named_parameters())
    tracked_elems: dict[str, int] = {}
    for t in tracked:
        for b in t.blocks():
            if len(b.parameters) == 1:
                tracked_elems[b.parameters[0]] = tracked_elems.get(b.parameters[0], 0) + b.n_params
            else:  # a weight and its bias, tracked whole
                for n in b.parameters:
                    tracked_elems[n] = params[n].numel() if n in params else 0
    tracked_elems = {n: min(c, params[n].numel()) for n, c in tracked_elems.items() if n in params}
    tracked_mlp = sum(tracked_elems.get(n, 0) for n in mlp_params)
    total_all = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    tracked_all = sum(tracked_elems.values())
    untracked = [(n, p.numel() - tracked_elems.get(n, 0)) for n, p in mlp_params.items()
                 if tracked_elems.get(n, 0) < p.numel()]
    return Coverage(tracked_mlp, sum(p.numel() for p in mlp_params.values()), tracked_all, total_all,
                    sorted(untracked, key=lambda x: -x[1]))


__all__ = ["Coverage", "ExpertLayout", "IdleExpertsWarning", "TrackedExperts", "TrackedRouter", "TrackedTokenLinear",
           "expert_layout", "lm_modules", "mlp_coverage", "routed_token_counts"]
