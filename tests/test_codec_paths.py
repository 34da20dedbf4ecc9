"""The codecs' fast paths against plain references: the stochastic codecs' random lanes are
uniform 16-bit integers, a pure function of the seed; the low-bit codecs' packed bytes are the
documented wire format, digit by digit; DCT top-k's slab-by-slab selection keeps the
coefficients a whole-tensor topk keeps, and its decode is the inverse transform."""

from __future__ import annotations

import math

import pytest
import torch

from dilo.compress import Context, DCTTopK, Int2, Ternary
from dilo.compress.dct import dct_matrix
from dilo.compress.dither import LANE_MEAN, LANE_STEP, Dither, device_lanes
from dilo.compress.lowbit import _Packer


@pytest.mark.parametrize("source", ["numpy", "torch"])
def test_lanes_are_uniform_16_bit_integers(source: str) -> None:
    n = 1 << 20
    if source == "numpy":
        r = Dither(3, torch.device("cpu")).lanes(n)
    else:  # the accelerator's path, run on the CPU's generator
        r = device_lanes(n, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert r.dtype == torch.int16 and r.shape == (n,)
    assert int(r.min()) == -32768 and int(r.max()) == 32767
    # every 8-bit slice of a lane is uniform: chi-square over 256 bins, 255 degrees of freedom
    lanes = r.int() + 32768
    for shift in (0, 8):
        counts = torch.bincount((lanes >> shift) & 255, minlength=256).double()
        chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
        assert chi2 < 255 + 6 * math.sqrt(2 * 255), (shift, chi2)
    # u = r * LANE_STEP + LANE_MEAN is in (0, 1) with mean 1/2
    u = r.double() * LANE_STEP + LANE_MEAN
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert float(u.min()) == 2**-17 and float(u.max()) == 1 - 2**-17


def test_lanes_are_a_pure_function_of_the_seed() -> None:
    cpu = torch.device("cpu")
    a, b = Dither(7, cpu), Dither(7, cpu)
    first = a.lanes(1000)
    assert torch.equal(first, b.lanes(1000))
    assert not torch.equal(first, a.lanes(1000)), "a second draw continues the stream"
    assert not torch.equal(first, Dither(8, cpu).lanes(1000))
    assert Dither(7, cpu).lanes(0).numel() == 0
    # the codecs draw from ctx.worker_seed(): the same context, the same payload
    x = torch.randn(5000)
    for codec in (Int2(block=64, stochastic=True), Ternary(block=64)):
        one, two = codec.encode(x, Context(seed=1, round=2, rank=3)), codec.encode(x, Context(seed=1, round=2, rank=3))
        assert all(torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)


def _reference_pack(codes: torch.Tensor, per_byte: int, radix: int) -> torch.Tensor:
    """Byte i of a row holds codes per_byte * i + j times radix^j, the row padded with zeros."""
    rows, block = codes.shape
    nbytes = -(-block // per_byte)
    out = torch.zeros(rows, nbytes, dtype=torch.uint8)
    for r in range(rows):
        for i in range(nbytes):
            value = 0
            for j in range(per_byte):
                k = per_byte * i + j
                value += int(codes[r, k]) * radix**j if k < block else 0
            out[r, i] = value
    return out


@pytest.mark.parametrize(("per_byte", "radix"), [(4, 4), (5, 3)])
@pytest.mark.parametrize("block", [1, 5, 7, 16, 130])
def test_packer_matches_a_digit_by_digit_reference(per_byte: int, radix: int, block: int) -> None:
    g = torch.Generator().manual_seed(block)
    codes = torch.randint(0, radix, (9, block), generator=g).float()
    packer = _Packer(block, per_byte, radix, rows=4, device=torch.device("cpu"))
    out = torch.empty(9, packer.nbytes, dtype=torch.uint8)
    for lo in range(0, 9, 4):  # slabs of up to 4 rows, as the codecs use it; the last is short
        hi = min(lo + 4, 9)
        packer.codes(hi - lo).copy_(codes[lo:hi])
        packer.pack_into(out[lo:hi])
    assert torch.equal(out, _reference_pack(codes, per_byte, radix))


@pytest.mark.parametrize(
    "codec", [Int2(block=7), Int2(block=128, stochastic=True), Ternary(block=9), Ternary(block=128)], ids=repr
)
def test_payload_bytes_are_the_documented_wire_format(codec: Int2 | Ternary) -> None:
    """Each value's code read back from the decoded value (int2: x_hat / s + 3/2; ternary:
    x_hat / s + 1), packed digit by digit, is the payload."""
    x = torch.randn(codec.block * 37 + 3, generator=torch.Generator().manual_seed(11))
    e = codec.encode(x, Context(seed=5))
    scale = e.tensors["scale"].float()
    n_pad = scale.numel() * codec.block - x.numel()
    x_hat = torch.nn.functional.pad(codec.decode(e), (0, n_pad)).view(-1, codec.block)
    offset, per_byte, radix, name = (1.5, 4, 4, "q") if isinstance(codec, Int2) else (1.0, 5, 3, "t")
    codes = (x_hat / scale[:, None] + offset).round()
    # the padding of the last block is not a value: take its codes from the payload's own bytes
    ref = _reference_pack(codes, per_byte, radix)
    got = e.tensors[name]
    assert torch.equal(got[:-1], ref[:-1])
    real = (codec.block - n_pad) if n_pad else codec.block
    digits = [(int(b) // radix**j) % radix for b in got[-1] for j in range(per_byte)][:real]
    assert digits == [int(c) for c in codes[-1, :real]]


def _dct_reference(codec: DCTTopK, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every chunk's coefficients (fp64) and its k largest magnitudes, sorted, by one topk."""
    pad = -x.numel() % codec.chunk
    xc = torch.nn.functional.pad(x.double(), (0, pad)).view(-1, codec.chunk)
    coeffs = xc @ dct_matrix(codec.chunk).double().T
    return coeffs, coeffs.abs().topk(codec.k, dim=1).values


@pytest.mark.parametrize(
    ("fraction", "chunk"),
    [(0.03, 64), (0.2, 64), (0.027, 256), (0.05, 256), (0.01, 1024), (1.0, 8)],
    ids=["k2-passes", "k13-topk", "k7-passes", "k13-topk-256", "k11-topk-1024", "all"],
)
def test_dct_selection_and_inverse_match_a_whole_tensor_reference(fraction: float, chunk: int) -> None:
    codec = DCTTopK(fraction, chunk=chunk)
    g = torch.Generator().manual_seed(chunk)
    # more than one slab of chunks, a short last chunk, and chunks of ties (all zero, constant)
    x = torch.randn(chunk * 5000 + chunk // 2, generator=g)
    x[: 3 * chunk] = 0.0
    x[3 * chunk : 4 * chunk] = 2.0
    e = codec.encode(x, Context())
    coeffs, top = _dct_reference(codec, x)
    idx = e.tensors["idx"].long() + (32768 if chunk > 256 else 0)
    assert bool((idx.sort(dim=1).values.diff(dim=1) > 0).all()), "a coefficient kept twice"
    kept = coeffs.gather(1, idx)
    torch.testing.assert_close(kept.abs().sort(dim=1, descending=True).values, top, rtol=0, atol=1e-5)
    torch.testing.assert_close(e.tensors["values"].double(), kept, rtol=2**-8, atol=1e-5)
    # decode: the inverse transform of the kept (bf16) coefficients
    sparse = torch.zeros_like(coeffs).scatter_(1, idx, e.tensors["values"].double())
    ref = (sparse @ dct_matrix(chunk).double()).view(-1)[: x.numel()]
    torch.testing.assert_close(codec.decode(e).double(), ref, rtol=0, atol=1e-5)
