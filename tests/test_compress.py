"""Codecs: stated error bounds, wire format, honest algebra flags, error feedback, PowerSGD math."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import get_args

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from dilo.compress import (
    BFloat16,
    BlockQuant,
    Codec,
    Context,
    DCTTopK,
    Encoded,
    ErrorFeedback,
    Float16,
    Identity,
    Int2,
    PowerSGD,
    RandomK,
    Sign,
    Ternary,
    TopK,
    build_codec,
    pack,
    pack_int4,
    unpack,
    unpack_int4,
)
from dilo.compress.dct import dct_matrix
from dilo.compress.sparse import _count, randomk_indices
from dilo.config import CodecKind, CodecSpec

CODECS: dict[str, Callable[[], Codec]] = {
    "identity": Identity,
    "fp16": Float16,
    "bf16": BFloat16,
    "int8": lambda: BlockQuant(8, block=16),
    "int4": lambda: BlockQuant(4, block=16),
    "int8-stochastic": lambda: BlockQuant(8, block=16, stochastic=True),
    "int4-stochastic-odd": lambda: BlockQuant(4, block=7, stochastic=True),
    "int4-odd": lambda: BlockQuant(4, block=3),
    "sign": lambda: Sign(block=16),
    "sign-odd": lambda: Sign(block=5),
    "topk": lambda: TopK(0.1),
    "topk-chunk": lambda: TopK(0.1, chunk=32),
    "randomk": lambda: RandomK(0.1),
    "ef-identity": lambda: ErrorFeedback(Identity()),
    "ef-topk": lambda: ErrorFeedback(TopK(0.1)),
    "ef-sign": lambda: ErrorFeedback(Sign(block=16)),
    "ef-int4": lambda: ErrorFeedback(BlockQuant(4, block=16)),
    "ef-randomk": lambda: ErrorFeedback(RandomK(0.1)),
    "int2": lambda: Int2(block=16),
    "int2-stochastic-odd": lambda: Int2(block=7, stochastic=True),
    "ternary": lambda: Ternary(block=16),
    "ternary-noclip-odd": lambda: Ternary(block=9, clip=0.0),
    "ef-int2": lambda: ErrorFeedback(Int2(block=16)),
    "ef-ternary": lambda: ErrorFeedback(Ternary(block=16)),
    "dct": lambda: DCTTopK(0.1, chunk=16),
    "dct-int2-short": lambda: DCTTopK(0.2, chunk=7, values="int2"),
    "dct-wide": lambda: DCTTopK(0.02, chunk=300),
    "ef-dct": lambda: ErrorFeedback(DCTTopK(0.1, chunk=16, values="int2")),
    "dgc-topk": lambda: ErrorFeedback(TopK(0.1, chunk=32, warmup_rounds=3), momentum=0.9),
}

CTX = Context(seed=3, round=5, rank=1, part=2)


def _rand(n: int, seed: int = 0, scale: float = 1.0) -> Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def _adversarial() -> dict[str, Tensor]:
    mixed = _rand(200, 1) * torch.pow(10.0, torch.linspace(-30, 30, 200))
    return {
        "zeros": torch.zeros(100),
        "constant": torch.full((100,), -0.3),
        "huge": _rand(100, 2, 1e30),
        "near-max": torch.tensor([3.4e38, -3.4e38, 1.0, 0.0]),
        "tiny": _rand(100, 3, 1e-30),
        "subnormal": _rand(50, 4, 1e-42),
        "mixed": mixed,
        "length-1": torch.tensor([0.7]),
        "length-1-zero": torch.zeros(1),
        "odd-length": _rand(37, 5),
        "ties": torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 2.0, 2.0, -2.0] * 5),
    }


def _inner(codec: Codec) -> Codec:
    return codec.codec if isinstance(codec, ErrorFeedback) else codec


def check_bound(codec: Codec, x: Tensor, e: Encoded, x_hat: Tensor) -> None:
    """The bound each codec's docstring states, for a fresh codec (zero residual)."""
    c = _inner(codec)
    if isinstance(c, Identity):
        assert torch.equal(x_hat, x)
    elif isinstance(c, Float16):
        xc = x.clamp(-65504, 65504)
        assert bool(((xc - x_hat).abs() <= 2**-11 * xc.abs() + 2**-25).all())
    elif isinstance(c, BFloat16):
        xc = x.clamp(-torch.finfo(torch.bfloat16).max, torch.finfo(torch.bfloat16).max)
        assert bool(((xc - x_hat).abs() <= 2**-8 * xc.abs() + 2**-134).all())
    elif isinstance(c, BlockQuant):
        s = e.tensors["scale"].double()
        n_pad = s.numel() * c.block - x.numel()
        absmax = torch.nn.functional.pad(x.double().abs(), (0, n_pad)).view(-1, c.block).amax(1)
        assert bool((s >= absmax / c.qmax).all()), "scale rounded down"
        assert bool((s <= absmax / c.qmax * (1 + 2**-7) + 1e-40).all()), "scale rounded up too far"
        s_el = s.repeat_interleave(c.block)[: x.numel()]
        err = (x.double() - x_hat.double()).abs()
        slack = 2**-23 * x_hat.double().abs() + 1e-44
        limit = s_el if c.stochastic else s_el / 2
        assert bool((err <= limit + slack).all()), f"max excess {(err - limit).max()}"
    elif isinstance(c, Sign):
        scale = e.tensors["scale"].float().repeat_interleave(c.block)[: x.numel()]
        assert torch.equal(x_hat.abs(), scale)
        assert bool(((x_hat < 0) == (x < 0))[scale > 0].all())
        n_pad = -x.numel() % c.block
        xb = torch.nn.functional.pad(x.double(), (0, n_pad)).view(-1, c.block)
        eb = torch.nn.functional.pad((x - x_hat).double(), (0, n_pad)).view(-1, c.block)
        assert bool((eb.norm(dim=1) <= xb.norm(dim=1) * (1 + 1e-6)).all())
    elif isinstance(c, Int2):
        xb, real = _blocked(x, c.block)
        s = e.tensors["scale"].double()
        rms = ((xb * xb).sum(1) / real).sqrt()
        least = torch.minimum(xb.abs().amax(1) / 1.5, rms)
        assert bool((s >= least).all()), "scale rounded down"
        assert bool((s <= least * (1 + 2**-7) + 1e-40).all()), "scale rounded up too far"
        s_el = s.repeat_interleave(c.block)[: x.numel()]
        xd, hd = x.double(), x_hat.double()
        slack = 2**-23 * hd.abs() + 1e-44
        levels = hd / torch.where(s_el > 0, s_el, 1.0)
        on_grid = ((levels - 0.5) - (levels - 0.5).round()).abs().le(1e-5)
        saturated = hd.abs() == torch.finfo(torch.float32).max  # decode clamps the outer level there
        assert bool((on_grid | saturated | (s_el == 0)).all()), "values are +-0.5 or +-1.5 scales"
        assert bool((hd.abs() <= 1.5 * s_el + slack).all())
        inside = xd.abs() <= (1.5 if c.stochastic else 2.0) * s_el
        limit = s_el if c.stochastic else s_el / 2
        assert bool(((xd - hd).abs() <= limit + slack)[inside].all())
        assert bool(((hd > 0) == (xd > 0))[~inside].all()), "a clipped value keeps its sign"
    elif isinstance(c, Ternary):
        xb, real = _blocked(x, c.block)
        if c.clip > 0:
            bound = ((xb * xb).sum(1) / real).sqrt()[:, None] * c.clip
            xb = torch.maximum(torch.minimum(xb, bound), -bound)
        s = e.tensors["scale"].double()
        top = xb.abs().amax(1)
        assert bool((s >= top.clamp(max=torch.finfo(torch.bfloat16).max)).all()), "scale rounded down"
        assert bool((s <= top * (1 + 2**-7) + 1e-40).all()), "scale rounded up too far"
        s_el = s.repeat_interleave(c.block)[: x.numel()]
        hd = x_hat.double()
        assert bool(((hd == 0) | (hd.abs() == s_el)).all()), "values are 0 or +-scale"
        assert bool(((hd > 0) == (x > 0))[hd != 0].all()), "a kept value keeps its sign"
    elif isinstance(c, DCTTopK):
        # the transform is orthonormal: the error is that of the coefficients, and the dropped
        # coefficients are no larger than the kept ones (fp64 reference, chunk by chunk)
        n_pad = -x.numel() % c.chunk
        d = dct_matrix(c.chunk).double()
        xc = torch.nn.functional.pad(x.double(), (0, n_pad)).view(-1, c.chunk)
        coeffs = xc @ d.T
        got = torch.nn.functional.pad(x_hat.double(), (0, n_pad)).view(-1, c.chunk) @ d.T
        if n_pad:  # decode returns numel values: the padding's coefficients are not comparable there
            return
        big = coeffs.abs().max().clamp(min=1e-300)
        if float(big) > 1e36:
            return  # saturated near fp32's limit (finite, checked by the caller)
        sent = got.abs() > 1e-6 * big
        assert int(sent.sum(1).max()) <= c.k, "at most k coefficients per chunk"
        dropped = torch.where(sent, 0.0, coeffs.abs()).amax(1)
        tol = 2**-6 if c.values == "int2" else 2**-7  # rounding of the kept values
        err = (got - coeffs).norm(dim=1)
        values_bound = coeffs.norm(dim=1) if c.values == "int2" else tol * coeffs.norm(dim=1)
        drop_norm = torch.where(sent, 0.0, coeffs).norm(dim=1)
        assert bool((err <= drop_norm + values_bound + 1e-5 * big).all()), "error beyond the dropped coefficients"
        kept_min = torch.where(sent, coeffs.abs(), torch.inf).amin(1)
        if c.values == "bf16":
            assert bool((dropped <= kept_min * (1 + tol) + 1e-5 * big).all()), "a dropped coefficient is larger"
    elif isinstance(c, TopK):
        kept = x_hat != 0
        assert torch.equal(x_hat[kept], x[kept])
        chunk = c.chunk or x.numel()
        chunk = min(chunk, x.numel())
        k = _count(c.fraction, chunk)
        n_pad = -x.numel() % chunk
        mag = torch.nn.functional.pad(x.abs(), (0, n_pad)).view(-1, chunk)
        sel = torch.zeros(mag.numel(), dtype=torch.bool)
        idx = e.tensors["idx"].long()
        if c.chunk:
            idx = (idx.view(mag.shape[0], -1) + 32768 + torch.arange(mag.shape[0])[:, None] * chunk).view(-1)
        sel[idx] = True
        sel = sel.view(mag.shape)
        assert int(sel.sum()) == k * mag.shape[0], "k distinct positions per chunk"
        low = torch.where(sel, mag, torch.inf).amin(1)
        high = torch.where(sel, -torch.inf, mag).amax(1)
        assert bool((low >= high).all()), "a dropped value is larger than a kept one"
    elif isinstance(c, RandomK):
        mask = torch.zeros(x.numel(), dtype=torch.bool)
        mask[randomk_indices(x.numel(), _count(c.fraction, x.numel()), int(e.tensors["seed"][0]))] = True
        assert torch.equal(x_hat[mask], x[mask]) and bool((x_hat[~mask] == 0).all())
    else:
        raise AssertionError(f"no bound for {c!r}")


