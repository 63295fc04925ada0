"""MoE routing pathways (docs/probes.md, "Routing pathways"; Li, Fan & Zhou, arXiv 2506.21551).

A sample's *pathway* is, at every MoE layer, the shortest descending-weight prefix of experts whose
cumulative routing weight exceeds ``tau``. Two pathways are compared by Levenshtein distance, over their text
form (``unit="char"``, "3,1,5-9,1") or over (layer, expert) symbols (``unit="expert"``). *Consistency*
compares a sample's routing embeddings at adjacent layers. *Memorized-at* and *generalized-at* split samples
by when their loss or accuracy settled.

Everything here is a pure function of tensors and options. On the CPU, distances go through rapidfuzz
(bit-parallel Levenshtein in C++, all cores); for pathways held on a CUDA device a batched dynamic program in
torch computes the same integers without leaving the device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from workbench.checks import is_number
from workbench.errors import InputError, NumericalError
from workbench.stats import correlation

UNITS = ("char", "expert")
_COMMA, _DASH = ord(","), ord("-")


# --- pathways -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pathways:
    """The pathways of N samples over L MoE layers, kept as tensors on the routing weights' device.

    ``experts[n, l, :lengths[n, l]]`` are sample n's experts at layer l in descending weight; entries past
    the prefix are -1. Index it for one pathway as lists, ``texts()`` for the text forms.
    """

    experts: torch.Tensor  # [N, L, K] long
    lengths: torch.Tensor  # [N, L] long, >= 1
    n_experts: int  # experts per layer in the model (for the (layer, expert) symbols)

    def __len__(self) -> int:
        return self.experts.shape[0]

    @property
    def n_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def device(self) -> torch.device:
        return self.experts.device

    def __getitem__(self, i: int) -> list[list[int]]:
        e, n = self.experts[i].tolist(), self.lengths[i].tolist()
        return [row[:k] for row, k in zip(e, n)]

    def tolist(self) -> list[list[list[int]]]:
        k = int(self.lengths.max()) if len(self) else 0
        e, n = self.experts[:, :, :k].tolist(), self.lengths.tolist()
        return [[row[:m] for row, m in zip(rows, ms)] for rows, ms in zip(e, n)]

    def select(self, index) -> "Pathways":
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return Pathways(self.experts[index], self.lengths[index], self.n_experts)

    def layer(self, layer: int) -> "Pathways":
        """The pathways of one layer alone (as one-layer pathways)."""
        sl = slice(layer, layer + 1)
        return Pathways(self.experts[:, sl], self.lengths[:, sl], self.n_experts)

    def to(self, device) -> "Pathways":
        return Pathways(self.experts.to(device), self.lengths.to(device), self.n_experts)

    def _chunks(self):
        size = _rows_per_chunk(self)
        for s in range(0, len(self), size):
            yield Pathways(self.experts[s: s + size], self.lengths[s: s + size], self.n_experts)

    def texts(self) -> list[str]:
        """The text form of every pathway ("3,1,5-9,1")."""
        return [t for c in self._chunks() for t in _decode(*_char_codes(c), np.uint8, "ascii")]

    def symbols(self) -> list[str]:
        """Each pathway as a string of one code point per (layer, expert) symbol: Levenshtein over these
        strings is the expert-unit distance (string metrics in rapidfuzz are faster than generic sequences)."""
        return [t for c in self._chunks() for t in _decode(*_expert_codes(c), np.uint32, "utf-32-le")]

    @classmethod
    def from_lists(cls, paths: Sequence[Sequence[Sequence[int]]], n_experts: int | None = None) -> "Pathways":
        """Pathways from nested lists (samples → layers → expert ids), e.g. parsed text forms."""
        if len(paths) == 0:
            raise InputError("no pathways given; give at least one")
        n_layers = {len(p) for p in paths}
        if len(n_layers) != 1:
            raise InputError(f"pathways must all have the same number of layers, got {sorted(n_layers)}")
        (n_layers,) = n_layers
        if n_layers == 0:
            raise InputError("a pathway needs at least one layer")
        k = max(len(layer) for p in paths for layer in p)
        if k == 0 or any(len(layer) == 0 for p in paths for layer in p):
            raise InputError("every layer of a pathway needs at least one expert")
        pad = [-1] * k
        try:  # one tensor from padded rows: far faster than filling a tensor entry by entry
            rows = [[int(e) for e in layer] + pad[len(layer):] for p in paths for layer in p]
        except (TypeError, ValueError) as exc:
            raise InputError("expert ids must be integers") from exc
        experts = torch.tensor(rows, dtype=torch.long).view(len(paths), n_layers, k)
        lengths = torch.tensor([len(layer) for p in paths for layer in p], dtype=torch.long).view(len(paths), n_layers)
        if int(experts.min()) < -1 or (experts.ge(0).sum() != lengths.sum()):
            raise InputError("expert ids must be non-negative integers")
        top = int(experts.max()) + 1
        if n_experts is not None and top > n_experts:
            raise InputError(f"expert id {top - 1} is out of range for {n_experts} experts")
        return cls(experts, lengths, n_experts if n_experts is not None else top)


def check_routing_weights(weights: torch.Tensor, atol: float = 1e-3) -> None:
    """Raise InputError unless ``weights`` is [samples, layers, experts] of distributions over experts."""
    if not isinstance(weights, torch.Tensor):
        raise InputError(f"routing weights must be a torch tensor [samples, layers, experts], not {type(weights).__name__}")
    if weights.dim() != 3:
        raise InputError(
            f"routing weights must be [samples, layers, experts], got shape {tuple(weights.shape)}; "
            "use the capture's routing (CaptureSpec(routing=True))"
        )
    if weights.numel() == 0:
        raise InputError(f"routing weights are empty (shape {tuple(weights.shape)}); give at least one sample")
    if not torch.isfinite(weights).all():
        raise NumericalError("routing weights hold NaN or infinity; check the model's router outputs")
    sums = weights.double().sum(-1)
    if (weights < 0).any() or not torch.allclose(sums, torch.ones_like(sums), atol=atol, rtol=0):
        worst = float((sums - 1).abs().max())
        raise InputError(
            f"routing weights must be distributions over experts (non-negative, summing to 1 at every layer); "
            f"these are off by up to {worst:.3g}. Router logits were probably passed: apply softmax over the "
            "experts first, or use the capture's routing"
        )


def check_tau(tau: float) -> None:
    if not (is_number(tau) and 0 < tau <= 1):
        raise InputError(f"tau must be in (0, 1], got {tau!r}; the study used 0.5 to 0.8 (default 0.7)")


def pathways(weights: torch.Tensor, tau: float = 0.7, *, tol: float = 1e-6, chunk: int = 4096) -> Pathways:
    """Each sample's pathway from token-averaged routing weights [samples, layers, experts].

    Per layer, experts are sorted by weight (descending; ties keep the lower id first) and the shortest prefix
    whose cumulative weight exceeds ``tau`` is kept. A cumulative weight within ``tol`` of ``tau`` counts as
    reaching, not exceeding, it (so 0.4 + 0.3 does not exceed 0.7 through float rounding), and experts of
    zero weight never join a prefix (``tau=1`` keeps every expert with weight, e.g. the top-k). Samples go
    ``chunk`` at a time, so memory stays near the size of the weights however many samples there are.
    """
    check_routing_weights(weights)
    check_tau(tau)
    parts, lengths = [], []
    for s in range(0, weights.shape[0], chunk):
        w = weights[s: s + chunk].double()
        sorted_w, order = torch.sort(w, dim=-1, descending=True, stable=True)
        # shortest prefix exceeding tau = 1 + the number of prefixes that do not exceed it
        n = (sorted_w.cumsum(-1) <= tau + tol).sum(-1) + 1
        n = torch.minimum(n, (sorted_w > 0).sum(-1).clamp(min=1))
        parts.append(order[..., : int(n.max())])
        lengths.append(n)
    k = max(p.shape[-1] for p in parts)
    experts = torch.cat([torch.nn.functional.pad(p, (0, k - p.shape[-1])) for p in parts])
    n = torch.cat(lengths)
    experts[torch.arange(k, device=weights.device) >= n.unsqueeze(-1)] = -1
    return Pathways(experts, n, weights.shape[-1])


def pathway_text(path: Sequence[Sequence[int]]) -> str:
    """The text form of one pathway: ids of a layer joined by ",", layers by "-" (e.g. "3,1,5-9,1")."""
    if isinstance(path, str):
        return path
    return "-".join(",".join(str(int(e)) for e in layer) for layer in path)


def parse_pathway(text: str) -> list[list[int]]:
    """The inverse of :func:`pathway_text`."""
    try:
        return [[int(e) for e in layer.split(",")] for layer in text.split("-")]
    except ValueError as exc:
        raise InputError(f"{text!r} is not a pathway text (expert ids joined by ',', layers by '-')") from exc


# --- encodings shared by the rapidfuzz and torch paths ----------------------------------------------------------
def _rows_per_chunk(p: "Pathways") -> int:
    # On a CPU, blocks well under torch's parallel grain (32768 elements) run on one thread: these cheap integer
    # ops are then ~10x faster than split across threads, which mostly wait on each other on a busy machine.
    if p.device.type == "cpu":
        return max(16, 16384 // max(1, p.experts.shape[1] * p.experts.shape[2]))
    return 1 << 16


def _zeros(rows: int, cols: int, device) -> torch.Tensor:
    if torch.device(device).type == "cpu":  # calloc'd by numpy: no thread-pool fill for a small block
        return torch.from_numpy(np.zeros((rows, cols), dtype=np.int32))
    return torch.zeros(rows, cols, dtype=torch.int32, device=device)


def _char_layout(e: torch.Tensor, n: torch.Tensor, max_digits: int):
    """Where each expert id's characters go in the text form: validity, digit counts, start offsets, lengths."""
    N, L, K = e.shape
    valid = (torch.arange(K, device=e.device) < n.unsqueeze(-1)).reshape(N, L * K)
    ids = e.clamp(min=0).reshape(N, L * K)
    ndig = torch.ones_like(ids)
    for d in range(1, max_digits):
        ndig += ids >= 10 ** d
    width = torch.where(valid, ndig + 1, 0)  # digits + one separator
    start = width.cumsum(1) - width
    return valid, ids, ndig, start, width.sum(1) - 1  # the last separator is not part of the text


