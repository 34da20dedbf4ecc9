"""Gossip averaging math: mixing graphs, Metropolis-Hastings weights, push-sum, variance correction.

Pure functions on tensors, no I/O (docs/ALGORITHMS.md section 4). Workers are string ids; a round's graph
is built over the sorted ids, so every worker derives the same weights from (kind, members, round,
seed) without talking:

    w = graph("one_peer_exponential", view.peers, round_idx)
    for peer in out_peers(w, me):
        transport.send(peer, encode(params))
    received = gather(in_peers(w, me), timeout_s)      # {peer: tensors}; late peers are simply absent
    params = mix(params, received, w[me], me)           # absent peers dropped, weights renormalised

Convention: `w[i][j]` is the weight node i gives to j's model, i.e. i RECEIVES from j. Rows sum to 1,
and for every kind in TOPOLOGIES the columns do too (doubly stochastic), so repeated mixing keeps the
mean and converges to it. Directed or asynchronous exchanges without agreed weights use `PushSum`,
which only needs each sender to conserve the mass it sends.
"""

from __future__ import annotations

import math
import random
from typing import TypedDict

import torch
from torch import Tensor

TOPOLOGIES = ("ring", "exponential", "one_peer_exponential", "random_pairs", "random_graph", "fully_connected")

# buffers that are statistics of the data, not weights: averaged, never rescaled
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")

Weights = dict[str, dict[str, float]]


# ---------------------------------------------------------------------------------------------
# graphs


def graph(kind: str, members: list[str], round_idx: int, seed: int = 0) -> Weights:
    """Mixing weights {node: {peer: weight}} (self included) of round `round_idx`.

    Node i is the position of its id in sorted(members); peers are chosen by index arithmetic mod n.
    - ring: receive from i-1 and i+1, 1/3 each and 1/3 self (n=2: 1/2 self, 1/2 the other).
    - exponential (Exponential-2): receive from (i - 2^j) mod n for every 2^j < n, i.e. the sender
      sends to (i + 2^j) mod n; uniform weights over those peers and self. Circulant, so doubly stochastic.
    - one_peer_exponential: receive from (i - 2^(round mod L)) mod n with L = floor(log2(n-1)) + 1,
      1/2 self and 1/2 peer; every L rounds the product of the mixing matrices is exact averaging
      when n is a power of two.
    - random_pairs: a perfect matching drawn from random.Random(f"{seed}:{round_idx}"), 1/2 each; with
      odd n one random node sits out with weight 1.
    - random_graph: every node links to one peer drawn from random.Random(f"{seed}:{round_idx}:{i}"),
      links made undirected; degrees differ, so weights are Metropolis-Hastings (symmetric, doubly
      stochastic).
    - fully_connected: 1/n everywhere.
    """
    if kind not in TOPOLOGIES:
        raise ValueError(f"unknown topology {kind!r}; choose one of {', '.join(TOPOLOGIES)}")
    ids = sorted(members)
    if not ids:
        raise ValueError("a mixing graph needs at least one member")
    dupes = sorted({m for m in ids if ids.count(m) > 1})
    if dupes:
        raise ValueError(f"member ids must be unique; repeated: {dupes}")
    n = len(ids)
    if n == 1:
        return {ids[0]: {ids[0]: 1.0}}
    if kind == "fully_connected":
        return {a: {b: 1.0 / n for b in ids} for a in ids}
    if kind == "random_pairs":
        return _random_pairs(ids, round_idx, seed)
    if kind == "random_graph":
        adjacency: dict[str, set[str]] = {m: set() for m in ids}
        for i, me in enumerate(ids):
            j = random.Random(f"{seed}:{round_idx}:{i}").randrange(n - 1)
            peer = ids[j if j < i else j + 1]  # anyone but itself
            adjacency[me].add(peer)
            adjacency[peer].add(me)
        return metropolis_hastings(adjacency)
    num_hops = (n - 1).bit_length()  # number of j with 2^j < n, i.e. floor(log2(n-1)) + 1
    if kind == "ring":
        offsets = [-1, 1]
    elif kind == "exponential":
        offsets = [-(1 << j) for j in range(num_hops)]
    else:
        offsets = [-(1 << (round_idx % num_hops))]
    return _circulant(ids, offsets)


def _circulant(ids: list[str], offsets: list[int]) -> Weights:
    # the same offset set in every row keeps the matrix circulant (doubly stochastic) even after
    # deduplication, e.g. ring with n=2 where +1 and -1 name the same peer
    n = len(ids)
    w: Weights = {}
    for i, me in enumerate(ids):
        peers = sorted({i} | {(i + o) % n for o in offsets})
        w[me] = {ids[j]: 1.0 / len(peers) for j in peers}
    return w