def _blocked(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """x in fp64 as [n_blocks, block] (zero-padded) and the count of real values per block."""
    n_pad = -x.numel() % block
    xb = torch.nn.functional.pad(x.double(), (0, n_pad)).view(-1, block)
    real = torch.full((xb.shape[0],), float(block), dtype=torch.float64)
    real[-1] = block - n_pad
    return xb, real


def _roundtrip(codec: Codec, x: Tensor, ctx: Context = CTX) -> tuple[Encoded, Tensor]:
    e = codec.encode(x, ctx)
    x_hat = codec.decode(e)
    assert x_hat.dtype == torch.float32 and x_hat.shape == (x.numel(),)
    assert e.numel == x.numel()
    buf = pack(e)
    assert buf.dtype == torch.uint8 and buf.numel() == e.nbytes
    assert torch.equal(codec.decode(unpack(buf, like=e)), x_hat)
    return e, x_hat


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("case", list(_adversarial()))
def test_adversarial_inputs_stay_within_bounds(name: str, case: str) -> None:
    x = _adversarial()[case]
    codec = CODECS[name]()
    e, x_hat = _roundtrip(codec, x)
    assert bool(torch.isfinite(x_hat).all())
    check_bound(codec, x, e, x_hat)


@pytest.mark.parametrize("name", list(CODECS))
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 600), seed=st.integers(0, 2**16), log_scale=st.integers(-20, 20))
def test_random_inputs_stay_within_bounds(name: str, n: int, seed: int, log_scale: int) -> None:
    x = _rand(n, seed, 10.0**log_scale)
    codec = CODECS[name]()
    e, x_hat = _roundtrip(codec, x, Context(seed=seed, round=n))
    check_bound(codec, x, e, x_hat)
    # The payload's size depends only on the length.
    assert codec.encode(torch.zeros(n), CTX).nbytes == e.nbytes


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_are_refused(name: str, bad: float) -> None:
    codec = CODECS[name]()
    x = _rand(50)
    x[17] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.encode(x, CTX)
    if isinstance(codec, ErrorFeedback):
        assert not codec.residuals, "a refused round must not touch the residual"


