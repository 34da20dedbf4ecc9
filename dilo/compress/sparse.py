"""Sparsifiers: top-k by magnitude and random-k with a mask shared by all workers.

Both send a fixed number k of values, so the payload size depends only on the length. Both are
meant to run under error feedback (docs/ALGORITHMS.md 5.4, 5.6): what is not sent this round is kept
and sent later.

    codec = ErrorFeedback(TopK(fraction=0.01))
    e = codec.encode(delta, ctx)       # {"idx": int32[k], "values": fp32[k]}
    delta_hat = codec.decode(e)        # zeros except at the k kept positions

k = max(1, ceil(fraction * n)) for the whole vector, or per chunk for chunked top-k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dilo.compress.base import Context, Encoded, check_finite, slab_rows


def _count(fraction: float, n: int) -> int:
    """max(1, ceil(fraction * n)), at most n; the ceiling ignores float noise (0.07 * 100 is 7)."""
    return max(1, min(n, math.ceil(fraction * n * (1 - 1e-12))))


class TopK:
    """The k values of largest magnitude, sent as (index, value) pairs.

    chunk = 0: k = max(1, ceil(fraction * n)) over the whole vector, int32 indices,
    payload {"idx": int32[k], "values": fp32[k]}.
    chunk > 0: the vector is cut into chunks of min(chunk, n) values (the last one zero-padded) and
    each keeps k_c = max(1, ceil(fraction * chunk)) values, indices within the chunk stored as
    int16 (offset by -32768, so chunks up to 65536 fit), payload {"values": fp32[n_chunks * k_c],
    "idx": int16[n_chunks * k_c]}. Per-chunk selection is cheaper and halves the index bytes.

    Bound: decode is exact at the kept positions and zero elsewhere, and every dropped magnitude is
    <= every kept magnitude (of the same chunk). Ties are broken arbitrarily. Payloads must be
    gathered (indices differ per worker): neither linear nor shardable.
    """

    linear = False
    shardable = False
    block = 1

    def __init__(self, fraction: float, chunk: int = 0, warmup_rounds: int = 0) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if not 0 <= chunk <= 65536:
            raise ValueError(f"chunk must be in [0, 65536], got {chunk}")
        if warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")
        self.fraction = fraction
        self.chunk = chunk
        self.warmup_rounds = warmup_rounds

    def fraction_at(self, round_idx: int) -> float:
        """Deep Gradient Compression's sparsity warm-up: in round r < warmup_rounds the density is
        max(fraction, 0.25^(r + 1)) (25%, 6.25%, 1.6%, ...), then fraction. Every worker of a round
        keeps the same count, so payloads of one round still have one size."""
        if round_idx < self.warmup_rounds:
            return max(self.fraction, 0.25 ** (round_idx + 1))
        return self.fraction

    def encode(self, x: Tensor, ctx: Context) -> Encoded:
        check_finite(x, ctx)
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        fraction = self.fraction_at(ctx.round)
        if self.chunk == 0:
            k = _count(fraction, n)
            idx = flat.abs().topk(k, sorted=False).indices
            # Sorted indices make the gather here and the scatter in decode sequential.
            idx = idx.sort().values
            return Encoded({"idx": idx.to(torch.int32), "values": flat[idx]}, n)
        chunk = min(self.chunk, n)
        pad = -n % chunk
        xc = F.pad(flat, (0, pad)).view(-1, chunk) if pad else flat.view(-1, chunk)
        k = _count(fraction, chunk)
        n_chunks = xc.shape[0]
        idx = torch.empty(n_chunks, k, dtype=torch.long, device=xc.device)
        values = torch.empty(n_chunks, k, device=xc.device)
        # slab by slab: the magnitudes are written to one buffer in cache, not to a new vector
        rows = slab_rows(n_chunks, chunk)
        mags = torch.empty(rows, chunk, device=xc.device)
        for lo in range(0, n_chunks, rows):
            hi = min(lo + rows, n_chunks)
            m = torch.abs(xc[lo:hi], out=mags[: hi - lo])
            torch.topk(m, k, dim=1, sorted=False, out=(values[lo:hi], idx[lo:hi]))
            torch.gather(xc[lo:hi], 1, idx[lo:hi], out=values[lo:hi])  # the signed values
        values = values.view(-1)
        # Values first: fp32 must sit at a 4-byte offset when a peer's bytes are unpacked.
        return Encoded({"values": values, "idx": (idx - 32768).to(torch.int16).view(-1)}, n)

    def decode(self, e: Encoded) -> Tensor:
        n = e.numel
        values = e.tensors["values"].float()
        idx = e.tensors["idx"].long()
        if self.chunk == 0:
            return torch.zeros(n, device=values.device).index_put_((idx,), values)
        chunk = min(self.chunk, n)
        n_chunks = math.ceil(n / chunk)
        offsets = torch.arange(n_chunks, device=idx.device)[:, None] * chunk
        pos = (idx.view(n_chunks, -1) + 32768 + offsets).view(-1)
        return torch.zeros(n_chunks * chunk, device=values.device).index_put_((pos,), values)[:n]

    def __repr__(self) -> str:
        warm = f", warmup_rounds={self.warmup_rounds}" if self.warmup_rounds else ""
        return f"TopK(fraction={self.fraction}, chunk={self.chunk}{warm})"


_SEED_BITS = 40
"""RandomK seeds are cut to 40 bits so that the int64 sum of up to 2^23 copies cannot overflow."""


def randomk_indices(n: int, k: int, seed: int) -> Tensor:
    """A uniformly random k-subset of range(n), sorted, as int64; a pure function of its arguments.

    Small k avoids randperm(n) (0.5 s for 16M values): draw a few more than k uniform integers,
    keep the distinct ones (a uniform subset of its size, by symmetry), then a uniform k of those.
    """
    gen = torch.Generator().manual_seed(seed)
    if 4 * k > n:
        return torch.randperm(n, generator=gen)[:k].sort().values
    draws = k + 2 * k * k // n + 64  # expected repeats are about draws^2 / 2n
    while True:
        # torch.unique: Tensor.unique has no type annotation in torch
        distinct: Tensor = torch.unique(torch.randint(0, n, (draws,), generator=gen), sorted=True)
        if distinct.numel() >= k:
            break
        draws *= 2
    keep = torch.randperm(distinct.numel(), generator=gen)[:k].sort().values
    return distinct[keep]


class RandomK:
    """k = max(1, ceil(fraction * n)) values at random positions shared by every worker.

    The index set is a uniform k-subset drawn from a generator seeded with ctx.shared_seed(): the
    same on all workers of a round, different across rounds and parts. So payloads of one round
    sum elementwise and the sum decodes to the sum of the inputs restricted to the mask: linear,
    and all-reduced.

    Payload {"seed": int64[2], "values": fp32[k]}. "seed" is [s, 1] with s the 40-bit mask seed;
    summed over N workers it becomes [N s, N], from which decode recovers s (a sum that is not a
    whole multiple is refused). The exchange must sum "seed" in int64, or leave it as it is.

    Values are not rescaled by n / k: the decoded vector is the masked input, biased toward zero,
    which is what error feedback wants (the rest is sent later). Bound: exact on the mask, zero off
    it. Not shardable (the mask depends on the whole length).
    """

    linear = True
    shardable = False
    block = 1

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def encode(self, x: Tensor, ctx: Context) -> Encoded:
        check_finite(x, ctx)
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        seed = ctx.shared_seed() & ((1 << _SEED_BITS) - 1)
        idx = randomk_indices(n, _count(self.fraction, n), seed).to(flat.device)
        # The seed goes first so that the int64 tensor is 8-byte aligned in the packed bytes.
        seeds = torch.tensor([seed, 1], dtype=torch.int64, device=flat.device)
        return Encoded({"seed": seeds, "values": flat[idx]}, n)

    def decode(self, e: Encoded) -> Tensor:
        total, count = (int(v) for v in e.tensors["seed"])
        if count <= 0 or total % count:
            raise ValueError(f"random-k payload with seed sum {total} over {count} workers: mixed rounds?")
        n = e.numel
        values = e.tensors["values"].float()
        idx = randomk_indices(n, _count(self.fraction, n), total // count).to(values.device)
        return torch.zeros(n, device=values.device).index_put_((idx,), values)

    def __repr__(self) -> str:
        return f"RandomK(fraction={self.fraction})"