def _random_pairs(ids: list[str], round_idx: int, seed: int) -> Weights:
    # a str seed is hashed with SHA-512 by random.Random, so every process draws the same matching
    order = list(ids)
    random.Random(f"{seed}:{round_idx}").shuffle(order)
    w: Weights = {}
    for a, b in zip(order[0::2], order[1::2]):
        w[a] = dict(sorted({a: 0.5, b: 0.5}.items()))
        w[b] = dict(sorted({a: 0.5, b: 0.5}.items()))
    if len(order) % 2:
        w[order[-1]] = {order[-1]: 1.0}
    return {m: w[m] for m in ids}


def metropolis_hastings(adjacency: dict[str, set[str]]) -> Weights:
    """Symmetric doubly stochastic weights for an undirected graph given as neighbour sets.

    w_ij = 1 / max(d_i, d_j) with degrees counting self (d = len(neighbours) + 1), w_ii = 1 - sum_j w_ij.
    """
    for node, nbrs in adjacency.items():
        if node in nbrs:
            raise ValueError(f"adjacency lists {node!r} as its own neighbour; give neighbours without self loops")
        for peer in nbrs:
            if node not in adjacency.get(peer, set()):
                raise ValueError(
                    f"adjacency is not symmetric: {node!r} lists {peer!r} but {peer!r} does not list {node!r}"
                )
    degree = {node: len(nbrs) + 1 for node, nbrs in adjacency.items()}
    w: Weights = {}
    for node in sorted(adjacency):
        row = {peer: 1.0 / max(degree[node], degree[peer]) for peer in adjacency[node]}
        row[node] = 1.0 - sum(row.values())
        w[node] = dict(sorted(row.items()))
    return w


def out_peers(w: Weights, node: str) -> list[str]:
    """Nodes that receive from `node` (non-zero entries of its column), sorted, without itself."""
    return sorted(peer for peer, row in w.items() if peer != node and row.get(node, 0.0) > 0.0)


def in_peers(w: Weights, node: str) -> list[str]:
    """Nodes `node` receives from (non-zero entries of its row), sorted, without itself."""
    return sorted(peer for peer, weight in w[node].items() if peer != node and weight > 0.0)


def to_matrix(w: Weights, members: list[str]) -> Tensor:
    """W as a float64 [n, n] matrix in the order of `members`; row i holds node i's weights."""
    index = {m: i for i, m in enumerate(members)}
    out = torch.zeros(len(members), len(members), dtype=torch.float64)
    for node, row in w.items():
        for peer, weight in row.items():
            out[index[node], index[peer]] = weight
    return out


# ---------------------------------------------------------------------------------------------
# mixing


def _present_weights(
    received: dict[str, list[Tensor]], weights: dict[str, float], self_id: str
) -> list[tuple[str, float]]:
    """Weights of self and the peers that arrived, renormalised to sum 1, in sorted id order."""
    negative = sorted(peer for peer, weight in weights.items() if weight < 0)
    if negative:
        raise ValueError(f"mixing weights must be non-negative; negative for {negative}")
    present = [(p, wt) for p, wt in sorted(weights.items()) if wt > 0 and (p == self_id or p in received)]
    total = sum(wt for _, wt in present)
    if total <= 0:
        return [(self_id, 1.0)]  # nobody with weight arrived: keep our own model
    return [(p, wt / total) for p, wt in present]


def _check_layout(own: list[Tensor], received: dict[str, list[Tensor]]) -> None:
    for peer, tensors in received.items():
        if len(tensors) != len(own):
            raise ValueError(f"peer {peer!r} sent {len(tensors)} tensors, expected {len(own)}")
        for i, (a, b) in enumerate(zip(own, tensors)):
            if a.shape != b.shape:
                raise ValueError(f"peer {peer!r} sent tensor {i} of shape {tuple(b.shape)}, expected {tuple(a.shape)}")


def farthest(own: list[Tensor], received: dict[str, list[Tensor]], count: int) -> list[str]:
    """The `count` received peers whose parameters are farthest (Euclidean, float64) from `own`,
    farthest first (ties by id): what robust mixing (outer.nearest) leaves out."""
    _check_layout(own, received)
    dist = {
        peer: math.sqrt(sum(float(torch.sum((a.double() - b.double()) ** 2)) for a, b in zip(own, xs)))
        for peer, xs in received.items()
    }
    return sorted(dist, key=lambda p: (-dist[p], p))[: max(0, count)]


