"""Mixture-of-experts layers as tracked modules: per-expert weight matrices and the router as a linear map.

In transformers 5.x the experts of a layer are fused 3-D parameters (``gate_up_proj`` [experts, 2·inter, d],
``down_proj`` [experts, d, inter], possibly transposed, with biases, or flattened) applied with ``F.linear`` on
the tokens routed to each expert, and the router is a module whose weight matrix is its own or a child
linear's: an estimator that hooks linear layers silently skips both, which leaves most of an MoE model's MLP
parameters untracked. The experts' layout comes from the adapter (:mod:`workbench.models.experts`). Here:

- :class:`TrackedExperts` gives every expert's matrices their own blocks (``<name>.down_proj.3`` is expert 3's
  down projection), with factors from the tokens routed to that expert only. The experts' blocks of one
  matrix form a stack (``<name>.down_proj``), so the estimator handles all experts of a layer in batched
  operations. While tracking, the experts' forward is replaced by one that computes the same thing with the
  token rows packed per expert (one batched matrix product per weight) and records each weight's rows of
  every expert in one call, with the example and token of each row; the original forward is restored
  afterwards.
- :class:`TrackedRouter` tracks the router's weight [experts, d] as the linear map it is: while the router
  runs, the ``F.linear`` call on a weight of that shape is recorded (``a`` = its input, ``s`` = gradient of the
  loss with respect to its output), whether the weight is the router's own or a child linear's and whatever
  the router returns.

The experts and the router see the layer's tokens flattened to [batch·tokens, d]; both trackers read the
batch shape from a pre-hook on the MoE module that holds them (the adapter's ``MoELayer.moe``).

:func:`lm_modules` is the default set for language models: the MLP linear layers of every block (found
through :func:`workbench.models.adapter_for`: dense MLPs, shared experts) plus, for MoE layers, the experts
and the router; :func:`mlp_coverage` reports what share of the MLP parameters that tracks.
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
from workbench.models.adapters import attribute_at, join_path
from workbench.models.experts import ExpertLayout, ExpertMatrix, expert_layout
from workbench.gradients.tasks import CrossEntropyTask, to_device
from workbench.gradients.tracking import Block, Recorder, TrackedLinear, TrackedModule


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
class TrackedExperts(TrackedModule):
    """An experts module's per-expert matrices (fused or not, transposed, flattened, with biases): one block
    per expert and matrix, fitted on the tokens routed to that expert (a bias as an extra input column).

    ``experts`` limits tracking to those expert indices (an expert no document is routed to has no curvature
    to fit; :func:`lm_modules` leaves such experts out when given the documents).
    """

    def __init__(self, name: str, module: nn.Module, block: nn.Module, experts: Sequence[int] | None = None,
                 layout: ExpertLayout | None = None):
        super().__init__(name, module)
        layout = layout or expert_layout(module)
        if layout is None:
            raise UnknownArchitectureError(
                f"{name!r} ({type(module).__name__}) is not an experts module the workbench knows (fused 3-D "
                "gate_up_proj/up_proj and down_proj, or a layout registered with "
                "workbench.models.experts.register_expert_layout); leave experts out (lm_modules(..., experts=False))"
            )
        self.layout = layout
        self.shape = _BatchShape(block)
        self.n_experts = layout.n_experts(module)
        self.experts = list(range(self.n_experts)) if experts is None else sorted(set(int(e) for e in experts))
        if not self.experts or not all(0 <= e < self.n_experts for e in self.experts):
            raise InputError(f"experts of {name!r} must be a non-empty subset of 0..{self.n_experts - 1}")
        # The experts in the order the forward packs them: tracked ones first (the stacks' members, in order).
        self._order = torch.tensor(self.experts + [e for e in range(self.n_experts) if e not in set(self.experts)])
        self._place = torch.argsort(self._order)  # each expert's place in that order
        self._dims = {m.param: tuple(m.weight(module, self.n_experts).shape[1:]) for m in layout.matrices}

    def key(self, param: str, expert: int) -> str:
        return f"{self.name}.{param}.{expert}"

    def only(self, experts: Sequence[int]) -> "TrackedExperts":
        """The same experts module tracking only ``experts`` (a subset of those tracked here)."""
        return TrackedExperts(self.name, self.module, self.shape.block, experts=experts, layout=self.layout)

    def stack(self, param: str) -> str:
        """The key of the stack of every tracked expert's ``param`` matrix."""
        return f"{self.name}.{param}"

    def blocks(self) -> list[Block]:
        out = []
        for e in self.experts:
            for m in self.layout.matrices:
                o, i = self._dims[m.param]
                names = (f"{self.name}.{m.param}",) + ((f"{self.name}.{m.bias}",) if m.bias else ())
                counts = (o * i,) + ((o,) if m.bias else ())
                out.append(Block(self.key(m.param, e), o, i + int(bool(m.bias)), names, sum(counts),
                                 self.stack(m.param), counts))
        return out

    @property
    def kind(self) -> str:
        return f"{type(self.module).__name__}[e]"

    def dead(self) -> dict[str, int]:
        """Elements of the experts' parameters that no expert uses (LongCat allocates gate_up_proj rows for its
        zero-compute experts too): not MLP parameters the model can change, so coverage leaves them out."""
        out = {}
        for m in self.layout.matrices:
            w = attribute_at(self.module, m.param)
            rows = w.shape[0] if not m.flat else self.n_experts
            if rows > self.n_experts:
                out[f"{self.name}.{m.param}"] = (rows - self.n_experts) * w[0].numel()
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [attribute_at(self.module, p) for m in self.layout.matrices for p in (m.param, m.bias) if p]

    def attach(self, recorder: Recorder) -> list:
        return [self.shape.attach(), _patch_forward(self.module, self._forward(recorder))]

    def _run(self, recorder: Recorder, x: torch.Tensor, expert: torch.Tensor, token: torch.Tensor,
             n_tokens: int) -> torch.Tensor:
        """The experts on (token, expert) slots sorted by expert, tokens in order: ``expert``, ``token`` [S], the
        input of each slot ``x`` [S, d], of ``n_tokens`` tokens in all. Returns each slot's output [S, d]
        (before any routing weight).

        The slots are packed per expert, [experts, R, d] (R: the most slots of one expert; zero filler rows
        after each expert's own), and each weight applied to all experts in one batched product: the recorder
        gets each stack's rows in its own packed layout, without copying them again.
        """
        batch = self.shape.rows(n_tokens, self.name)
        if expert.numel() == 0:
            return x.new_zeros(0, x.shape[-1])
        counts = torch.bincount(expert, minlength=self.n_experts)
        r = int(counts.max())
        index = torch.arange(expert.numel(), device=expert.device) - (torch.cumsum(counts, 0) - counts)[expert]
        # Where each slot goes in the packed [experts·R] rows: tracked experts first (the stacks' members, in
        # order), then the others.
        flat = self._place.to(expert.device)[expert] * r + index
        h = x.new_zeros(self.n_experts * r, x.shape[-1]).index_copy(0, flat, x)
        h = h.view(self.n_experts, r, -1)
        g = len(self.experts)
        layout, module = self.layout, self.module
        ins = [self._apply(m, h, g) for m in layout.inputs]
        if layout.combine == "gate_up":
            act = _apply_gate(module, layout.act)(ins[0][0])
        elif layout.combine == "gated":
            act = _act(module, layout.act)(ins[0][0]) * ins[1][0]
        else:
            act = _act(module, layout.act)(ins[0][0])
        o, o_tracked = self._apply(layout.output, act, g)
        if layout.post_norm:
            o = module.post_expert_norm(o)
        if torch.is_grad_enabled():
            example, position = _example_position(token, batch[1])
            where = torch.full((self.n_experts * r, 2), -1, dtype=torch.long, device=token.device)
            where.index_copy_(0, flat, torch.stack([example, position], 1))
            where = where.view(self.n_experts, r, 2)[:g]
            rows = dict(example=where[..., 0], position=where[..., 1], n_examples=batch[0])
            for m, (_, tracked) in zip(layout.inputs, ins):
                recorder.record(self.stack(m.param), _with_ones(h[:g].detach(), m), tracked, **rows)
            recorder.record(self.stack(layout.output.param), _with_ones(act[:g].detach(), layout.output), o_tracked,
                            **rows)
        return o.reshape(-1, o.shape[-1]).index_select(0, flat)

    def _apply(self, m: ExpertMatrix, x: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [experts, R, in] (tracked experts first) times each expert's matrix ``m`` (plus its bias): the
        product and the tracked experts' part of it, a tensor on the loss's path (to be recorded)."""
        weight, bias = m.weight(self.module, self.n_experts), m.bias_of(self.module)

        def product(x, w, b):
            return torch.bmm(x, w.mT) if b is None else torch.baddbmm(b.unsqueeze(1), x, w.mT)

        if g == self.n_experts:
            y = product(x, weight, bias)
            return y, y
        # The tracked experts' product apart: the recorded tensor must be the one the loss uses, not a slice.
        order = self._order.to(weight.device)
        weight, bias = weight[order], (bias[order] if bias is not None else None)
        tracked = product(x[:g], weight[:g], bias[:g] if bias is not None else None)
        rest = product(x[g:], weight[g:], bias[g:] if bias is not None else None)
        return torch.cat([tracked, rest]), tracked

    def _forward(self, recorder: Recorder):
        layout = self.layout

        if layout.call == "gates":  # the built-in model, Inkling's shared experts: weights [tokens, experts]
            def forward(hidden: torch.Tensor, gates: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
                gates = gates if gates is not None else next(iter(kwargs.values()))  # Inkling: gammas=
                shape = hidden.shape
                hidden, gates = hidden.reshape(-1, shape[-1]), gates.reshape(-1, self.n_experts)
                # (expert, token) pairs with a non-zero gate, expert-major: the rows sorted by expert.
                expert, token = gates.T.nonzero(as_tuple=True)
                o = self._run(recorder, hidden[token], expert, token, hidden.shape[0])
                o = o * gates[token, expert].unsqueeze(-1)
                return torch.zeros_like(hidden).index_add(0, token, o.to(hidden.dtype)).view(shape)

            return forward

        if layout.call == "jetmoe":  # the MoE module itself: route, run the experts, weight, add the bias
            module = self.module

            def forward(layer_input: torch.Tensor):
                b, t, d = layer_input.shape
                flat = layer_input.reshape(-1, d)
                _, token, gates, sizes, _ = module.router(flat)
                expert = torch.repeat_interleave(torch.arange(len(sizes), device=flat.device),
                                                 torch.as_tensor(sizes, device=flat.device))
                order = torch.argsort(expert * flat.shape[0] + token, stable=True)  # by expert, tokens in order
                expert, token, gates = expert[order], token[order], gates[order]
                o = self._run(recorder, flat[token], expert, token, flat.shape[0]) * gates.unsqueeze(-1)
                out = torch.zeros_like(flat).index_add(0, token, o.to(flat.dtype))
                return out.view(b, t, d) + module.bias

            return forward

        if layout.call == "dense":  # Llama 4: every expert on every token, the weights already on the inputs
            def forward(hidden: torch.Tensor) -> torch.Tensor:
                per_expert = hidden.view(self.n_experts, -1, hidden.shape[-1])
                # An unselected token comes in as zeros and goes out as zeros (no bias): compute the others.
                expert, token = per_expert.detach().ne(0).any(-1).nonzero(as_tuple=True)
                o = self._run(recorder, per_expert[expert, token], expert, token, per_expert.shape[1])
                out = hidden.new_zeros(hidden.shape)
                return out.index_copy(0, expert * per_expert.shape[1] + token, o.to(hidden.dtype))

            return forward

        def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args, **kwargs):
            shape = hidden.shape
            hidden = hidden.reshape(-1, shape[-1])
            k = top_k_index.shape[-1]
            flat_index, flat_weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)
            # A stable sort keeps each expert's slots in token order; transformers marks dropped slots with an
            # index past the last expert, which sorts them last, where they are cut off.
            expert, slot = torch.sort(flat_index, stable=True)
            kept = (expert >= 0) & (expert < self.n_experts)
            out = torch.zeros_like(hidden)
            if bool(kept.any()):
                e, s = expert[kept], slot[kept]
                o = self._run(recorder, hidden[s // k], e, s // k, hidden.shape[0]) * flat_weights[s].unsqueeze(-1)
                out = out.index_add(0, s // k, o.to(out.dtype))
            if layout.identity:  # zero-compute experts pass the token through, weighted
                ident = (flat_index >= self.n_experts) & (flat_index < self.n_experts + layout.identity)
                if bool(ident.any()):
                    s = ident.nonzero().squeeze(1)
                    out = out.index_add(0, s // k, (hidden[s // k] * flat_weights[s].unsqueeze(-1)).to(out.dtype))
            return out.view(shape)

        return forward


def _with_ones(x: torch.Tensor, m: ExpertMatrix) -> torch.Tensor:
    return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1) if m.bias else x


def _act(module: nn.Module, path: str):
    return F.gelu if path == "gelu" else attribute_at(module, path)


def _apply_gate(module: nn.Module, act: str):
    gate = getattr(module, "_apply_gate", None)
    if gate is not None:
        return gate

    def apply_gate(x):  # transformers' default: the first half is the gate, the second the up projection
        g, up = x.chunk(2, dim=-1)
        return _act(module, act)(g) * up

    return apply_gate


# --- routers ------------------------------------------------------------------------------------------------
class _LinearCalls(torch.overrides.TorchFunctionMode):
    """While active: calls ``on_call(input, output, has_bias)`` for every ``F.linear`` whose weight has
    ``shape`` (inside a router, that is its routing matrix, however the router applies it)."""

    def __init__(self, shape: tuple[int, int], on_call: Callable):
        super().__init__()
        self.shape, self.on_call, self.calls = shape, on_call, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, torch.Tensor) and tuple(weight.shape) == self.shape:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                self.calls += 1
                self.on_call(args[0] if args else kwargs["input"], out, bias is not None)
        return out


class TrackedRouter(TrackedModule):
    """A router's weight matrix [experts, d] (and its bias, if any), tracked as the linear map it is.

    While the router runs, its ``F.linear`` call on a weight of that shape is recorded (``a`` = that call's
    input, ``s`` = the gradient with respect to its output): this holds whether the weight is the router's own
    (``weight``) or a child linear's (``gate.weight``, ``wg.weight``, ``layer.weight``, ``proj.weight``), whether
    the router normalizes its input first (Gemma 4) and whatever it returns (a tuple, PhiMoE's nn.Linear
    subclass, logits at another output index).
    """

    def __init__(self, name: str, module: nn.Module, block: nn.Module, weight_path: str = "weight"):
        super().__init__(name, module)
        w = attribute_at(module, weight_path)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise UnknownArchitectureError(
                f"router {name!r} ({type(module).__name__}) has no 2-D weight at {weight_path!r}; leave routers "
                "out (lm_modules(..., routers=False))"
            )
        self.weight_path = weight_path
        owner = attribute_at(module, weight_path.rpartition(".")[0]) if "." in weight_path else module
        self.bias_path = join_path(weight_path.rpartition(".")[0], "bias")
        self.has_bias = isinstance(getattr(owner, "bias", None), nn.Parameter)
        self.shape = _BatchShape(block)

    @property
    def weight(self) -> torch.Tensor:
        return attribute_at(self.module, self.weight_path)

    def blocks(self) -> list[Block]:
        w = self.weight
        names = (f"{self.name}.{self.weight_path}",) + ((f"{self.name}.{self.bias_path}",) if self.has_bias else ())
        n = w.numel() + (w.shape[0] if self.has_bias else 0)
        return [Block(self.name, w.shape[0], w.shape[1] + int(self.has_bias), names, n)]

    def parameters(self) -> list[nn.Parameter]:
        return [self.weight] + ([attribute_at(self.module, self.bias_path)] if self.has_bias else [])

    def attach(self, recorder: Recorder) -> list:
        w = self.weight
        d = w.shape[1]

        def on_call(x, out, has_bias):
            a = x.detach().reshape(-1, d)
            if has_bias:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=-1)
            b, t = self.shape.rows(a.shape[0], self.name)
            # The logits are the block's tokens flattened in order: recorded batch-first, no scatter needed.
            recorder.record(self.name, a.reshape(b, t, -1), out)

        own = self.module.forward

        def forward(*args, **kwargs):
            with _LinearCalls(tuple(w.shape), on_call) as calls:
                result = own(*args, **kwargs)
            if torch.is_grad_enabled() and calls.calls == 0:
                raise UnknownArchitectureError(
                    f"router {self.name!r} ({type(self.module).__name__}) did not apply its weight "
                    f"{tuple(w.shape)} with F.linear, so it cannot be tracked as a linear map; leave routers out "
                    "(lm_modules(..., routers=False))")
            return result

        return [self.shape.attach(), _patch_forward(self.module, forward)]


# --- linear layers that see flattened tokens ----------------------------------------------------------------
class TrackedTokenLinear(TrackedLinear):
    """An ``nn.Linear`` inside an MLP block, whose input may be the block's tokens flattened to [batch·tokens, d]
    (Qwen2-MoE's shared expert): such rows are laid out per example by the block's batch shape.

    ``private``: hand the model a copy of the output, so that an in-place update of it (Llama 4 adds the
    routed experts into its shared expert's output in place) does not change the recorded tensor.
    """

    def __init__(self, name: str, module: nn.Module, block: nn.Module, private: bool = False):
        super().__init__(name, module)
        self.shape = _BatchShape(block)
        self.private = private

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
            else:
                b, t = self.shape.rows(a.shape[0], self.name)
                recorder.record(self.name, a.reshape(b, t, -1), output)  # flattened in order: batch-first
            return output.clone() if self.private and torch.is_grad_enabled() else None

        return [self.shape.attach(), self.module.register_forward_hook(hook)]


# --- the default set for language models ----------------------------------------------------------------------
class IdleExpertsWarning(UserWarning):
    """Some experts got no token of the documents and are left out of tracking."""


def _slots(layout: ExpertLayout, n_experts: int, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, expert) of every slot an experts module is called with, from the call's arguments."""
    if layout.call == "topk":
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        flat = index.reshape(-1)
        slot = torch.arange(flat.numel(), device=flat.device)
        keep = (flat >= 0) & (flat < n_experts)
        return slot[keep] // index.shape[-1], flat[keep]
    if layout.call == "gates":
        gates = args[1] if len(args) > 1 else next(iter(kwargs.values()))
        expert, token = gates.reshape(-1, n_experts).T.nonzero(as_tuple=True)
        return token, expert
    hidden = args[0]
    expert, token = hidden.view(n_experts, -1, hidden.shape[-1]).ne(0).any(-1).nonzero(as_tuple=True)
    return token, expert


def _lm_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """A causal LM's logits on a batch of ``input_ids``, ``attention_mask`` and ``targets`` (the LM batches)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return getattr(out, "logits", out)


def _attention_mask(batch: dict) -> torch.Tensor:
    return batch["attention_mask"]


@torch.no_grad()
def routed_token_counts(model: nn.Module, documents, *, loss_fn: Callable | None = None,
                        mask_fn: Callable | None = None, reaching_loss: bool = True) -> dict[int, torch.Tensor]:
    """Per MoE block index: how many (unpadded) document tokens each expert was routed to that the loss
    depends on, [experts] (``reaching_loss=False``: every unpadded routed token).

    Runs ``loss_fn(model, batch)`` (default: the LM task's loss) over the batches, reads the (token, expert)
    pairs each MoE layer hands its experts, and counts a token only where the gradient of the loss reaches
    its MoE module's output. When only some positions are scored (an answer after a prompt), the tokens of the
    last blocks at the other positions never reach the loss: an expert that got only those has zero gradients
    on every document, adds nothing to any score, and has no curvature to fit. Without parameters that require
    gradients, every unpadded routed token counts.
    """
    if loss_fn is None:
        loss_fn, mask_fn = CrossEntropyTask(forward=_lm_logits).loss, (_attention_mask if mask_fn is None else mask_fn)
    counts: dict[int, torch.Tensor] = {}
    routed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    outputs: dict[int, torch.Tensor] = {}
    sizes: dict[int, int] = {}
    handles = []
    for layer in adapter_for(model).moe_layers(model):
        experts = layer.experts if layer.experts is not None else layer.moe
        layout = expert_layout(experts)
        if layout is None:
            continue
        i, n = layer.index, layout.n_experts(experts)
        sizes[i] = n

        def on_experts(module, args, kwargs, i=i, layout=layout, n=n):
            routed[i] = _slots(layout, n, args, kwargs)

        def on_sorted(module, args, output, i=i, n=n):  # JetMoE: the router's sorted slots
            _, token, _, counts, _ = output
            routed[i] = (token, torch.repeat_interleave(torch.arange(n, device=token.device),
                                                        torch.as_tensor(counts, device=token.device)))

        if layout.call == "jetmoe":
            handles.append(layer.router.register_forward_hook(on_sorted))
        else:
            handles.append(experts.register_forward_pre_hook(on_experts, with_kwargs=True))

        def on_moe(module, inputs, output, i=i):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.requires_grad:
                outputs[i] = out

        handles.append(layer.moe.register_forward_hook(on_moe))
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
            for i, (token, expert) in routed.items():
                n_tok = int(outputs[i].shape[:-1].numel()) if i in outputs else (mask.numel() if mask is not None else 0)
                keep = torch.ones(max(n_tok, int(token.max()) + 1 if token.numel() else 0), dtype=torch.bool,
                                  device=token.device)
                if mask is not None and mask.numel() == keep.numel():
                    keep &= mask.to(keep.device)
                if i in grads:  # a block without an output gradient to read counts every routed token
                    g = grads[i]
                    reach = torch.zeros_like(keep) if g is None else g.reshape(-1, g.shape[-1]).ne(0).any(-1)
                    if reach.numel() == keep.numel():
                        keep &= reach.to(keep.device)
                c = torch.bincount(expert[keep[token]].long(), minlength=sizes[i])[:sizes[i]]
                counts[i] = counts.get(i, torch.zeros(sizes[i], dtype=torch.long)) + c.cpu()
    finally:
        for h in handles:
            h.remove()
    return counts


def lm_modules(model: nn.Module, *, mlp_linear: bool = True, experts: bool = True, routers: bool = True,
               layers: Sequence[int] | None = None, documents=None, loss_fn: Callable | None = None,
               mask_fn: Callable | None = None) -> list[TrackedModule]:
    """The default tracked modules of a causal LM: every block's MLP linear layers (dense MLPs, shared
    experts), MoE experts (in every layout the adapter knows) and routers.

    Blocks and their MLP parts are found through :func:`workbench.models.adapter_for`. ``layers`` keeps only
    those block indices. With ``documents`` (the batches the factors will be fitted on), experts that no
    document token the loss depends on is routed to (:func:`routed_token_counts`) are left out, with an
    :class:`IdleExpertsWarning` naming them: their gradient is zero on every document, so they add nothing to
    any score and have no curvature to fit. An MoE layer whose experts are in a layout the workbench cannot
    track raises UnknownArchitectureError (``experts=False`` tracks the rest).
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    moe = {layer.index: layer for layer in adapter.moe_layers(model)}
    counts = routed_token_counts(model, documents, loss_fn=loss_fn, mask_fn=mask_fn) \
        if documents is not None and experts else {}
    tracked: list[TrackedModule] = []
    idle: list[str] = []
    for i, block in enumerate(blocks):
        if layers is not None and i not in layers:
            continue
        layer = moe.get(i)
        prefix = f"{adapter.layers_path}.{i}"
        done = {id(m) for m in layer.router.modules()} if layer is not None else set()
        found_experts = False
        for path, part in adapter.mlp_parts(block):
            shape = layer.moe if layer is not None else part  # where the batch shape is read
            for sub, mod in part.named_modules():
                if id(mod) in done:
                    continue
                name = join_path(prefix, path, sub)
                layout = expert_layout(mod)
                if layout is not None:
                    done |= {id(m) for m in mod.modules()}
                    found_experts |= layer is not None and (mod is layer.experts or mod is layer.moe)
                    if not experts:
                        continue
                    active = None
                    if layer is not None and (mod is layer.experts or mod is layer.moe) and i in counts:
                        active = counts[i].nonzero().flatten().tolist()
                        idle += [f"{name}[{e}]" for e in range(len(counts[i])) if counts[i][e] == 0]
                    if active is None or active:
                        tracked.append(TrackedExperts(name, mod, shape, experts=active, layout=layout))
                elif isinstance(mod, nn.Linear):
                    if mlp_linear and (not adapter.mlp_linear_names or sub.split(".")[-1] in adapter.mlp_linear_names):
                        tracked.append(TrackedTokenLinear(name, mod, shape, private=layer is not None))
                elif routers and _routing_matrix(mod):  # a router that is not the adapter's (hash-routed layers)
                    tracked.append(TrackedRouter(name, mod, shape))
        if layer is None:
            continue
        if routers:
            if adapter.router_weight is None:
                adapter.router_weight_of(layer.router)  # raises, naming what is missing
            tracked.append(TrackedRouter(join_path(prefix, layer.router_path), layer.router, layer.moe,
                                         adapter.router_weight))
        if experts and not found_experts:
            raise UnknownArchitectureError(
                f"the experts of {join_path(prefix, layer.moe_path)} ({type(layer.moe).__name__}) are in a layout the "
                "workbench cannot track (known: transformers' fused gate_up_proj/up_proj and down_proj, and the "
                "layouts in workbench.models.experts.EXPERT_LAYOUTS); register theirs with "
                "workbench.models.experts.register_expert_layout, or leave experts out (lm_modules(..., "
                "experts=False))")
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


def _routing_matrix(module: nn.Module) -> bool:
    """A module (not a linear layer) that owns a 2-D weight: a router the adapter does not name."""
    w = getattr(module, "weight", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 2 and not isinstance(module, nn.Embedding)
            and "weight" in dict(module.named_parameters(recurse=False)))


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
    """The share of MLP parameters (everything in each block's MLP parts: dense MLPs, MoE modules with their
    routers, experts and shared experts) that ``tracked`` covers."""
    adapter = adapter_for(model)
    param_names = {id(p): n for n, p in model.named_parameters()}
    mlp_params: dict[str, torch.Tensor] = {}
    for block in adapter.blocks(model):
        for _, part in adapter.mlp_parts(block):
            for p in part.parameters():
                mlp_params[param_names[id(p)]] = p
    # Tracked elements per parameter tensor: an expert's block covers its slice of the fused weight.
    params = dict(model.named_parameters())
    tracked_elems: dict[str, int] = {}
    for t in tracked:
        for b in t.blocks():
            if b.counts is not None:  # slices of parameters (an expert's rows of fused weights and biases)
                for n, c in zip(b.parameters, b.counts):
                    tracked_elems[n] = tracked_elems.get(n, 0) + c
            elif len(b.parameters) == 1:
                tracked_elems[b.parameters[0]] = tracked_elems.get(b.parameters[0], 0) + b.n_params
            else:  # a weight and its bias, tracked whole
                for n in b.parameters:
                    tracked_elems[n] = params[n].numel() if n in params else 0
    dead = {n: c for t in tracked for n, c in (t.dead() if hasattr(t, "dead") else {}).items()}
    for n, c in dead.items():  # elements no forward uses count as covered: nothing to track there
        tracked_elems[n] = tracked_elems.get(n, 0) + c
    tracked_elems = {n: min(c, params[n].numel()) for n, c in tracked_elems.items() if n in params}
    tracked_mlp = sum(tracked_elems.get(n, 0) for n in mlp_params)
    total_all = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    tracked_all = sum(tracked_elems.values())
    untracked = [(n, p.numel() - tracked_elems.get(n, 0)) for n, p in mlp_params.items()
                 if tracked_elems.get(n, 0) < p.numel()]
    return Coverage(tracked_mlp, sum(p.numel() for p in mlp_params.values()), tracked_all, total_all,
                    sorted(untracked, key=lambda x: -x[1]))


__all__ = ["Coverage", "IdleExpertsWarning", "TrackedExperts", "TrackedRouter", "TrackedTokenLinear", "lm_modules",
           "mlp_coverage", "routed_token_counts"]