@pytest.mark.parametrize("name", list(CODECS))
def test_flags_are_honest(name: str) -> None:
    a, b = _rand(300, 10), _rand(300, 11, 3.0)
    if CODECS[name]().linear:
        # Two workers of one round: payloads summed element by element decode to the sum.
        ca, cb = CODECS[name](), CODECS[name]()
        ea, eb = ca.encode(a, CTX), cb.encode(b, Context(seed=3, round=5, rank=0, part=2))
        summed = Encoded({k: ea.tensors[k] + eb.tensors[k] for k in ea.tensors}, ea.numel)
        torch.testing.assert_close(ca.decode(summed), ca.decode(ea) + cb.decode(eb), rtol=1e-6, atol=1e-6)
    if CODECS[name]().shardable:
        block = CODECS[name]().block
        whole = CODECS[name]()
        e_whole = whole.encode(a, CTX)
        x_hat = whole.decode(e_whole)
        lo, hi = 2 * block, min(300, 9 * block)
        part = CODECS[name]()
        e_part = part.encode(a[lo:hi], CTX)
        if "scale" in e_part.tensors:
            assert torch.equal(e_part.tensors["scale"], e_whole.tensors["scale"][lo // block : -(-hi // block)])
        if getattr(_inner(part), "stochastic", False):
            # Different random streams: the same grid, at most one step apart.
            step = e_part.tensors["scale"].float().repeat_interleave(block)
            assert bool(((part.decode(e_part) - x_hat[lo:hi]).abs() <= step * (1 + 1e-6)).all())
        else:
            assert torch.equal(part.decode(e_part), x_hat[lo:hi])


@pytest.mark.parametrize("name", list(CODECS))
def test_repr_shows_the_settings(name: str) -> None:
    text = repr(CODECS[name]())
    assert "(" in text and "object at" not in text
    if "odd" in name:
        assert "block=" in text


def test_int4_pack_is_exact_for_every_pair() -> None:
    v = torch.arange(-7, 8, dtype=torch.int8)
    lo, hi = torch.meshgrid(v, v, indexing="ij")
    q = torch.stack([lo.reshape(-1), hi.reshape(-1)], dim=1).reshape(-1)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 225
    assert torch.equal(unpack_int4(packed, q.numel()), q)
    # An odd count: the last byte holds one value.
    assert torch.equal(unpack_int4(pack_int4(q[:-1]), q.numel() - 1), q[:-1])


def test_int4_payload_is_half_a_byte_per_value() -> None:
    e = BlockQuant(4, block=128).encode(_rand(1000), CTX)
    assert e.tensors["q"].numel() == 512 and e.tensors["scale"].numel() == 8
    assert e.tensors["scale"].dtype == torch.bfloat16


def test_stochastic_rounding_is_unbiased() -> None:
    x = _rand(64, 7)
    codec = BlockQuant(4, block=64, stochastic=True)
    runs = 400
    mean = sum(codec.decode(codec.encode(x, Context(seed=s))) for s in range(runs)) / runs
    s = float(codec.encode(x, CTX).tensors["scale"].float())
    # Each draw is within one step of x, so the mean's standard error is below s / (2 sqrt(runs)).
    assert float((mean - x).abs().max()) < 5 * s / (2 * math.sqrt(runs))
    # And the streams differ across workers.
    c0, c1 = codec.encode(x, Context(rank=0)), codec.encode(x, Context(rank=1))
    assert not torch.equal(c0.tensors["q"], c1.tensors["q"])


@pytest.mark.parametrize("codec", [Int2(block=64, stochastic=True), Ternary(block=64, clip=0.0)], ids=repr)
def test_two_bit_and_ternary_draws_are_unbiased(codec: Codec) -> None:
    """Stochastic int2 and ternary without clipping: the mean of many draws is x, within a few
    standard errors; the streams differ across workers. Magnitudes in [0.5, 1] keep every value
    within int2's outer levels (1.5 s = the block's largest value when absmax / 1.5 < RMS)."""
    u = torch.rand(64, generator=torch.Generator().manual_seed(7))
    x = torch.where(_rand(64, 8) < 0, -1.0, 1.0) * (0.5 + 0.5 * u)
    runs = 400
    mean = sum(codec.decode(codec.encode(x, Context(seed=s))) for s in range(runs)) / runs
    s = float(codec.encode(x, CTX).tensors["scale"].float())
    assert float((mean - x).abs().max()) < 5 * s / (2 * math.sqrt(runs))
    c0, c1 = codec.encode(x, Context(rank=0)), codec.encode(x, Context(rank=1))
    assert not all(torch.equal(a, b) for a, b in zip(c0.tensors.values(), c1.tensors.values()))


def test_two_bit_and_ternary_payload_sizes() -> None:
    """int2: 2 bits per value; ternary: five values per byte (1.6 bits); each block its own bytes
    and a bf16 scale."""
    n = 128 * 50
    assert Int2(block=128).encode(_rand(n), CTX).nbytes == n // 4 + 2 * 50
    assert Ternary(block=128).encode(_rand(n), CTX).nbytes == 50 * 26 + 2 * 50  # ceil(128 / 5) = 26
    # every code of a byte decodes exactly: all 3^5 ternary bytes, all 4^4 int2 bytes
    t = Ternary(block=5)
    e = Encoded(
        {"scale": torch.ones(243, dtype=torch.bfloat16), "t": torch.arange(243, dtype=torch.uint8)[:, None]}, 1215
    )
    digits = t.decode(e).view(243, 5) + 1
    assert torch.equal((digits * torch.tensor([1, 3, 9, 27, 81])).sum(1), torch.arange(243.0))
    i = Int2(block=4)
    e = Encoded({"scale": torch.ones(256, dtype=torch.bfloat16), "q": torch.arange(256).to(torch.uint8)[:, None]}, 1024)
    codes = i.decode(e).view(256, 4) + 1.5
    assert torch.equal((codes * torch.tensor([1, 4, 16, 64])).sum(1), torch.arange(256.0))


def test_dct_keeps_more_of_a_smooth_vector_than_top_k() -> None:
    """A random walk (neighbours correlated, as in a weight matrix's rows): at the same 1/32 of
    the values, top-k of the DCT coefficients keeps far more of it than top-k of the values; the
    payloads are 3 bytes per kept coefficient (8-bit indices, bf16 values), 1.25 with int2 values
    (and a bf16 scale per chunk); int16 indices past 256."""
    x = _rand(64 * 100, 9).cumsum(0)
    dct, top = DCTTopK(1 / 32, chunk=64), TopK(1 / 32, chunk=64)
    err = {c: float((c.decode(c.encode(x, CTX)) - x).norm() / x.norm()) for c in (dct, top)}
    assert err[dct] < 0.1 < 0.5 < err[top]
    assert dct.encode(x, CTX).nbytes == 100 * 2 * 3
    assert DCTTopK(1 / 32, chunk=64, values="int2").encode(x, CTX).nbytes == 100 * (2 + 1 + 2)
    assert DCTTopK(0.01, chunk=512).encode(x, CTX).tensors["idx"].dtype == torch.int16
    assert torch.equal(dct_matrix(16) @ dct_matrix(16).T, dct_matrix(16) @ dct_matrix(16).T)
    torch.testing.assert_close(dct_matrix(16) @ dct_matrix(16).T, torch.eye(16), rtol=0, atol=1e-6)


def test_stochastic_rounding_at_the_edge_of_the_grid() -> None:
    # x / s == 127 exactly; 127 + u rounds up to 128 in fp32 for u > 1 - 2^-18: with 2^21 values
    # that happens about 8 times, and a missing clamp would wrap 128 to -128 in int8.
    x = torch.full((1 << 21,), 127.0 * 2**-10)
    codec = BlockQuant(8, block=128, stochastic=True)
    assert torch.equal(codec.decode(codec.encode(x, CTX)), x)


def test_randomk_mask_is_shared_by_workers_and_new_each_round() -> None:
    codec = RandomK(0.05)
    x = _rand(2000) + 10.0  # no zeros: a kept value is nonzero

    def mask(ctx: Context) -> Tensor:
        return codec.decode(codec.encode(x, ctx)) != 0

    base = mask(Context(seed=1, round=4, rank=0, part=0))
    assert int(base.sum()) == 100
    assert torch.equal(base, mask(Context(seed=1, round=4, rank=3, part=0)))
    assert not torch.equal(base, mask(Context(seed=1, round=5, rank=0, part=0)))
    assert not torch.equal(base, mask(Context(seed=1, round=4, rank=0, part=1)))
    # Large fractions take the randperm path: still k distinct positions.
    assert int(RandomK(0.9).decode(RandomK(0.9).encode(x, CTX)).ne(0).sum()) == 1800


def test_randomk_decodes_a_sum_over_workers_and_refuses_a_broken_seed() -> None:
    codec = RandomK(0.1)
    e = codec.encode(_rand(100), CTX)
    tripled = Encoded({k: v * 3 for k, v in e.tensors.items()}, e.numel)
    torch.testing.assert_close(codec.decode(tripled), 3 * codec.decode(e))
    broken = Encoded({"seed": e.tensors["seed"] + torch.tensor([1, 1]), "values": e.tensors["values"]}, 100)
    with pytest.raises(ValueError, match="mixed rounds"):
        codec.decode(broken)


def test_topk_counts() -> None:
    assert _count(0.07, 100) == 7
    assert _count(0.01, 50) == 1
    assert _count(1e-9, 10) == 1
    assert _count(1.0, 10) == 10
    e = TopK(0.01, chunk=4096).encode(_rand(10000), CTX)
    assert e.tensors["idx"].dtype == torch.int16 and e.tensors["idx"].numel() == 3 * 41
    assert TopK(0.5).encode(_rand(11), CTX).tensors["idx"].dtype == torch.int32


@pytest.mark.parametrize("inner", ["topk", "topk-chunk", "sign", "int4", "randomk", "int2", "ternary", "dct"])
def test_error_feedback_loses_nothing(inner: str) -> None:
    factory = CODECS[inner]
    codec = ErrorFeedback(factory())
    sums = {0: torch.zeros(257, dtype=torch.float64), 1: torch.zeros(90, dtype=torch.float64)}
    sent = {p: torch.zeros_like(v) for p, v in sums.items()}
    for r in range(12):
        for part, total in sums.items():
            x = _rand(total.numel(), 100 * r + part, 1.0 + r)
            total += x.double()
            sent[part] += codec.decode(codec.encode(x, Context(round=r, part=part))).double()
    for part, total in sums.items():
        got = sent[part] + codec.residuals[part].double()
        assert float((got - total).abs().max()) < 1e-4 * float(total.abs().max())
    state = codec.state_dict()
    assert sorted(state) == ["part0", "part1"]
    fresh = ErrorFeedback(factory())
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.residuals[p], codec.residuals[p]) for p in sums)
    codec.reset()
    assert codec.residuals == {}


