"""PowerSGD: rank-r factors of each weight matrix, summed by two all-reduces.

Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization", NeurIPS 2019 (docs/ALGORITHMS.md 5.7; the math follows the paper and torch's
powerSGD_hook). One power-iteration step per round, from a fresh random Q, or (warm_start) from
the previous round's summed Q', orthonormalised, which makes the rounds a continued power
iteration that tracks the pseudo-gradients' dominant subspace:

    ps = PowerSGD(rank=4)
    p = ps.first_pass(deltas, ctx)        # P_i = M_i Q_i, then the small tensors as they are
    p_sum = all_reduce_sum(p)
    q = ps.second_pass(deltas, p_sum)     # Q'_i = M_i^T orth(P_sum_i)
    q_sum = all_reduce_sum(q)
    mean_hat = ps.decode(p_sum, q_sum, count=n_workers, shapes=[d.shape for d in deltas])
    ps.keep(q_sum, shapes)                # warm_start: the next round's Q (state_dict() has it)

Each tensor is viewed as an n x m matrix ([shape[0], -1]) and factorised only if it has at least
2 dimensions and (n + m) r min_compression < n m, with r = min(rank, n, m); the others travel
uncompressed inside the first pass. Decoding gives P_orth P_orth^T (sum of M) / count: the
projection of the mean onto the span of the summed P. So a rank-r input is recovered exactly (up
to fp32 rounding), and both passes are linear in the inputs given the shared Q and P_orth.

Error feedback (e = M - M_hat, with M_hat the aggregated approximation) is left to the caller.
Bit-identical results on all workers need the same p_sum and the same torch build and thread
settings: orthonormalisation is plain fp32 Gram-Schmidt, with no data-dependent branches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dilo.compress.base import Context, check_finite


def orthonormalize(a: Tensor) -> Tensor:
    """The columns of `a` (n x r) made orthonormal by modified Gram-Schmidt; zero columns stay zero.

    No eps is added to the norms (torch's hook adds 1e-8), so the result does not depend on the
    scale of the input: pseudo-gradients can be small.
    """
    a = a.clone()
    for i in range(a.shape[1]):
        col = a[:, i]
        norm = col.norm()
        col.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))
        if i + 1 < a.shape[1]:
            rest = a[:, i + 1 :]
            rest.sub_(col[:, None] * (col @ rest)[None, :])
    return a


class PowerSGD:
    """Rank-r PowerSGD over a list of per-parameter fp32 tensors (see the module docstring).

    The first pass carries sum(n_i r_i) + sum(raw numel) floats, the second sum(m_i r_i), see
    `payload_floats`. Both are all-reduced (linear); not shardable, since a matrix's factors need
    all of it.
    """

    linear = True
    shardable = False
    block = 1

    def __init__(self, rank: int = 4, min_compression: float = 2.0, warm_start: bool = False) -> None:
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        if min_compression < 1.0:
            raise ValueError(f"min_compression must be >= 1, got {min_compression}")
        self.rank = rank
        self.min_compression = min_compression
        self.warm_start = warm_start
        self.warm: dict[int, Tensor] = {}
        """warm_start: the next round's Q per tensor index (replaced each round, never updated in
        place, so a caller can keep the old dict to roll a failed round back)."""

    def _dims(self, shape: Sequence[int]) -> tuple[int, int, int] | None:
        """(n, m, r) when a tensor of this shape is factorised, else None."""
        if len(shape) < 2:
            return None
        n = shape[0]
        m = math.prod(shape[1:])
        r = min(self.rank, n, m)
        return (n, m, r) if (n + m) * r * self.min_compression < n * m else None

    def plan(self, shapes: Sequence[Sequence[int]]) -> list[bool]:
        return [self._dims(s) is not None for s in shapes]

    def payload_floats(self, shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
        first = second = 0
        for s in shapes:
            dims = self._dims(s)
            if dims is None:
                first += math.prod(s)
            else:
                n, m, r = dims
                first += n * r
                second += m * r
        return first, second

    def initial_q(self, m: int, r: int, ctx: Context, index: int) -> Tensor:
        """Q_i (m x r): the kept one (warm_start, when it has no zero column), else N(0, 1) from a CPU
        generator seeded by the round and the tensor's index, then orthonormalised, so every worker
        draws the same one."""
        kept = self.warm.get(index)
        if kept is not None and kept.shape == (m, r) and bool((kept.norm(dim=0) > 0).all()):
            return kept
        seed = (ctx.shared_seed() ^ ((index + 1) * 0x9E3779B97F4A7C15)) & 0x7FFFFFFFFFFFFFFF
        gen = torch.Generator().manual_seed(seed)
        return orthonormalize(torch.randn(m, r, generator=gen))

    def first_pass(self, tensors: Sequence[Tensor], ctx: Context) -> Tensor:
        ps: list[Tensor] = []
        raw: list[Tensor] = []
        for i, t in enumerate(tensors):
            check_finite(t)
            dims = self._dims(t.shape)
            if dims is None:
                raw.append(t.detach().reshape(-1).float())
                continue
            n, m, r = dims
            q = self.initial_q(m, r, ctx, i).to(t.device)
            ps.append((t.detach().reshape(n, m).float() @ q).reshape(-1))
        return torch.cat(ps + raw) if ps or raw else torch.zeros(0)

    def _p_orth(self, shapes: Sequence[Sequence[int]], p_sum: Tensor) -> list[Tensor | None]:
        """orth(P_i) per factorised tensor (None for the others), read from the summed first pass."""
        out: list[Tensor | None] = []
        offset = 0
        for s in shapes:
            dims = self._dims(s)
            if dims is None:
                out.append(None)
                continue
            n, _, r = dims
            out.append(orthonormalize(p_sum[offset : offset + n * r].view(n, r).float()))
            offset += n * r
        return out

    def second_pass(self, tensors: Sequence[Tensor], p_sum: Tensor) -> Tensor:
        qs: list[Tensor] = []
        for t, p in zip(tensors, self._p_orth([t.shape for t in tensors], p_sum)):
            if p is not None:
                m = t.numel() // t.shape[0]
                qs.append((t.detach().reshape(-1, m).float().T @ p).reshape(-1))
        return torch.cat(qs) if qs else torch.zeros(0, device=p_sum.device)

    def decode(self, p_sum: Tensor, q_sum: Tensor, count: float, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
        """The mean of the inputs, approximated: P_orth Q'_sum^T / count for factorised tensors,
        the summed raw values / count for the others, in the original shapes."""
        dims = [self._dims(s) for s in shapes]
        # The first pass holds every P_i first, then the raw tensors.
        raw_offset = sum(d[0] * d[2] for d in dims if d is not None)
        q_offset = 0
        out: list[Tensor] = []
        for s, d, p in zip(shapes, dims, self._p_orth(shapes, p_sum)):
            if d is None or p is None:
                size = math.prod(s)
                out.append(p_sum[raw_offset : raw_offset + size].float().view(tuple(s)) / count)
                raw_offset += size
                continue
            _, m, r = d
            q = q_sum[q_offset : q_offset + m * r].view(m, r).float()
            q_offset += m * r
            out.append((p @ (q.T / count)).view(tuple(s)))  # scale the small factor: one output pass
        return out

    def keep(self, q_sum: Tensor, shapes: Sequence[Sequence[int]]) -> None:
        """warm_start: orth(Q'_sum_i) becomes tensor i's next Q (the same on every worker: q_sum is
        all-reduced); without warm_start nothing is kept."""
        if not self.warm_start:
            return
        warm: dict[int, Tensor] = {}
        offset = 0
        for i, s in enumerate(shapes):
            dims = self._dims(s)
            if dims is None:
                continue
            _, m, r = dims
            warm[i] = orthonormalize(q_sum[offset : offset + m * r].view(m, r).float())
            offset += m * r
        self.warm = warm

    def state_dict(self) -> dict[str, Tensor]:
        return {f"q.{i}": q for i, q in self.warm.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.warm = {int(k.removeprefix("q.")): v.float() for k, v in state.items()}

    def __repr__(self) -> str:
        return f"PowerSGD(rank={self.rank}, min_compression={self.min_compression}, warm_start={self.warm_start})"