def mix(own: list[Tensor], received: dict[str, list[Tensor]], weights: dict[str, float], self_id: str) -> list[Tensor]:
    """sum_j w_j x_j over self and the received peers, accumulated in fp32 in sorted id order.

    Peers in `weights` missing from `received` (timed out) are dropped and the remaining weights,
    self included, renormalised to sum 1; received peers without a weight are ignored. Returns new
    tensors in the dtype of `own`.
    """
    _check_layout(own, received)
    present = _present_weights(received, weights, self_id)
    out = []
    for i, x in enumerate(own):
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for peer, weight in present:
            src = own[i] if peer == self_id else received[peer][i]
            acc.add_(src.to(device=x.device, dtype=torch.float32), alpha=weight)
        out.append(acc.to(x.dtype))
    return out


class PushSumState(TypedDict):
    """PushSum.state_dict(): the share x (fp32 tensors) and its weight w."""

    x: list[Tensor]
    weight: float


class PushSum:
    """Push-sum state for directed, time-varying or asynchronous graphs (docs/ALGORITHMS.md 4.3).

    Holds the biased numerator x (fp32 tensors) and the scalar weight w; the model is z = x / w.
    Each round a node keeps a = 1/(k+1) of (x, w) and sends the same share to each of its k out-peers;
    it then adds what it received. Only the senders must conserve mass, so no in-degree agreement is
    needed. x and w must travel in one message: losing one without the other breaks the ratio.

    With local training between gossip rounds, train z and fold the result back before sharing, so
    that training moves the model and push-sum only moves mass:

        ps = PushSum(params_of_model)
        for round_idx in range(rounds):
            load_into_model(ps.debiased()); train_locally(model)   # z -> z_new
            ps.reset(params_of_model)                              # x = z_new * w
            part = ps.share(peers)                                 # send `part` to every peer
            ps.absorb(parts_received)

    A joiner gets mass from a neighbour: the neighbour calls split_for_joiner() and the joiner builds
    its state with PushSum.from_mass(x, w).
    """

    def __init__(self, params: list[Tensor], weight: float = 1.0) -> None:
        if not weight > 0:
            raise ValueError(f"push-sum weight must be positive, got {weight}")
        self.weight = float(weight)
        self.x = [p.detach().to(torch.float32) * self.weight for p in params]

    @classmethod
    def from_mass(cls, x: list[Tensor], weight: float) -> PushSum:
        """State from a received (x, w) pair, e.g. the half a neighbour split off for a joiner."""
        ps = cls([], weight)
        ps.x = [t.detach().to(torch.float32).clone() for t in x]
        return ps

    def share(self, peers: list[str]) -> tuple[list[Tensor], float]:
        """The (x, w) share sent to EACH of `peers`; the same share is kept, so mass is conserved."""
        a = 1.0 / (len(peers) + 1)
        self.x = [t * a for t in self.x]
        self.weight *= a
        return [t.clone() for t in self.x], self.weight

    def absorb(self, parts: list[tuple[list[Tensor], float]]) -> None:
        """Add received (x, w) shares to the kept share, in the given order."""
        for x, weight in parts:
            if len(x) != len(self.x):
                raise ValueError(f"push-sum share has {len(x)} tensors, expected {len(self.x)}")
            for mine, theirs in zip(self.x, x):
                mine.add_(theirs.to(device=mine.device, dtype=torch.float32))
            self.weight += weight

    def debiased(self) -> list[Tensor]:
        """z = x / w: the model to train and evaluate."""
        return [t / self.weight for t in self.x]

    def reset(self, params: list[Tensor]) -> None:
        """Set z to `params` (after local training) keeping w: x = params * w."""
        if len(params) != len(self.x):
            raise ValueError(f"reset got {len(params)} tensors, expected {len(self.x)}")
        self.x = [p.detach().to(torch.float32) * self.weight for p in params]

    def split_for_joiner(self) -> tuple[list[Tensor], float]:
        """Give half of (x, w) away and keep half; exact, since halving is a power of two."""
        return self.share(["joiner"])

    def state_dict(self) -> PushSumState:
        return {"x": [t.clone() for t in self.x], "weight": self.weight}

    def load_state_dict(self, state: PushSumState) -> None:
        self.x = [t.detach().to(torch.float32).clone() for t in state["x"]]
        self.weight = float(state["weight"])


# ---------------------------------------------------------------------------------------------
# vanishing-variance correction (Tian et al., arXiv:2404.04616)


