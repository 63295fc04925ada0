"""What the estimator tracks, and how one backward pass gives per-example gradients for a whole batch.

A :class:`TrackedModule` owns one or more weight matrices (:class:`Block`). During a forward pass it tells a
:class:`Recorder` what each matrix saw: the input activations ``a`` and the output tensor whose gradient
``s`` the backward pass will give. The per-example gradient of a block is then ``G_n = Σ_t s_nt a_ntᵀ``
(``[out, in]``, a bias as an extra input column of ones), and the covariance factors are ``Σ a aᵀ`` and
``Σ s sᵀ``: nothing per-example has to be materialized by autograd.

:class:`TrackedLinear` covers ``nn.Linear`` (inputs ``[B, ..., in]``, batch first). Other modules plug in by
subclassing :class:`TrackedModule` and registering a factory with :func:`register_tracker`; their hooks can
report token rows in any order with ``Recorder.record(..., example=, position=, n_examples=)`` (e.g. the
tokens an MoE router sent to one expert), and the recorder lays them out per example.

The backward pass asks autograd for the gradients of the recorded outputs only
(``torch.autograd.grad(loss, outputs)``), so no parameter gradient is computed or accumulated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from workbench.errors import InputError


@dataclass(frozen=True)
class Block:
    """One tracked weight matrix: its gradient is ``[out_dim, in_dim]`` (a bias is the last input column)."""

    key: str
    out_dim: int
    in_dim: int
    parameters: tuple[str, ...]
    n_params: int


@dataclass
class Rows:
    """What one block saw in one batch, laid out per example.

    ``a`` [B, T, in] and ``s`` [B, T, out] (zero where ``valid`` is False); ``positions`` [B, T] the token
    position of each row in its example (-1 for filler rows), or None when the rows are not tokens (e.g. a
    layer given 4-D inputs); ``valid`` [B, T] which rows are real.
    """

    a: torch.Tensor
    s: torch.Tensor
    positions: torch.Tensor | None
    valid: torch.Tensor

    @property
    def n_examples(self) -> int:
        return self.a.shape[0]

    def per_example_gradient(self) -> torch.Tensor:
        """``G_n = Σ_t s_nt a_ntᵀ`` for every example: [B, out, in]."""
        return torch.bmm(self.s.transpose(1, 2), self.a)

    def select(self, index: slice) -> "Rows":
        pos = self.positions[index] if self.positions is not None else None
        return Rows(self.a[index], self.s[index], pos, self.valid[index])


class TrackedModule(ABC):
    """A module whose weight matrices the estimator tracks. Subclass for modules that are not nn.Linear."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module

    @abstractmethod
    def blocks(self) -> list[Block]:
        """The weight matrices this module contributes, in a fixed order."""

    @abstractmethod
    def attach(self, recorder: "Recorder") -> list:
        """Install hooks that call ``recorder.record`` for each block; return handles with ``.remove()``.

        The recorded output must be a tensor on the loss's path (its gradient is the block's ``s``): a
        forward hook may return a rebuilt module output so that per-expert rows are, for instance.
        """

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this module's blocks cover (they are made to require grad during a pass)."""
        return list(self.module.parameters(recurse=False))

    @property
    def kind(self) -> str:
        return type(self.module).__name__


class TrackedLinear(TrackedModule):
    """``nn.Linear``: one block ``[out_features, in_features (+1 for the bias)]``."""

    def blocks(self) -> list[Block]:
        m = self.module
        has_bias = m.bias is not None
        names = (f"{self.name}.weight",) + ((f"{self.name}.bias",) if has_bias else ())
        n = m.weight.numel() + (m.bias.numel() if has_bias else 0)
        return [Block(self.name, m.out_features, m.in_features + int(has_bias), names, n)]

    def attach(self, recorder: "Recorder") -> list:
        has_bias = self.module.bias is not None

        def hook(module, inputs, output):
            a = inputs[0].detach()
            if has_bias:
                a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
            recorder.record(self.name, a, output)

        return [self.module.register_forward_hook(hook)]


# --- registry: which module types can be tracked --------------------------------------------------------
_TRACKERS: list[tuple[type, Callable[[str, nn.Module], TrackedModule]]] = [(nn.Linear, TrackedLinear)]


def register_tracker(module_type: type, factory: Callable[[str, nn.Module], TrackedModule]) -> None:
    """Let ``modules=None`` (and module names) track ``module_type`` with ``factory(name, module)``.

    Later registrations win over earlier ones, so a more specific type registered after nn.Linear is used
    for its instances. A module that has a tracker is tracked as a whole: its children are not searched.
    """
    _TRACKERS.insert(0, (module_type, factory))


def tracker_for(name: str, module: nn.Module) -> TrackedModule | None:
    for module_type, factory in _TRACKERS:
        if isinstance(module, module_type):
            return factory(name, module)
    return None


def _discover(root: nn.Module, prefix: str) -> list[TrackedModule]:
    """Trackable modules under ``root`` (depth first, in registration order of the model)."""
    found = []
    own = tracker_for(prefix, root) if prefix else None
    if own is not None:
        return [own]
    for child_name, child in root.named_children():
        found += _discover(child, f"{prefix}.{child_name}" if prefix else child_name)
    return found