def _char_codes(p: Pathways) -> tuple[torch.Tensor, torch.Tensor]:
    """The text forms as padded character codes [N, T] (int32) and lengths [N], built on the pathways' device
    a chunk of samples at a time (the intermediates are [chunk, layers x prefix length])."""
    e, n = p.experts, p.lengths
    N, L, K = e.shape
    chunk = _rows_per_chunk(p)
    max_digits = len(str(max(p.n_experts - 1, 0)))
    total = torch.cat([_char_layout(e[s: s + chunk], n[s: s + chunk], max_digits)[-1] for s in range(0, N, chunk)])
    T = int(total.max())
    spare = T + 1  # masked writes land in this column, which is cut off at the end
    codes = _zeros(N, T + 2, e.device)
    for s in range(0, N, chunk):
        valid, ids, ndig, start, _ = _char_layout(e[s: s + chunk], n[s: s + chunk], max_digits)
        rows = codes[s: s + chunk]
        for d in range(max_digits):  # d-th digit from the most significant one
            put = valid & (d < ndig)
            digit = (ids // (10 ** (ndig - 1 - d).clamp(min=0))) % 10 + ord("0")
            rows.scatter_(1, torch.where(put, start + d, spare), torch.where(put, digit, 0).to(torch.int32))
        last_in_layer = (torch.arange(K, device=e.device) == (n[s: s + chunk] - 1).unsqueeze(-1)).reshape(len(rows), -1)
        sep = torch.where(last_in_layer, _DASH, _COMMA).to(torch.int32)
        # each text's final separator lands at column `total`, in its padding, where nothing reads it
        rows.scatter_(1, torch.where(valid, start + ndig, spare), torch.where(valid, sep, 0))
    return codes[:, :T], total


def _expert_codes(p: Pathways) -> tuple[torch.Tensor, torch.Tensor]:
    """Pathways as padded (layer, expert) symbol codes [N, S] (int32) and lengths [N], a chunk at a time."""
    e, n = p.experts, p.lengths
    N, L, K = e.shape
    chunk = _rows_per_chunk(p)
    total = n.sum(1)
    S = int(total.max())
    codes = _zeros(N, S + 1, e.device)
    layer = torch.arange(L, device=e.device).view(1, L, 1)
    for s in range(0, N, chunk):
        ec, nc = e[s: s + chunk], n[s: s + chunk]
        valid = (torch.arange(K, device=e.device) < nc.unsqueeze(-1)).reshape(len(ec), -1)
        sym = (layer * p.n_experts + ec.clamp(min=0)).reshape(len(ec), -1)
        sym = torch.where(sym >= 0xD800, sym + 0x800, sym)  # skip the UTF-16 surrogates: every code is a character
        pos = valid.long().cumsum(1) - 1
        codes[s: s + chunk].scatter_(1, torch.where(valid, pos, S), torch.where(valid, sym, 0).to(torch.int32))
    return codes[:, :S], total


def _decode(codes: torch.Tensor, lengths: torch.Tensor, dtype, encoding: str) -> list[str]:
    # One bulk copy and one decode per row: far cheaper than joining Python ints for every expert.
    arr = np.ascontiguousarray(codes.cpu().numpy().astype(dtype))
    buf, row = arr.tobytes(), arr.shape[1] * arr.itemsize
    return [buf[i * row: i * row + k * arr.itemsize].decode(encoding) for i, k in enumerate(lengths.tolist())]


def _codes(p: Pathways, unit: str):
    return _char_codes(p) if unit == "char" else _expert_codes(p)


def _strings(p: Pathways, unit: str) -> list[str]:
    return p.texts() if unit == "char" else p.symbols()


# --- distances ---------------------------------------------------------------------------------------------
def check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise InputError(f"unit must be 'char' (the text form) or 'expert' ((layer, expert) symbols), not {unit!r}")


def _as_pathways(paths) -> Pathways:
    if isinstance(paths, Pathways):
        return paths
    if isinstance(paths, torch.Tensor):
        raise InputError("pass pathways (workbench.probes.pathways.pathways(weights)), not a weight tensor")
    paths = list(paths)
    return Pathways.from_lists([parse_pathway(p) if isinstance(p, str) else p for p in paths])


def edit_distance(a, b, unit: str = "char") -> int:
    """Levenshtein distance (unit costs) between two pathways, given as nested lists or text forms."""
    check_unit(unit)
    p = _as_pathways([a, b])
    sa, sb = _strings(p, unit)
    return int(Levenshtein.distance(sa, sb))


def _pick_backend(p: Pathways, backend: str) -> str:
    if backend == "auto":
        return "torch" if p.device.type == "cuda" else "rapidfuzz"
    if backend not in ("rapidfuzz", "torch"):
        raise InputError(f"backend must be 'auto', 'rapidfuzz' or 'torch', not {backend!r}")
    return backend


def _check_pairs(pairs, n: int, device) -> torch.Tensor:
    pairs = torch.as_tensor(pairs, dtype=torch.long, device=device)
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise InputError(f"pairs must be [P, 2] index pairs, got shape {tuple(pairs.shape)}")
    # on the CPU one numpy pass (a torch reduction this small only waits on its thread pool)
    lo, hi = ((int(pairs.min()), int(pairs.max())) if pairs.is_cuda else
              (int(pairs.numpy().min()), int(pairs.numpy().max()))) if pairs.numel() else (0, 0)
    if lo < 0 or hi >= n:
        raise InputError(f"pair indices must lie in 0..{n - 1}")
    return pairs


def levenshtein_torch(a: torch.Tensor, la: torch.Tensor, b: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """Levenshtein distances of a batch of code sequences (a[i, :la[i]] vs b[i, :lb[i]]), on their device.

    Written by hand because no library computes batched edit distances on a GPU. One dynamic-programming row
    at a time for the whole batch: D[i, j] = min(D[i-1, j] + 1, D[i-1, j-1] + cost, D[i, j-1] + 1); the
    in-row dependency is a running minimum, D[i, j] = j + cummin_k<=j (T[k] - k) over the first two terms T.
    Padding columns lie right of each pair's end and never feed back into it.
    """
    B, n = a.shape
    m = b.shape[1]
    j = torch.arange(m + 1, device=a.device, dtype=torch.int32)
    prev = j.expand(B, m + 1).contiguous()
    out = lb.to(torch.int32).clone()  # the distance to an empty sequence
    lb_idx = lb.long().unsqueeze(1)
    t = torch.empty(B, m + 1, dtype=torch.int32, device=a.device)
    for i in range(1, n + 1):
        cost = (a[:, i - 1: i] != b).to(torch.int32)
        t[:, 0] = i
        torch.minimum(prev[:, 1:] + 1, prev[:, :-1] + cost, out=t[:, 1:])
        cur = torch.cummin(t - j, dim=1).values + j
        out = torch.where(la == i, cur.gather(1, lb_idx).squeeze(1), out)
        prev = cur
    return out


def _torch_pair_distances(codes, lengths, pairs: torch.Tensor, chunk_cells: int) -> torch.Tensor:
    out = torch.empty(pairs.shape[0], dtype=torch.int32, device=codes.device)
    width = codes.shape[1] + 1
    step = max(1, chunk_cells // width)
    for s in range(0, pairs.shape[0], step):
        pi, pj = pairs[s: s + step, 0], pairs[s: s + step, 1]
        la, lb = lengths[pi], lengths[pj]
        n, m = int(la.max()), int(lb.max())
        d = levenshtein_torch(codes[pi, : max(n, 1)], la, codes[pj, : max(m, 1)], lb)
        out[s: s + step] = d
    return out


def _all_pairs(n: int, device=None) -> torch.Tensor:
    i, j = torch.triu_indices(n, n, offset=1, device=device)
    return torch.stack([i, j], 1)


def pairwise_distances(
    paths,
    unit: str = "char",
    pairs=None,
    normalize: bool = False,
    *,
    backend: str = "auto",
    chunk_cells: int = 1 << 24,
) -> torch.Tensor:
    """Levenshtein distances between pathways: an [N, N] matrix, or [P] for given index ``pairs`` [P, 2].

    ``paths`` are :class:`Pathways` (or nested lists, or text forms). ``normalize=True`` divides by the
    longer pathway's length (in the unit's symbols) and returns floats; otherwise integers. The result lies on
    the pathways' device. ``backend``: ``"rapidfuzz"`` (CPU, default off CUDA), ``"torch"`` (batched dynamic
    program, default for CUDA tensors; also runs on the CPU); both give identical numbers.
    """
    check_unit(unit)
    p = _as_pathways(paths)
    backend = _pick_backend(p, backend)
    if pairs is not None:
        pairs = _check_pairs(pairs, len(p), p.device)
    if backend == "rapidfuzz":
        d = _rapidfuzz_distances(_strings(p, unit), pairs)
        d = d.to(p.device)
    else:
        codes, lengths = _codes(p, unit)
        full = pairs is None
        idx = _all_pairs(len(p), p.device) if full else pairs
        d = _torch_pair_distances(codes, lengths, idx, chunk_cells)
        if full:
            mat = torch.zeros(len(p), len(p), dtype=torch.int32, device=p.device)
            mat[idx[:, 0], idx[:, 1]] = d
            mat[idx[:, 1], idx[:, 0]] = d
            d = mat
    if normalize:
        d = _normalize(d, _lengths(p, unit), pairs)
    return d


def _lengths(p: Pathways, unit: str) -> torch.Tensor:
    if unit == "expert":
        return p.lengths.sum(1)
    return _char_codes(p)[1]


def _normalize(d: torch.Tensor, lengths: torch.Tensor, pairs) -> torch.Tensor:
    lengths = lengths.to(d.device).double()
    longer = (torch.maximum(lengths[:, None], lengths[None, :]) if pairs is None
              else torch.maximum(lengths[pairs[:, 0]], lengths[pairs[:, 1]]))
    return d.double() / longer.clamp(min=1)


def _workers(n_pairs: int) -> int:
    # starting rapidfuzz's threads costs milliseconds: not worth it for a few thousand short comparisons
    return -1 if n_pairs > 20_000 else 1


def _rapidfuzz_distances(strings: list[str], pairs, chunk: int = 1 << 15) -> torch.Tensor:
    if pairs is None:
        # Identical pathways are common (routing collapses as a model trains): compute each distinct one once.
        uniq, inverse = np.unique(np.asarray(strings, dtype=object), return_inverse=True)
        # Longest first: for the text form (char unit) 15% faster in rapidfuzz's symmetric cdist than a random
        # order, more than the one gather that puts the rows back costs; for the expert unit's code-point strings
        # it measured 9-13% slower (README, Speed: the order per unit is still to settle).
        by_length = np.argsort(-np.fromiter(map(len, uniq), dtype=np.int64, count=len(uniq)), kind="stable")
        u = uniq[by_length].tolist()
        position = np.empty_like(by_length)
        position[by_length] = np.arange(len(by_length))
        index = position[inverse.ravel()]
        # passing the same list object twice lets rapidfuzz compute one triangle of the symmetric matrix
        small = process.cdist(u, u, scorer=Levenshtein.distance, workers=_workers(len(u) ** 2), dtype=np.int32)
        return torch.from_numpy(small[np.ix_(index, index)])
    if len(pairs) == 0:
        return torch.zeros(0, dtype=torch.int32)
    pi, pj = pairs.cpu().numpy().T
    uniq, inverse = np.unique(np.asarray(strings, dtype=object), return_inverse=True)
    if len(uniq) ** 2 <= 2 * len(pi):
        # few distinct pathways (one layer's lists, or routing that has collapsed): all their distances at
        # once, then a lookup per pair
        u = uniq.tolist()
        small = process.cdist(u, u, scorer=Levenshtein.distance, workers=_workers(len(u) ** 2), dtype=np.int32)
        return torch.from_numpy(small[inverse[pi], inverse[pj]])
    out = np.empty(len(pi), dtype=np.int32)
    # rapidfuzz copies every string it is given: slices of pairs keep that copy small for large groups
    for s in range(0, len(pi), chunk):
        left, right = [strings[i] for i in pi[s: s + chunk]], [strings[j] for j in pj[s: s + chunk]]
        out[s: s + chunk] = process.cpdist(left, right, scorer=Levenshtein.distance, workers=-1, dtype=np.int32)
    return torch.from_numpy(out)


def layer_distances(paths, unit: str = "char", pairs=None, normalize: bool = False, *, backend: str = "auto",
                    chunk_cells: int = 1 << 24) -> torch.Tensor:
    """Per-layer distances: each layer's expert list alone. [L, N, N], or [L, P] for given ``pairs``."""
    p = _as_pathways(paths)
    return torch.stack([
        pairwise_distances(p.layer(layer), unit, pairs, normalize, backend=backend, chunk_cells=chunk_cells)
        for layer in range(p.n_layers)
    ])


# --- group means over (sampled) pairs -------------------------------------------------------------------------
def sample_pairs(n: int, max_pairs: int | None = 200_000, seed: int = 0) -> torch.Tensor:
    """Index pairs (i < j) of a group of ``n``: all of them, or ``max_pairs`` distinct ones drawn with
    ``seed``. The draw depends only on (n, max_pairs, seed), so it is the same at every checkpoint."""
    if n < 2:
        raise InputError(f"a group needs at least 2 samples to have pairs, got {n}; merge or drop the group")
    total = n * (n - 1) // 2
    if max_pairs is None or total <= max_pairs:
        return _all_pairs(n)
    if max_pairs < 1:
        raise InputError(f"max_pairs must be positive or None, got {max_pairs}")
    rng = np.random.default_rng(seed)
    k = np.sort(rng.choice(total, size=max_pairs, replace=False)).astype(np.int64)
    # unrank k in the row-major order of the upper triangle: row i starts at i*n - i*(i+1)/2
    b = 2 * n - 1
    i = np.floor((b - np.sqrt(np.maximum(b * b - 8.0 * k, 0.0))) / 2).astype(np.int64)
    row_start = lambda r: r * n - r * (r + 1) // 2  # noqa: E731
    i = np.where(row_start(i) > k, i - 1, i)  # fix float rounding either way
    i = np.where(row_start(i + 1) <= k, i + 1, i)
    j = k - row_start(i) + i + 1
    return torch.from_numpy(np.stack([i, j], 1))


def group_mean_distance(
    paths,
    index=None,
    unit: str = "char",
    *,
    max_pairs: int | None = 200_000,
    seed: int = 0,
    per_layer: bool = False,
    normalize: bool = False,
    backend: str = "auto",
) -> float | torch.Tensor:
    """Mean pathway distance over all pairs of a group (``index`` selects it; default: every pathway), or
    over ``max_pairs`` pairs drawn with ``seed`` when the group has more. Memory grows with the number of
    pairs, never with N². ``per_layer=True`` returns one mean per layer ([L] tensor) instead of a float."""
    p = _as_pathways(paths)
    if index is not None:
        p = p.select(index)
    pairs = sample_pairs(len(p), max_pairs, seed).to(p.device)
    if per_layer:
        d = layer_distances(p, unit, pairs, normalize, backend=backend)
        return d.double().mean(1).cpu()
    return float(pairwise_distances(p, unit, pairs, normalize, backend=backend).double().mean())


# --- consistency -----------------------------------------------------------------------------------------------
def consistency(weights: torch.Tensor, router_matrices, eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """Pathway consistency per sample from routing weights [N, L, E] and each layer's router matrix [E, d].

    Routing embedding e_l = sum_k g_l[k] W_l[k]; c_l = cos(e_l, e_{l+1}) for adjacent layers;
    ``consistency_raw = mean(c) / (max(c) + eps)`` (the study's ratio) and ``consistency = 1 - raw`` (the
    study's printed C). With two MoE layers there is one pair and raw is 1 for every sample.
    """
    check_routing_weights(weights)
    n, L, E = weights.shape
    if isinstance(router_matrices, torch.Tensor) and router_matrices.dim() == 3:
        router_matrices = list(router_matrices)
    if router_matrices is None or len(router_matrices) != L:
        got = None if router_matrices is None else len(router_matrices)
        raise InputError(
            f"the routing weights have {L} MoE layers but {got} router matrices were given; pass the "
            "matrices of the same layers (capture's router_matrices)"
        )
    if L < 2:
        raise InputError("consistency compares adjacent MoE layers: it needs at least 2 (better 3 or more)")
    dims = {tuple(w.shape) for w in router_matrices}
    if len(dims) != 1 or next(iter(dims))[0] != E or len(next(iter(dims))) != 2:
        raise InputError(
            f"router matrices must all be [experts={E}, d_model], got shapes {sorted(dims)}"
        )
    if L == 2:
        warnings.warn("with two MoE layers consistency_raw is 1 for every sample: the metric needs 3 or more",
                      stacklevel=2)
    w = torch.stack([m.to(weights.device, torch.float32) for m in router_matrices])  # [L, E, d]
    emb = torch.einsum("nle,led->nld", weights.float(), w)
    c = torch.nn.functional.cosine_similarity(emb[:, :-1], emb[:, 1:], dim=-1, eps=eps)  # [N, L-1]
    raw = c.mean(1) / (c.max(1).values + eps)
    return {"consistency": 1 - raw, "consistency_raw": raw}


# --- memorized-at and generalized-at ---------------------------------------------------------------------------
def _check_series(values, steps, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.as_tensor(values)
    if not values.is_floating_point():  # keep float32 as given: 0.8 stays "not above 0.8" in its own precision
        values = values.double()
    steps = torch.as_tensor(steps, dtype=torch.long)
    if values.dim() == 1:
        values = values.unsqueeze(1)
    if values.dim() != 2 or steps.dim() != 1 or values.shape[0] != steps.shape[0]:
        raise InputError(
            f"{name} must be [checkpoints, samples] with one step per checkpoint; got {tuple(values.shape)} "
            f"and {tuple(steps.shape)} steps"
        )
    if steps.numel() == 0:
        raise InputError(f"no checkpoints: {name} is empty")
    if (steps[1:] <= steps[:-1]).any():
        raise InputError("steps must increase strictly (sort the checkpoints by step)")
    if torch.isnan(values).any():
        raise InputError(f"{name} hold NaN; samples without a scored token have no {name}: drop them")
    return values, steps


def _first_of_stable_suffix(ok: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    # suffix_ok[t] = ok[t] and ok[t+1] and ... ; the first t where it holds is where the stable stretch starts
    suffix = ok.flip(0).long().cumprod(0).flip(0).bool()
    first = torch.where(suffix.any(0), suffix.long().argmax(0), -1)
    return torch.where(first >= 0, steps[first.clamp(min=0)], -1)


def memorized_since(losses, steps, eps, delta: float = 0.05) -> torch.Tensor:
    """Per sample, the step t* from which on every checkpoint has loss <= ``eps`` and stays within ``delta``
    of the last checkpoint's loss; -1 where there is none. ``losses`` [T, N]; ``eps`` a float or [N]."""
    losses, steps = _check_series(losses, steps, "losses")
    eps = torch.as_tensor(eps, dtype=losses.dtype)
    ok = (losses <= eps) & ((losses - losses[-1]).abs() <= delta)
    return _first_of_stable_suffix(ok, steps)


def generalized_since(correct, steps, threshold: float = 0.8, max_errors: int = 1) -> torch.Tensor:
    """Per sample, the earliest step t# whose accuracy is above ``threshold`` and after which at most
    ``max_errors`` checkpoints fall to or below it; -1 where there is none. ``correct`` [T, N] in [0, 1]."""
    acc, steps = _check_series(correct, steps, "accuracies")
    good = acc > threshold
    bad_after = (~good).flip(0).long().cumsum(0).flip(0) - (~good).long()  # errors strictly after t
    ok = good & (bad_after <= max_errors)
    first = torch.where(ok.any(0), ok.long().argmax(0), -1)
    return torch.where(first >= 0, steps[first.clamp(min=0)], -1)


def choose_eps(losses, steps=None, target: tuple[float, float] = (0.20, 0.25), delta: float = 0.05) -> float:
    """The loss threshold eps for :func:`memorized_since` at which a share of samples inside ``target``
    (default 20-25%, aiming at the middle) is memorized before the last checkpoint.

    A sample is memorized before the last checkpoint exactly when its last two losses are within ``delta``
    and both <= eps, so the share is a step function of eps with jumps at max(last two losses). Returns
    NaN when fewer than two checkpoints exist or no sample can qualify.
    """
    losses = torch.as_tensor(losses, dtype=torch.float64)
    if steps is None:
        steps = torch.arange(losses.shape[0])
    losses, _ = _check_series(losses, steps, "losses")
    lo, hi = target
    if not 0 < lo <= hi <= 1:
        raise InputError(f"target must be a share range (lo, hi) with 0 < lo <= hi <= 1, got {target}")
    T, n = losses.shape
    if T < 2:
        return math.nan
    a, b = losses[-2], losses[-1]
    need = torch.where((a - b).abs() <= delta, torch.maximum(a, b), torch.inf)
    need = need[torch.isfinite(need)].sort().values
    if need.numel() == 0:
        return math.nan
    want = min(max(round((lo + hi) / 2 * n), math.ceil(lo * n)), math.floor(hi * n))
    want = min(max(want, 1), need.numel())
    return float(need[want - 1])


# --- pairing training and test groups ------------------------------------------------------------------------
def pathway_embedding(paths) -> torch.Tensor:
    """Multi-hot routing embedding [N, L·E] of pathways: 1 where a sample's pathway uses expert e at layer l.

    A group's mean of it is the share of its members routed through each (layer, expert), which is what
    :func:`match_groups` compares when no other embedding of the samples is at hand.
    """
    p = _as_pathways(paths)
    n, n_layers, _ = p.experts.shape
    used = p.experts >= 0
    col = (torch.arange(n_layers, device=p.device)[None, :, None] * p.n_experts + p.experts.clamp_min(0))[used]
    row = torch.arange(n, device=p.device)[:, None, None].expand_as(p.experts)[used]
    out = torch.zeros(n, n_layers * p.n_experts, device=p.device)
    out[row, col] = 1.0
    return out


def match_groups(a, b) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-to-one pairing of the groups with mean embeddings ``a`` [Ga, d] to those with ``b`` [Gb, d] that
    maximizes the total cosine similarity (the Hungarian matching of the study, through scipy's
    ``linear_sum_assignment``). Returns the index into ``a``, the index into ``b`` and the similarity of each
    of the min(Ga, Gb) pairs, in the order of ``a``.
    """
    from scipy.optimize import linear_sum_assignment  # about a second to import: only when groups are matched

    a = torch.as_tensor(a, dtype=torch.float64).cpu()
    b = torch.as_tensor(b, dtype=torch.float64).cpu()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise InputError(
            f"group embeddings must be [groups, dim] with one dim on both sides; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    for name, x in (("a", a), ("b", b)):
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"the group embeddings {name} hold NaN or infinite values; drop the groups without data")
        zero = (x.norm(dim=1) == 0).nonzero()[:, 0].tolist()
        if zero:
            raise InputError(f"group(s) {zero} of {name} have an all-zero mean embedding, so no cosine similarity; "
                             "drop them or embed the samples differently")
    sim = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    return rows, cols, sim[rows, cols]


# --- correlation across checkpoints ----------------------------------------------------------------------------
def track_correlation(metric, accuracy, method: str = "pearson") -> float:
    """Correlation across checkpoints of a metric with accuracy (Pearson or Spearman); pairs with a NaN are
    left out. NaN when either series is constant."""
    return correlation(np.ravel(metric), np.ravel(accuracy), method)[0]


__all__ = [
    "Pathways",
    "check_routing_weights",
    "check_tau",
    "check_unit",
    "choose_eps",
    "consistency",
    "edit_distance",
    "generalized_since",
    "group_mean_distance",
    "layer_distances",
    "levenshtein_torch",
    "match_groups",
    "memorized_since",
    "pairwise_distances",
    "parse_pathway",
    "pathway_embedding",
    "pathway_text",
    "pathways",
    "sample_pairs",
    "track_correlation",
]
