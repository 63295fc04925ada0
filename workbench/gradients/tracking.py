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

Blocks of one shape that one module applies side by side (the experts of an MoE layer) can form a *stack*
(``Block.stack``): the module records all their rows at once under the stack's key, as ``[members, rows, ...]``
tensors, and the estimator processes the stack in batched operations (covariances, eigendecompositions,
rotations, scores) instead of one small operation per block. Results are per block either way.

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
    stack: str | None = None  # the stack this block is a member of (see the module docstring), if any
    counts: tuple[int, ...] | None = None  # elements of each of ``parameters`` it covers, when only slices


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
    stacked = False

    @property
    def n_examples(self) -> int:
        return self.a.shape[0]

    def per_example_gradient(self) -> torch.Tensor:
        """``G_n = Σ_t s_nt a_ntᵀ`` for every example: [B, out, in]."""
        return torch.bmm(self.s.transpose(1, 2), self.a)

    def select(self, index: slice) -> "Rows":
        pos = self.positions[index] if self.positions is not None else None
        return Rows(self.a[index], self.s[index], pos, self.valid[index])

    def token_positions(self) -> torch.Tensor | None:
        """The token position of each row, [B, rows] (-1 for filler rows)."""
        return self.positions


class StackedRows:
    """What the G blocks of a stack saw in one batch: each member's rows packed, ``a`` [G, R, in] and ``s``
    [G, R, out], in example order within a member, with each row's ``example`` and token ``positions``
    [G, R] (filler rows: example ``n_examples``, position -1) and ``valid`` [G, R] (real rows; the others are
    zero). Made by :func:`pack_stack`.

    Why not the per-example layout of :class:`Rows` with a members dimension: the tokens of one example tend to
    go to the same few experts, so padding every (member, example) cell to the widest one costs several times
    the real rows. Covariances and row rotations run on the packed rows; per-example products
    (:meth:`products`) lay the rows out in cells [B, G, width] with each member's examples ranked by their
    row count, most first, so that cell slots ``lo..hi-1`` hold rows in the first ``p`` ranks only
    (``steps``): a staircase of batched products over those ranks skips most of the padding.
    """

    stacked = True

    def __init__(self, a, s, valid, example, positions, n_examples, slot, cell, ranked, width, steps):
        self.a, self.s, self.valid, self.example, self.positions = a, s, valid, example, positions
        self.n_examples = n_examples
        self.slot = slot  # [G, R]: a row's place among the real rows of its (member, example) cell
        self.cell = cell  # [G·R]: each row's index in the flattened ranked cells (other rows: one past the end)
        self.ranked = ranked  # [G, B]: each member's examples, most rows first
        self.width = width  # the most real rows of one (member, example) cell
        self.steps = steps  # ((lo, hi, p), ...): slots lo..hi-1 hold rows in the first p ranks only

    def cells(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row values ``x`` [G, R, d] in the ranked cells: [B, G, width, d] (zero where no row)."""
        g, b, w = x.shape[0], self.n_examples, self.width
        out = x.new_zeros(b * g * w + 1, x.shape[-1])  # the extra row takes the other rows
        out.index_copy_(0, self.cell, x.reshape(-1, x.shape[-1]))
        return out[:-1].view(b, g, w, x.shape[-1])

    def products(self, x_s: torch.Tensor, x_a: torch.Tensor) -> torch.Tensor:
        """``Σ_t x_s,t x_a,tᵀ`` over each (member, example) cell's rows, for per-row ``x_s`` [G, R, o] and
        ``x_a`` [G, R, i]: [B, G, o, i], examples in the order of ``ranked`` (member by member)."""
        b, g, o, i = self.n_examples, x_s.shape[0], x_s.shape[-1], x_a.shape[-1]
        if not self.steps:
            return x_s.new_zeros(b, g, o, i)
        cs, ca = self.cells(x_s), self.cells(x_a)
        out = cs.new_empty(b, g, o, i)
        for n, (lo, hi, p) in enumerate(self.steps):  # each step: only the ranks that have rows in these slots
            left, right = cs[:p, :, lo:hi].flatten(0, 1).mT, ca[:p, :, lo:hi].flatten(0, 1)
            if n == 0:  # the first step covers every rank that has rows
                torch.bmm(left, right, out=out[:p].view(p * g, o, i))
                out[p:].zero_()
            else:
                out[:p].view(p * g, o, i).baddbmm_(left, right)
        return out

    def in_order(self, x: torch.Tensor) -> torch.Tensor:
        """Ranked per-example values [B, G, ...] (from :meth:`products`) in example order: [G, B, ...]."""
        b, g = x.shape[:2]
        member = torch.arange(g, device=x.device).unsqueeze(1)
        out = x.new_empty((g * b,) + x.shape[2:])
        out.index_copy_(0, (member * b + self.ranked).mT.flatten(), x.reshape((b * g,) + x.shape[2:]))
        return out.view((g, b) + x.shape[2:])

    def with_rows(self, a: torch.Tensor, s: torch.Tensor) -> "StackedRows":
        """Other rows ``a``, ``s`` in this layout (rows of the same tokens: e.g. another weight of the same
        experts)."""
        return StackedRows(a, s, self.valid, self.example, self.positions, self.n_examples, self.slot, self.cell,
                           self.ranked, self.width, self.steps)

    def per_example_gradient(self) -> torch.Tensor:
        """``G_gn = Σ_t s_gnt a_gntᵀ`` for every member and example: [G, B, out, in]."""
        return self.in_order(self.products(self.s, self.a))

    def select(self, index: slice) -> "StackedRows":
        """The rows of the examples ``index`` (a step-1 slice), packed again."""
        start, stop, _ = index.indices(self.n_examples)
        if start == 0 and stop == self.n_examples:
            return self
        g, r = self.example.shape
        bounds = torch.tensor([[start, stop]], device=self.example.device).expand(g, 2).contiguous()
        lo, hi = torch.searchsorted(self.example, bounds).unbind(1)  # a member's rows are in example order
        width = int((hi - lo).max())
        take = (lo.unsqueeze(1) + torch.arange(width, device=lo.device)).clamp(max=max(r - 1, 0))
        keep = torch.arange(width, device=lo.device) < (hi - lo).unsqueeze(1)
        rows = [t.gather(1, take.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in (self.a, self.s)]
        example = torch.where(keep, self.example.gather(1, take) - start, -1)
        return pack_stack(*rows, example, self.positions.gather(1, take), stop - start,
                          keep & self.valid.gather(1, take))

    def token_positions(self) -> torch.Tensor:
        """Token positions [B, G·width] in the layout of :meth:`by_example` (-1 where no row)."""
        return self.by_example(self.positions.unsqueeze(-1), fill=-1).squeeze(-1)

    def by_example(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """Per-row values ``x`` [G, R, d] laid out per example, members side by side: [B, G·width, d]."""
        g, b, w = x.shape[0], self.n_examples, self.width
        member = torch.arange(g, device=x.device).unsqueeze(1)
        index = torch.where(self.valid, (self.example * g + member) * w + self.slot, b * g * w).flatten()
        out = x.new_full((b * g * w + 1, x.shape[-1]), fill)
        out.index_copy_(0, index, x.reshape(-1, x.shape[-1]))
        return out[:-1].view(b, g * w, x.shape[-1])


#: A step of :meth:`StackedRows.products` goes on over further slots while they still hold rows in at least
#: this share of its ranks (smaller: fewer, wider steps with more padding).
STEP_FILL = 0.5


def _steps(counts: torch.Tensor, width: int) -> tuple[tuple[int, int, int], ...]:
    """The staircase of :meth:`StackedRows.products` from the cells' row counts [G, B] sorted, most first."""
    if width == 0:
        return ()
    # ranks[k]: how many ranks have a cell with more than k rows in some member.
    top = counts.max(0).values
    ranks = torch.bincount(top, minlength=width + 1).flip(0).cumsum(0).flip(0)[1:].tolist()
    steps, lo = [], 0
    while lo < width:
        hi = lo + 1
        while hi < width and ranks[hi] >= STEP_FILL * ranks[lo]:
            hi += 1
        steps.append((lo, hi, ranks[lo]))
        lo = hi
    return tuple(steps)


def pack_stack(a: torch.Tensor, s: torch.Tensor, example: torch.Tensor, position: torch.Tensor, n_examples: int,
               valid: torch.Tensor) -> StackedRows:
    """:class:`StackedRows` from a stack's packed rows: ``a`` [G, R, in], ``s`` [G, R, out] (zero where not
    ``valid``), each member's rows in example order (filler rows last, ``example`` -1)."""
    g, r = example.shape
    n = n_examples
    example = torch.where(example < 0, n, example)
    # Each row's (member, example) cell, in order along the flattened rows; filler rows in a cell of their own.
    member = torch.arange(g, device=a.device).unsqueeze(1)
    key = (member * (n + 1) + example).flatten()
    real = valid.flatten().long()
    per_key = torch.bincount(key, minlength=g * (n + 1))
    first = torch.cumsum(per_key, 0) - per_key  # the first row of each cell
    before = torch.cumsum(real, 0) - real  # real rows before each row
    slot = (before - before[first[key]]).view(g, r)
    real_key = torch.where(valid.flatten(), key, g * (n + 1))
    per_cell = torch.bincount(real_key, minlength=g * (n + 1) + 1)[:-1].view(g, n + 1)[:, :n]
    width = int(per_cell.max()) if per_cell.numel() else 0
    counts, ranked = per_cell.sort(dim=1, descending=True, stable=True)
    rank_of = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(n, device=a.device).expand(g, n).contiguous())
    rank = rank_of.gather(1, example.clamp(max=max(n - 1, 0)))
    cell = torch.where(valid, (rank * g + member) * width + slot, n * g * width).flatten()
    return StackedRows(a, s, valid, example, torch.where(valid, position, -1), n, slot, cell, ranked, width,
                       _steps(counts, width))


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
        if len(modules) == 0:
            raise InputError("modules= is an empty list, so nothing would be tracked; name at least one module, or "
                             "pass modules=None for every nn.Linear")
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
    units(tracked)  # checks the stacks
    return tracked