def resolve_modules(model: nn.Module, modules: Sequence[str | TrackedModule] | None = None) -> list[TrackedModule]:
    """The tracked modules: every trackable module (``None``), or those named (a container name stands
    for the trackable modules inside it), or TrackedModule objects given as they are."""
    if modules is None:
        tracked = _discover(model, "")
    else:
        if isinstance(modules, (str, TrackedModule)):
            modules = [modules]
        named = dict(model.named_modules())
        tracked = []
        for item in modules:
            if isinstance(item, TrackedModule):
                tracked.append(item)
                continue
            if item not in named:
                close = [n for n in named if n and n.split(".")[-1] == str(item).split(".")[-1]][:5]
                raise InputError(
                    f"the model has no module named {item!r}" + (f"; did you mean one of {close}?" if close else
                    "; list the names with [n for n, _ in model.named_modules()]")
                )
            inner = _discover(named[item], item)
            if not inner:
                raise InputError(
                    f"module {item!r} is a {type(named[item]).__name__}, which the estimator cannot track and "
                    "which holds no nn.Linear; name its linear layers, or register a tracker for its type with "
                    "workbench.probes.influence.register_tracker"
                )
            tracked += inner
    if not tracked:
        raise InputError(
            f"{type(model).__name__} has no module the estimator can track (no nn.Linear); influence scores "
            "need at least one tracked weight matrix: pass modules= or register a tracker for your layer type"
        )
    keys = [b.key for t in tracked for b in t.blocks()]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise InputError(f"modules {dup} are tracked twice; name each module once")
    return tracked


# --- the parameter report -------------------------------------------------------------------------------
@dataclass
class TrackingReport:
    """Which parameters are tracked and what share of the model's parameters that is."""

    rows: list[tuple[str, str, tuple[int, int], int]]  # (block, module type, (out, in), parameters)
    tracked: int
    total: int

    @property
    def fraction(self) -> float:
        return self.tracked / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"rows": [list(r[:2]) + [list(r[2]), r[3]] for r in self.rows], "tracked": self.tracked,
                "total": self.total}

    @classmethod
    def from_dict(cls, d: dict) -> "TrackingReport":
        return cls([(r[0], r[1], tuple(r[2]), r[3]) for r in d["rows"]], d["tracked"], d["total"])

    def __str__(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [5])
        lines = [f"influence: tracking {len(self.rows)} weight matrices, {self.tracked:,} of {self.total:,} "
                 f"parameters ({100 * self.fraction:.1f}%)"]
        for key, kind, (o, i), n in self.rows:
            lines.append(f"  {key:<{width}}  {kind:<14} {o:>6} x {i:<6} {n:>12,}")
        return "\n".join(lines)


def tracking_report(model: nn.Module, tracked: Sequence[TrackedModule]) -> TrackingReport:
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    rows = [(b.key, t.kind, (b.out_dim, b.in_dim), b.n_params) for t in tracked for b in t.blocks()]
    return TrackingReport(rows, sum(r[3] for r in rows), total)


# --- recording one batch --------------------------------------------------------------------------------
@dataclass
class _Call:
    a: torch.Tensor
    out: torch.Tensor
    version: int
    example: torch.Tensor | None = None
    position: torch.Tensor | None = None
    n_examples: int | None = None


