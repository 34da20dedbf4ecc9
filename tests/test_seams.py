"""Small contracts behind the seams: the tensor digest reads memory in place, outer.conservative
blends the own model into the variance-corrected merge, the strategy factory refuses what a world
cannot serve."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
import xxhash

from dilo.errors import ConfigError
from dilo.outer import mixing
from dilo.outer.base import Links, tensor_digest
from dilo.outer.build import build_strategy
from dilo.outer.gossip import conservative_weights
from dilo.transport.base import ByteCounter
from tests.conftest import tiny_config


def _reference_digest(tensors: list[torch.Tensor]) -> str:
    """XXH3-64 of all the tensors' bytes joined, copied the plain way."""
    joined = b"".join(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)
    return xxhash.xxh3_64_hexdigest(joined)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_all_finite_agrees_with_isfinite(bad: float | None) -> None:
    from dilo.outer.base import all_finite

    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(5, 7, generator=g), torch.zeros(0), torch.randn(11, generator=g).to(torch.bfloat16)]
    tensors.append(torch.full((3,), 3e38))  # finite values near the fp32 limit are finite
    if bad is not None:
        tensors[2][4] = bad
    assert all_finite(tensors) == all(bool(torch.isfinite(t).all()) for t in tensors) == (bad is None)
    assert all_finite([]) and all_finite([torch.zeros(0)])


def test_tensor_digest_matches_the_bytes_and_copies_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g).to(torch.bfloat16), torch.tensor(2.5)]
    tensors.append(torch.randn(4, 6, generator=g).t())  # not contiguous: hashed in row-major order
    assert tensor_digest(tensors) == _reference_digest(tensors)
    big = torch.randn(8 * 2**20, generator=g)  # 32 MB
    tracemalloc.start()
    try:
        tensor_digest([big])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"hashing 32 MB allocated {peak / 2**20:.1f} MB"


def test_conservative_blend_equals_the_merge_with_the_own_model_weighted_in() -> None:
    """Two workers, equal weights, conservative c: the gossip merge with the re-weighted weights is
    the reference variance-corrected merge with own=0 and the same c."""
    g = torch.Generator().manual_seed(1)
    own = [torch.randn(16, 8, generator=g), torch.randn(8, generator=g)]
    peer = [torch.randn(16, 8, generator=g) * 2 + 1, torch.randn(8, generator=g)]
    names = ["h.0.w", "h.0.b"]
    for c in (0.0, 0.3, 0.9):
        w = conservative_weights({"me": 0.5, "you": 0.5}, {"you"}, "me", c)
        got = mixing.weighted_variance_corrected(own, {"you": peer}, w, "me", names, eps=1e-12)
        want = mixing.variance_corrected_merge([own, peer], names, own=0, conservative=c, eps=1e-12)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a peer that did not arrive carries no weight
    assert conservative_weights({"me": 1 / 3, "a": 1 / 3, "b": 1 / 3}, {"a"}, "me", 0.5) == pytest.approx(
        {"me": 0.75, "a": 0.25}
    )


def test_the_factory_refuses_what_the_links_cannot_serve(tmp_path, corpus_dir) -> None:  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(4, 4)
    ddp = tiny_config(tmp_path, corpus_dir, outer={"kind": "ddp"})
    with pytest.raises(ConfigError, match="ddp.*static"):
        build_strategy(ddp, model, Links(counter=ByteCounter()))
    gossip = tiny_config(tmp_path, corpus_dir, outer={"kind": "gossip", "inner_steps": 4})
    with pytest.raises(ConfigError, match="gossip world"):
        build_strategy(gossip, model, Links(counter=ByteCounter()))