def test_dgc_momentum_correction_matches_the_naive_loop() -> None:
    """ErrorFeedback(TopK, momentum=m) is DGC's worker side: u <- m u + g; v <- v + u; send
    top-k(v); clear v and u where sent. 6 rounds against that loop written out, and nothing lost:
    the payloads plus the residual sum to the velocities."""
    m, n = 0.9, 200
    codec = ErrorFeedback(TopK(0.05), momentum=m)
    u, v = torch.zeros(n), torch.zeros(n)
    sent_total, u_total = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for r in range(6):
        g = _rand(n, 40 + r)
        got = codec.decode(codec.encode(g, Context(round=r)))
        u = m * u + g
        v = v + u
        k = math.ceil(0.05 * n)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[v.abs().topk(k).indices] = True
        expected = torch.where(mask, v, 0.0)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        u_total += u.double()
        sent_total += got.double()
        v, u = torch.where(mask, 0.0, v), torch.where(mask, 0.0, u)
    torch.testing.assert_close(sent_total + codec.residuals[0].double(), u_total, rtol=1e-5, atol=1e-5)
    twin = ErrorFeedback(TopK(0.05), momentum=m)
    twin.load_state_dict(codec.state_dict())
    assert sorted(codec.state_dict()) == ["part0", "velocity0"]
    assert torch.equal(twin.velocities[0], codec.velocities[0]) and torch.equal(twin.residuals[0], codec.residuals[0])