def is_rescaled(name: str, tensor: Tensor) -> bool:
    """Whether variance correction rescales this tensor: floating point, more than one value, and not a
    normalisation statistic (running_mean, running_var, num_batches_tracked), which are only averaged."""
    return tensor.is_floating_point() and tensor.numel() > 1 and not name.endswith(_STATISTICS)


def _rescale(x: Tensor, target_var: Tensor, eps: float) -> Tensor:
    mean = x.mean()
    s = torch.sqrt((target_var + eps) / (x.var() + eps))
    return (x - mean) * s + mean


def _back(x: Tensor, like: Tensor) -> Tensor:
    return x.to(like.dtype) if like.is_floating_point() else x.round().to(like.dtype)


def variance_corrected_merge(
    models: list[list[Tensor]],
    names: list[str],
    *,
    own: int | None = None,
    conservative: float = 0.0,
    eps: float = 1e-4,
) -> list[Tensor]:
    """Average models, then rescale each tensor around its mean to the models' mean variance.

    Per tensor l (fp32): l_out = mean_i l_i and target = mean_i Var(l_i) (unbiased); with
    conservative c > 0 and `own` given, l_out = c l_own + (1-c) l_out and target = c Var(l_own) +
    (1-c) target. Then l_out <- (l_out - mean) * sqrt((target+eps)/(Var(l_out)+eps)) + mean.
    Tensors for which is_rescaled() is False get the plain mean. Returns new tensors.
    """
    if not models:
        raise ValueError("variance_corrected_merge needs at least one model")
    if not 0.0 <= conservative <= 1.0:
        raise ValueError(f"conservative={conservative} must lie in [0, 1]")
    if conservative > 0 and own is None:
        raise ValueError("conservative > 0 needs own= (the index of this worker's model)")
    if own is not None and not 0 <= own < len(models):
        raise ValueError(f"own={own} is not an index into {len(models)} models")
    for m, tensors in enumerate(models):
        if len(tensors) != len(names):
            raise ValueError(f"model {m} has {len(tensors)} tensors but {len(names)} names were given")
    out = []
    for i, name in enumerate(names):
        stack = torch.stack([m[i].detach().to(torch.float32) for m in models])
        avg = stack.mean(0)
        like = models[0][i]
        if not is_rescaled(name, like):
            out.append(_back(avg, like))
            continue
        target = torch.stack([x.var() for x in stack]).mean()
        if conservative > 0 and own is not None:
            avg = conservative * stack[own] + (1.0 - conservative) * avg
            target = conservative * stack[own].var() + (1.0 - conservative) * target
        out.append(_back(_rescale(avg, target, eps), like))
    return out


def weighted_variance_corrected(
    own: list[Tensor],
    received: dict[str, list[Tensor]],
    weights: dict[str, float],
    self_id: str,
    names: list[str],
    *,
    eps: float = 1e-4,
) -> list[Tensor]:
    """`mix`, then rescale each tensor to the weighted mean of the inputs' variances (same weights,
    renormalised over the peers that arrived). Tensors for which is_rescaled() is False are only mixed."""
    if len(names) != len(own):
        raise ValueError(f"{len(names)} names for {len(own)} tensors")
    mixed = mix(own, received, weights, self_id)
    present = _present_weights(received, weights, self_id)
    out = []
    for i, (name, x) in enumerate(zip(names, mixed)):
        if not is_rescaled(name, x):
            out.append(x)
            continue
        target = sum(
            (wt * (own[i] if p == self_id else received[p][i]).to(torch.float32).var() for p, wt in present),
            start=torch.zeros((), dtype=torch.float32),
        )
        out.append(_back(_rescale(x.to(torch.float32), target, eps), x))
    return out


# ---------------------------------------------------------------------------------------------
# diagnostics


def consensus_distance(models: list[list[Tensor]]) -> float:
    """Mean over models of ||x_i - x_avg||_2, all tensors of a model concatenated, in fp64."""
    if not models:
        raise ValueError("consensus_distance needs at least one model")
    flat = torch.stack([torch.cat([t.detach().reshape(-1).to(torch.float64) for t in m]) for m in models])
    return float((flat - flat.mean(0)).norm(dim=1).mean())


def layer_std(params: list[Tensor], names: list[str]) -> dict[str, float]:
    """Unbiased std of every tensor with more than one value, by name (fp64)."""
    return {n: float(p.detach().to(torch.float64).std()) for n, p in zip(names, params) if p.numel() > 1}