@dataclass
class Recorder:
    """Collects what the tracked modules saw during one forward pass and turns it into :class:`Rows`.

    Use as a context manager around a whole pass (hooks are installed once), and per batch call
    :meth:`rows` with the batch's loss.
    """

    tracked: Sequence[TrackedModule]
    dtype: torch.dtype = torch.float32
    _calls: dict = field(default_factory=lambda: defaultdict(list))
    _handles: list = field(default_factory=list)
    _grad_flags: list = field(default_factory=list)

    def __enter__(self) -> "Recorder":
        for t in self.tracked:
            for p in t.parameters():
                # The outputs must be in the autograd graph even for frozen layers.
                self._grad_flags.append((p, p.requires_grad))
                p.requires_grad_(True)
            self._handles += t.attach(self)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        self._handles.clear()
        self._grad_flags.clear()
        self._calls.clear()

    def start(self) -> None:
        """Forget what an unfinished batch recorded (call before each batch)."""
        self._calls = defaultdict(list)

    def record(self, key: str, activations: torch.Tensor, output: torch.Tensor, *, example: torch.Tensor | None = None,
               position: torch.Tensor | None = None, n_examples: int | None = None) -> None:
        """Report one call of block ``key``: ``activations`` [..., in] and ``output`` [..., out] (in the graph).

        Batch-first by default: ``activations`` [B, T, in] or [B, in]. For rows in any order (e.g. the
        tokens routed to one expert) pass ``activations`` [N, in], ``output`` [N, out], ``example`` [N] and
        ``position`` [N] (which example and token each row belongs to) and ``n_examples``. ``output`` must be
        used by the loss (not a copy made for recording), or its gradient is zero.
        """
        if not torch.is_grad_enabled():
            return  # a forward pass under no_grad (e.g. inside the user's sampling) has no gradient to give
        if not output.requires_grad:
            raise InputError(
                f"the output of tracked layer {key!r} has no gradient; the loss must be computed with gradients "
                "enabled (not under torch.no_grad or inference_mode)"
            )
        if example is not None and (position is None or n_examples is None):
            raise InputError(f"rows of {key!r} given with example= also need position= and n_examples=")
        self._calls[key].append(_Call(activations, output, output._version, example, position, n_examples))

    def rows(self, loss: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Rows]:
        """Backpropagate ``loss`` to the recorded outputs and return each block's rows for this batch.

        ``mask`` [B, T] (1 = real token) zeroes padding rows of every block whose rows are tokens of that
        length. Blocks that did not run in this batch are absent.
        """
        calls = [(k, c) for k, cs in self._calls.items() for c in cs]
        self._calls = defaultdict(list)
        if not calls:
            raise InputError("no tracked layer ran in the forward pass of the loss; does loss_fn call the model?")
        grads = torch.autograd.grad(loss, [c.out for _, c in calls], allow_unused=True)
        per_key: dict[str, list[tuple[_Call, torch.Tensor]]] = defaultdict(list)
        for (key, call), g in zip(calls, grads):
            if call.out._version != call.version:
                raise InputError(
                    f"the output of tracked layer {key!r} was modified in place after the layer ran, so its "
                    "gradient is not the layer's; leave that layer out (modules=) or avoid the in-place op"
                )
            per_key[key].append((call, torch.zeros_like(call.out) if g is None else g))
        return {key: self._layout(key, items, mask) for key, items in per_key.items()}

    def _layout(self, key: str, items: list, mask: torch.Tensor | None) -> Rows:
        parts = []
        for call, g in items:
            a, s = call.a.to(self.dtype), g.detach().to(self.dtype)
            if call.example is None:
                if a.dim() < 2 or s.shape[:-1] != a.shape[:-1]:
                    raise InputError(
                        f"tracked layer {key!r} got activations {tuple(a.shape)} and output gradients "
                        f"{tuple(s.shape)}; expected batch-first tensors with matching leading dimensions"
                    )
                b, dims = a.shape[0], a.dim()
                a, s = a.reshape(b, -1, a.shape[-1]), s.reshape(b, -1, s.shape[-1])
                # [B, in]: one row per example (position 0); [B, T, in]: tokens; deeper: rows but not tokens.
                pos = torch.arange(a.shape[1], device=a.device).expand(b, -1) if dims <= 3 else None
                valid = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
                # The padding mask applies to token rows of the mask's length only.
                maskable = mask is not None and dims == 3 and tuple(mask.shape) == tuple(a.shape[:2])
            else:
                a, s, pos, valid = _scatter_rows(a, s.reshape(-1, s.shape[-1]), call.example, call.position,
                                                 call.n_examples)
                maskable = mask is not None and mask.shape[0] == a.shape[0]
            if maskable:
                keep = mask.to(device=a.device, dtype=torch.bool)
                if pos.shape[1] != keep.shape[1] or call.example is not None:
                    if bool((pos[valid] >= keep.shape[1]).any()):
                        raise InputError(f"rows of {key!r} have token positions beyond the mask's {keep.shape[1]}")
                    keep = keep.gather(1, pos.clamp(0, keep.shape[1] - 1))
                valid = valid & keep
            parts.append((a, s, pos, valid))
        b = {p[0].shape[0] for p in parts}
        if len(b) != 1:
            raise InputError(f"tracked layer {key!r} ran several times in one batch with different batch sizes {b}")
        if len(parts) == 1:
            a, s, pos, valid = parts[0]
        else:  # a module called several times in one forward pass: its rows side by side
            a = torch.cat([p[0] for p in parts], 1)
            s = torch.cat([p[1] for p in parts], 1)
            valid = torch.cat([p[3] for p in parts], 1)
            pos = None if any(p[2] is None for p in parts) else torch.cat([p[2] for p in parts], 1)
        if not bool(valid.all()):
            a = a * valid.unsqueeze(-1)
            s = s * valid.unsqueeze(-1)
        return Rows(a, s, pos, valid)


def _scatter_rows(a, s, example, position, n_examples):
    """Lay rows given in any order out as [n_examples, max rows per example, dim], filler rows invalid."""
    example = example.to(a.device).long()
    position = position.to(a.device).long()
    counts = torch.bincount(example, minlength=n_examples)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.argsort(example, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(example)
    slot[order] = torch.arange(example.numel(), device=a.device) - starts[example[order]]
    out_a = a.new_zeros(n_examples, width, a.shape[-1])
    out_s = s.new_zeros(n_examples, width, s.shape[-1])
    pos = torch.full((n_examples, width), -1, dtype=torch.long, device=a.device)
    valid = torch.zeros(n_examples, width, dtype=torch.bool, device=a.device)
    out_a[example, slot] = a
    out_s[example, slot] = s
    pos[example, slot] = position
    valid[example, slot] = True
    return out_a, out_s, pos, valid