@pytest.mark.parametrize("inner", ["identity", "topk", "int2"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_error_feedback_never_writes_what_it_does_not_own(inner: str, momentum: float) -> None:
    """Residuals and velocities are updated in place only in tensors of the encode's own: the
    caller's input, the payload (the fp32 identity's payload is the input itself), and the
    residuals and velocities a `memory` snapshot holds for a rollback stay as they were; the
    results are those of the update written out on copies, a rollback included."""
    codec = ErrorFeedback(CODECS[inner](), momentum=momentum)
    plain = CODECS[inner]()
    r_ref: Tensor | None = None
    u_ref: Tensor | None = None
    for r in range(5):
        x = _rand(300, 70 + r)
        x_before = x.clone()
        snapshot = codec.memory()
        saved = [{p: t.clone() for p, t in d.items()} for d in snapshot]
        e = codec.encode(x, Context(round=r))
        payload = {k: t.clone() for k, t in e.tensors.items()}
        # the update on copies: u <- m u + x; y = r + u; r <- y - sent; u <- 0 where sent
        flat = x.clone() if u_ref is None or not momentum else torch.add(x, u_ref, alpha=momentum)
        y = flat + r_ref if r_ref is not None else flat.clone()
        ref = plain.encode(y.clone(), Context(round=r))
        sent = plain.decode(ref).clone()
        assert torch.equal(x, x_before), "the caller's input was written"
        assert all(torch.equal(payload[k], e.tensors[k]) for k in payload), "the payload was written"
        for d, before in zip(snapshot, saved):
            assert all(torch.equal(d[p], before[p]) for p in before), "a rollback snapshot was written"
        assert all(torch.equal(e.tensors[k], ref.tensors[k]) for k in payload)
        r_ref, u_ref = y - sent, torch.where(sent != 0, 0.0, flat)
        assert torch.equal(codec.residuals[0], r_ref)
        if momentum:
            assert torch.equal(codec.velocities[0], u_ref)
        if r == 2:  # a failed round: roll back; the next encode starts from the snapshot
            codec.restore(snapshot)
            r_ref = saved[0].get(0)
            u_ref = saved[1].get(0)


def test_a_velocity_without_a_residual_leaves_the_identity_payload_alone() -> None:
    """A state with a velocity and no residual (loaded so): the fp32 identity's payload is the
    new velocity itself, so the velocity's masking must not happen in place."""
    codec = ErrorFeedback(Identity(), momentum=0.5)
    codec.velocities = {0: torch.ones(10)}
    x = torch.arange(10.0)
    e = codec.encode(x, Context(part=0))
    assert torch.equal(e.tensors["values"], x + 0.5)
    assert torch.equal(codec.velocities[0], torch.zeros(10)) and torch.equal(codec.residuals[0], torch.zeros(10))


def test_dgc_sparsity_warm_up() -> None:
    """warmup_rounds = 4 and fraction 1%: the density is 25%, 6.25%, 1.5625%, then 1% (0.39% is
    below the target), whatever the round's workers; each round's payload has one size."""
    codec = TopK(0.01, warmup_rounds=4)
    assert [codec.fraction_at(r) for r in range(6)] == [0.25, 0.0625, 0.015625, 0.01, 0.01, 0.01]
    sizes = [codec.encode(_rand(1000), Context(round=r)).tensors["values"].numel() for r in range(5)]
    assert sizes == [250, 63, 16, 10, 10]


def test_error_feedback_keeps_the_wrapped_flags() -> None:
    for make in (lambda: RandomK(0.1), lambda: BlockQuant(8, block=64), lambda: Sign(32)):
        inner = make()
        ef = ErrorFeedback(inner)
        assert (ef.linear, ef.shardable, ef.block) == (inner.linear, inner.shardable, inner.block)
    ef = ErrorFeedback(TopK(0.5))
    ef.encode(_rand(10), CTX)
    with pytest.raises(ValueError, match="residual"):
        ef.encode(_rand(11), CTX)


# ---------------------------------------------------------------- PowerSGD


def test_powersgd_plan_and_payload_sizes() -> None:
    ps = PowerSGD(rank=4, min_compression=2.0)
    shapes = [torch.Size([64, 64]), torch.Size([64]), torch.Size([8, 8]), torch.Size([32, 4, 4]), torch.Size([3, 1000])]
    # 64x64: (128) * 4 * 2 = 1024 < 4096 yes; vector no; 8x8: 16*4*2 = 128 > 64 no;
    # 32x16: 48*4*2 = 384 < 512 yes; 3x1000: r = 3, 1003*3*2 = 6018 > 3000 no.
    assert ps.plan(shapes) == [True, False, False, True, False]
    assert ps.payload_floats(shapes) == (64 * 4 + 32 * 4 + 64 + 64 + 3000, 64 * 4 + 16 * 4)
    tensors = [_rand(math.prod(s), i).view(s) for i, s in enumerate(shapes)]
    p = ps.first_pass(tensors, CTX)
    q = ps.second_pass(tensors, p)
    assert (p.numel(), q.numel()) == ps.payload_floats(shapes)
    out = ps.decode(p, q, 1.0, shapes)
    assert [o.shape for o in out] == shapes
    for t, o, f in zip(tensors, out, ps.plan(shapes)):
        if not f:
            assert torch.equal(t, o)


def test_powersgd_recovers_a_low_rank_mean() -> None:
    ps = PowerSGD(rank=3)
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(40, 3, generator=g), torch.randn(3, 6, 5, generator=g)
    workers = [torch.einsum("nr,rab->nab", u, v * (w + 1)) for w in range(3)]  # same column space
    p_sum = sum(ps.first_pass([m], CTX) for m in workers)
    q_sum = sum(ps.second_pass([m], p_sum) for m in workers)
    (mean_hat,) = ps.decode(p_sum, q_sum, 3.0, [workers[0].shape])
    mean = sum(workers) / 3
    torch.testing.assert_close(mean_hat, mean, rtol=1e-4, atol=1e-4 * float(mean.abs().max()))
    # A tiny input (pseudo-gradients are small): no eps, so the result does not lose scale.
    small = [m * 1e-12 for m in workers[:1]]
    p = ps.first_pass(small, CTX)
    (hat,) = ps.decode(p, ps.second_pass(small, p), 1.0, [small[0].shape])
    torch.testing.assert_close(hat, small[0], rtol=1e-4, atol=1e-4 * float(small[0].abs().max()))


def test_powersgd_is_identical_across_workers_and_new_each_round() -> None:
    ps = PowerSGD(rank=2)
    m = _rand(30 * 20).view(30, 20)
    a = ps.first_pass([m], Context(seed=1, round=2, rank=0))
    b = ps.first_pass([m], Context(seed=1, round=2, rank=5))
    assert torch.equal(a, b)
    assert not torch.equal(a, ps.first_pass([m], Context(seed=1, round=3, rank=0)))
    q = ps.initial_q(20, 2, CTX, 0)
    torch.testing.assert_close(q.T @ q, torch.eye(2), rtol=0, atol=1e-5)
    assert torch.equal(ps.second_pass([m], a), ps.second_pass([m], a.clone()))
    # Linear in the inputs given the shared Q: the sum of first passes is the first pass of the sum.
    m2 = _rand(600, 9).view(30, 20)
    torch.testing.assert_close(ps.first_pass([m + m2], CTX), ps.first_pass([m], CTX) + ps.first_pass([m2], CTX))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ps.first_pass([m.clone().fill_(math.nan)], CTX)


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation() -> None:
    """The same matrix every round: from a fresh Q each round the rank-2 error stays where one power
    step leaves it; from the kept Q (orthonormalised Q'_sum) the rounds are a power iteration and
    the error reaches the best rank-2 approximation's (the SVD's) within 1%. The kept Q round-trips
    through state_dict, and a Q with a zero column is replaced by a fresh one."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 8, generator=g))
    v, _ = torch.linalg.qr(torch.randn(48, 8, generator=g))
    m = u @ torch.diag(torch.tensor([8.0, 6.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1])) @ v.T
    best = float(torch.linalg.svdvals(m)[2:].norm() / m.norm())
    errors = {}
    for warm in (False, True):
        ps = PowerSGD(rank=2, warm_start=warm)
        for r in range(12):
            ctx = Context(seed=1, round=r)
            p = ps.first_pass([m], ctx)
            q = ps.second_pass([m], p)
            (hat,) = ps.decode(p, q, 1.0, [m.shape])
            ps.keep(q, [m.shape])
        errors[warm] = float((hat - m).norm() / m.norm())
    assert errors[True] < 1.01 * best < errors[False]
    twin = PowerSGD(rank=2, warm_start=True)
    twin.load_state_dict(ps.state_dict())
    assert torch.equal(twin.initial_q(48, 2, CTX, 0), ps.initial_q(48, 2, CTX, 0))
    twin.warm = {0: torch.zeros(48, 2)}
    assert torch.equal(twin.initial_q(48, 2, CTX, 0), PowerSGD(rank=2).initial_q(48, 2, CTX, 0))


def test_powersgd_handles_zero_matrices() -> None:
    ps = PowerSGD(rank=2)
    z = torch.zeros(16, 16)
    p = ps.first_pass([z], CTX)
    (hat,) = ps.decode(p, ps.second_pass([z], p), 2.0, [z.shape])
    assert torch.equal(hat, z)


# ---------------------------------------------------------------- build_codec


def _spec(kind: str, **kw: object) -> SimpleNamespace:
    base = dict(
        block=64,
        stochastic=False,
        clip=2.5,
        fraction=0.05,
        chunk=0,
        values="bf16",
        momentum=0.0,
        warmup_rounds=0,
        rank=2,
        min_compression=2.0,
        warm_start=True,
        error_feedback=None,
    )
    base.update(kw)
    ns = SimpleNamespace(kind=kind, **base)
    default = CodecSpec(kind=kind).feedback if kind in get_args(CodecKind) else False  # the config's default
    ns.feedback = ns.error_feedback if ns.error_feedback is not None else default
    return ns


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("none", "Identity()"),
        ("fp16", "Float16()"),
        ("bf16", "BFloat16()"),
        ("int8", "BlockQuant(bits=8, block=64, stochastic=False)"),
        ("int4", "BlockQuant(bits=4, block=64, stochastic=False)"),
        ("topk", "ErrorFeedback(TopK(fraction=0.05, chunk=0))"),
        ("randomk", "ErrorFeedback(RandomK(fraction=0.05))"),
        ("sign", "ErrorFeedback(Sign(block=64))"),
        ("int2", "ErrorFeedback(Int2(block=64, stochastic=False))"),
        ("ternary", "Ternary(block=64, clip=2.5)"),
        ("dct", "ErrorFeedback(DCTTopK(fraction=0.05, chunk=64, values='bf16'))"),
        ("powersgd", "PowerSGD(rank=2, min_compression=2.0, warm_start=True)"),
    ],
)
def test_build_codec(kind: str, expected: str) -> None:
    assert repr(build_codec(_spec(kind))) == expected


def test_build_codec_overrides_feedback_and_reads_the_real_spec() -> None:
    assert repr(build_codec(_spec("int8", error_feedback=True, stochastic=True))).startswith("ErrorFeedback(BlockQuant")
    assert repr(build_codec(_spec("topk", error_feedback=False, chunk=128))) == "TopK(fraction=0.05, chunk=128)"
    with pytest.raises(ValueError, match="unknown codec"):
        build_codec(_spec("zip"))
    config = pytest.importorskip("dilo.config")
    codec = build_codec(config.CodecSpec(kind="int4", block=32))
    assert repr(codec) == "BlockQuant(bits=4, block=32, stochastic=False)"


def test_the_dct_chunk_is_validated() -> None:
    config = pytest.importorskip("dilo.config")
    with pytest.raises(ValueError, match="momentum correction"):
        config.CodecSpec(kind="int8", momentum=0.9)
    with pytest.raises(ValueError, match="sparsity warm-up"):
        config.CodecSpec(kind="dct", warmup_rounds=3)
    assert "momentum=0.9" in repr(build_codec(config.CodecSpec(kind="topk", momentum=0.9, warmup_rounds=2)))
    with pytest.raises(ValueError, match="2 to 4096"):
        config.CodecSpec(kind="dct", chunk=8192)
    assert repr(build_codec(config.CodecSpec(kind="dct", fraction=0.03, values="int2"))) == (
        "ErrorFeedback(DCTTopK(fraction=0.03, chunk=64, values='int2'))"
    )