def units(tracked: Sequence[TrackedModule]) -> dict[str, list[Block]]:
    """The blocks as the estimator processes them: a stack's members together under the stack's key (in the
    order of ``blocks()``), every other block alone under its own key."""
    out: dict[str, list[Block]] = {}
    owner: dict[str, str] = {}
    for t in tracked:
        for b in t.blocks():
            key = b.stack or b.key
            if owner.setdefault(key, t.name) != t.name or (b.stack is None and key in out):
                raise InputError(f"{key!r} names blocks of two tracked modules; give each block and stack its own key")
            out.setdefault(key, []).append(b)
    for key, bs in out.items():
        if len({(b.out_dim, b.in_dim) for b in bs}) != 1:
            raise InputError(f"the blocks of stack {key!r} differ in shape; a stack's blocks must have one shape")
    return out


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
    _stacks: dict = field(default_factory=dict)  # stack key -> number of members

    def __enter__(self) -> "Recorder":
        self._stacks = {k: len(bs) for k, bs in units(self.tracked).items() if bs[0].stack is not None}
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

        Batch-first by default: ``activations`` [B, T, in] or [B, in]; ``output`` [B, T, out], or the same
        rows flattened in order, [B·T, out]. For rows in any order (e.g. the tokens routed to one expert) pass
        ``activations`` [N, in], ``output`` [N, out], ``example`` [N] and ``position`` [N] (which example and
        token each row belongs to) and ``n_examples``. For a stack (``key`` the stack's key), every member's
        rows at once: ``activations`` [G, R, in], ``output`` [G, R, out], ``example`` and ``position`` [G, R],
        a member's rows in example order, filler rows last with example -1. ``output`` must be used by the
        loss (not a copy made for recording), or its gradient is zero.
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
        if key in self._stacks and (example is None or example.dim() != 2 or example.shape[0] != self._stacks[key]):
            raise InputError(f"rows of stack {key!r} must come as [{self._stacks[key]} members, rows] with example=")
        self._calls[key].append(_Call(activations, output, output._version, example, position, n_examples))

    def rows(self, loss: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Rows | StackedRows]:
        """Backpropagate ``loss`` to the recorded outputs and return each block's rows for this batch.

        ``mask`` [B, T] (1 = real token) zeroes padding rows of every block whose rows are tokens of that
        length. Blocks that did not run in this batch are absent. Keys are block keys, or stack keys for the
        rows of stacked blocks (see :func:`units`).
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
        shared: dict = {}
        return {key: self._layout(key, items, mask, shared) for key, items in per_key.items()}

    def _layout(self, key: str, items: list, mask: torch.Tensor | None, shared: dict) -> Rows | StackedRows:
        if key in self._stacks:
            return self._stacked(key, items, mask, shared)
        parts = []
        for call, g in items:
            a, s = call.a.to(self.dtype), g.detach().to(self.dtype)
            if call.example is not None:
                a, s, example, position = _kept_rows(key, call, a, s.reshape(-1, s.shape[-1]), mask)
                parts.append(_scatter_rows(a, s, example, position, call.n_examples))
                continue
            if a.dim() >= 3 and s.dim() == 2 and s.shape[0] == a.shape[:-1].numel():
                s = s.reshape(a.shape[:-1] + s.shape[-1:])  # token rows given flattened in order (e.g. a router's)
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
            if mask is not None and dims == 3 and tuple(mask.shape) == tuple(a.shape[:2]):
                valid = mask.to(device=a.device, dtype=torch.bool)
                if not bool(valid.all()):
                    a, s = a * valid.unsqueeze(-1), s * valid.unsqueeze(-1)
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
        return Rows(a, s, pos, valid)

    def _stacked(self, key: str, items: list, mask: torch.Tensor | None, shared: dict) -> StackedRows:
        """A stack's rows (from every call in the pass, side by side), padding tokens' rows (by ``mask``) zeroed.

        Stacks recorded with the same ``example`` tensors (the weights of one experts module: their rows are the
        same tokens) share one layout, worked out once per batch in ``shared``.
        """

        def joined(parts: list) -> torch.Tensor:
            return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

        a = joined([call.a for call, _ in items]).to(self.dtype)
        s = joined([g.detach() for _, g in items]).to(self.dtype)
        # The calls' row tensors are alive (in items) for the whole rows() call, so their ids name them.
        ident = tuple((id(call.example), id(call.position), call.n_examples) for call, _ in items)
        if ident not in shared:
            shared[ident] = self._stack_layout(key, items, mask, a)
        order, zero, layout = shared[ident]
        if order is not None:  # each member's rows back in example order, filler last
            a, s = (x.gather(1, order.unsqueeze(-1).expand_as(x)) for x in (a, s))
        if zero:
            a, s = a * layout.valid.unsqueeze(-1), s * layout.valid.unsqueeze(-1)
        return layout.with_rows(a, s)

    @staticmethod
    def _stack_layout(key: str, items: list, mask: torch.Tensor | None, a: torch.Tensor):
        """The row order (None: as recorded), whether some rows must be zeroed, and the packed layout (its rows
        placeholders) of a stack's calls."""
        n = {call.n_examples for call, _ in items}
        if len(n) != 1:
            raise InputError(f"tracked stack {key!r} ran several times in one batch with different batch sizes {n}")
        n = n.pop()
        parts = [[getattr(call, f) for call, _ in items] for f in ("example", "position")]
        example, position = ((p[0] if len(p) == 1 else torch.cat(p, 1)).to(a.device).long() for p in parts)
        order = None
        if len(items) > 1:
            order = torch.argsort(torch.where(example < 0, n, example), dim=1, stable=True)
            example, position = example.gather(1, order), position.gather(1, order)
        valid = example >= 0
        real = _on_real_tokens(key, example, position, mask, n)
        if real is not None:
            valid &= real
        return order, not bool(valid.all()), pack_stack(a, a, example, position, n, valid)


def _on_real_tokens(key: str, example: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None,
                    n_examples: int) -> torch.Tensor | None:
    """Which rows, given by example (-1: filler) and token position, fall on real tokens of the padding
    ``mask`` [B, T]; None when no mask applies (none given, or one for another batch size)."""
    if mask is None or mask.shape[0] != n_examples:
        return None
    mask = mask.to(device=example.device, dtype=torch.bool)
    if bool((position[example >= 0] >= mask.shape[1]).any()):
        raise InputError(f"rows of {key!r} have token positions beyond the mask's {mask.shape[1]}")
    return mask[example.clamp(min=0), position.clamp(0, mask.shape[1] - 1)]


def _kept_rows(key: str, call: _Call, a: torch.Tensor, s: torch.Tensor, mask: torch.Tensor | None):
    """Rows given in any order (with example=): those of real tokens (by ``mask``), with their example and
    position."""
    example = call.example.to(a.device).long()
    position = call.position.to(a.device).long()
    keep = _on_real_tokens(key, example, position, mask, call.n_examples)
    if keep is not None and not bool(keep.all()):
        a, s, example, position = a[keep], s[keep], example[keep], position[keep]
    return a, s, example, position


def _scatter_rows(a, s, example, position, n_examples):
    """Lay rows given in any order out as [n_examples, max rows per example, dim], filler rows invalid (and zero)."""
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
