"""Gossip averaging: every H steps, mix parameters with a few peers; no central state.

    outer = Gossip(model, GossipLinks(node, view, worker_id, rank), cfg)   # node: a zmq_p2p.P2PNode
    outer.start(model, resumed=False)     # join the tracker, take a running neighbour's parameters
    if outer.due(step):
        report = outer.sync(model, tail=tail)

A round: build the round's mixing graph from the sorted member ids (dilo/outer/mixing.py, the
same on every worker without a word exchanged), send this worker's parameters to the peers that
average it, wait up to `peer_timeout_s` for the parameters of the peers it averages, mix them with
its own (weights renormalised over what arrived), and train on. A peer that stays silent is
replaced by pulling the current parameters of another live member that is not already a peer, so
a crash costs one timeout, not the round's information. With `push_sum` the worker sends shares of
(x, w) instead and trains the de-biased x / w: no renormalisation is needed, and directed or
time-varying graphs still converge (a lost share is lost mass; the de-biasing keeps the model
consistent). With `variance_correction` each merged layer is rescaled around its mean to the
weighted mean of the inputs' variances; `conservative` c blends c of the worker's own layer (and
of its variance) into that merge.

With a codec (codec.kind != "none") the exchange is CHOCO-gossip (Koloskova et al., 2019): each
worker keeps a public estimate x^ of its parameters that every neighbour replicates, sends only
q = C(x - x^) (what a round does not transmit stays in x - x^ and goes out later: error feedback
without a separate memory), and moves x <- x + consensus_step * sum_j w_j (x^_j - x^_self). A
neighbour whose replica missed a q (a timeout, a new neighbour after a view change) pulls the
sender's x^ in full once.

Each round's report carries, in `extra`: the distance of this worker's parameters to its peers'
before mixing (`disagreement`, the local view of consensus distance) and the mean per-layer weight
standard deviation before and after the merge. With `final_merge` the last round is followed by
one fully connected average over the workers still alive.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dilo import wire
from dilo.model import param_names, params_of
from dilo.outer import mixing
from dilo.outer.base import Failure, GossipLinks, Joined, SyncReport, Tail, tensor_digest
from dilo.outer.groups import describe_groups
from dilo.outer.star import StarCodec, worker_key

if TYPE_CHECKING:
    from dilo.config import GossipConfig, RunConfig

log = logging.getLogger("dilo.outer.gossip")


class Gossip:
    def __init__(self, model: nn.Module, links: GossipLinks, cfg: RunConfig, outer: GossipConfig) -> None:
        self.links = links
        self.node = node = links.node
        self.view = links.view
        self.cfg = cfg
        self.o = outer
        self.me = links.worker_id
        self.names = param_names(model)
        self.round_steps = self.o.inner_steps
        self.round = 0
        self.total_steps = cfg.steps
        self.push_sum = mixing.PushSum([p.detach().float() for p in params_of(model)]) if self.o.push_sum else None
        self.star: StarCodec | None = None
        if cfg.codec.kind != "none":
            self.star = StarCodec(self.names, [p.shape for p in params_of(model)], cfg.codec, seed=cfg.seed)
        self.hat = [p.detach().float().cpu().clone() for p in params_of(model)]
        """Compressed gossip: this worker's public estimate x^, and how many q built it."""
        self.hat_seq = 0
        self.replicas: dict[str, tuple[list[Tensor], int]] = {}
        """Compressed gossip: the neighbours' x^ and their sequence numbers."""
        self.pulled_states = 0
        self._step = -1
        self.suspects: set[str] = set()
        """Peers silent in their last round: not waited for again until they are heard from."""
        self._lock = threading.Lock()
        self._hat_snapshot: tuple[list[Tensor], int] = ([], 0)
        self._snapshot: tuple[list[Tensor], int, float] = (
            [p.detach().float().clone() for p in params_of(model)],
            0,
            1.0,
        )
        node.publish(self._state)

    @torch.no_grad()
    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        """Independent initialisation (outer.independent_init), the tracker's JOIN, and for a worker
        joining a tracked run in progress the parameters of a running neighbour; then publish."""
        if self.o.independent_init and not resumed:
            from dilo.adapters import build_run_model  # the model of another seed, built like the run's

            other = build_run_model(self.cfg.model_copy(update={"seed": self.cfg.seed + 1000 * self.links.rank}))
            fresh = dict(zip(param_names(other), params_of(other)))
            for name, p in model.named_parameters():  # by name: `model` may be the shared view
                p.copy_(fresh[name])
        if self.links.join is not None:
            self.links.join()
        # a static world starts together (a restarted worker resumes from its checkpoint); a tracked
        # worker may be joining a run in progress
        took = self.join_from_neighbour(model) if self.links.join is not None and not resumed else None
        self.publish(model)
        members = tuple(sorted(set(self.view()) | {self.me}))
        return Joined(members=members, extra={"from": took, "address": self.node.address})

    def reduce_grads(self, model: nn.Module) -> None:
        """Gradients stay local."""

    def describe(self) -> list[str]:
        if self.star is not None:
            return [f"CHOCO-gossip of {line}" for line in describe_groups(self.star.groups)]
        return [f"every parameter: fp32 to the {self.o.topology} peers" + (" (push-sum)" if self.o.push_sum else "")]

    # ------------------------------------------------------------------------------- peers' view of us

    def publish(self, model: nn.Module) -> None:
        """What a peer pulling from us gets: a copy of the current parameters and round (and, in
        compressed gossip, of the public estimate and its sequence number)."""
        snap = [p.detach().float().cpu().clone() for p in params_of(model)]
        weight = self.push_sum.weight if self.push_sum is not None else 1.0
        hat = [h.clone() for h in self.hat] if self.star is not None else []
        with self._lock:
            self._snapshot = (snap, self.round, weight)
            self._hat_snapshot = (hat, self.hat_seq)

    def _state(self) -> wire.Message:  # runs on the P2P server thread
        with self._lock:
            params, round_idx, weight = self._snapshot
            hat, seq = self._hat_snapshot
        tensors = {f"p.{i}": p for i, p in enumerate(params)}
        tensors.update({f"h.{i}": h for i, h in enumerate(hat)})
        return wire.Message(
            type=wire.MsgType.STATE,
            worker=self.me,
            tensors=tensors,
            body={"round": round_idx, "weight": weight, "digest": tensor_digest(params), "seq": seq},
        )

    @torch.no_grad()
    def join_from_neighbour(self, model: nn.Module) -> dict[str, Any] | None:
        """A worker joining a run in progress takes the parameters and round of a neighbour that has
        gossiped already (its ring successor first). Returns what it took, or None (a fresh run)."""
        peers = self.view()
        members = sorted(set(peers) | {self.me})
        i = members.index(self.me)
        for peer in members[i + 1 :] + members[:i]:
            state = self.node.pull(peer, peers[peer], self.o.peer_timeout_s)
            if state is None or state.body["round"] == 0:  # bodies checked by the node (dilo/bodies.py)
                continue
            for p, k in zip(params_of(model), range(len(self.names))):
                p.copy_(state.tensors[f"p.{k}"])
            self.round = state.body["round"]
            if self.push_sum is not None:  # a joiner brings mass 1 with the neighbour's model
                self.push_sum = mixing.PushSum([p.detach().float() for p in params_of(model)])
            self.publish(model)
            log.info("worker %s joined from %s at round %d", self.me, peer, self.round)
            return {"from": peer, "round": self.round, "digest": state.body["digest"]}
        self.publish(model)
        return None

    # ------------------------------------------------------------------------------- rounds

    def due(self, step: int) -> bool:
        self._step = step
        return (step + 1) % self.round_steps == 0

    @torch.no_grad()
    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        t0 = time.perf_counter()
        sent0, recv0 = self.node.counter.sent, self.node.counter.recv
        params = params_of(model)
        own = [p.detach().float().cpu().clone() for p in params]
        std_before = mixing.layer_std(own, self.names)
        peers = self.view()
        members = sorted(set(peers) | {self.me})
        new, got, missing, substituted = self._round(own, peers, members, self.o.topology, self.round, final=False)
        disagreement = _mean_distance(own, got)
        for p, v in zip(params, new):
            p.copy_(v)
        self.round += 1
        # what the peers sent that this worker refused or had to drop, so far (the node's counters)
        extra: dict[str, Any] = {"peers": sorted(got), "disagreement": disagreement, "p2p": self.node.stats()}
        if self.star is not None:  # the public estimate and the replicas, to check they agree
            extra["hat"] = [tensor_digest(self.hat), self.hat_seq]
            extra["replicas"] = {j: [tensor_digest(r), seq] for j, (r, seq) in sorted(self.replicas.items())}
            extra["pulled_states"] = self.pulled_states
        last = self._step + 1 >= self.total_steps
        if last and self.o.final_merge:
            peers = self.view()
            members = sorted(set(peers) | {self.me})
            merged, final_got, final_missing, _ = self._round(
                [p.detach().float().cpu().clone() for p in params], peers, members, "fully_connected", self.round,
                final=True,
            )  # fmt: skip
            for p, v in zip(params, merged):
                p.copy_(v)
            extra["final_merge"] = {"with": sorted(final_got), "missing": sorted(final_missing)}
        after = [p.detach().float() for p in params]
        std_after = mixing.layer_std(after, self.names)
        extra["layer_std_before"] = _mean(std_before)
        extra["layer_std_after"] = _mean(std_after)
        extra["layer_std"] = {"before": std_before, "after": std_after}
        self.publish(model)
        reason = ""
        if missing:
            reason = f"no message from {sorted(missing)}" + "".join(
                f"; pulled {sub} in place of {silent}" for silent, sub in sorted(substituted.items())
            )
        committed = bool(got) or not missing
        return SyncReport(
            committed=committed,
            failure=None if committed else Failure.ISOLATED,
            participants=1 + len(got),
            bytes_sent=self.node.counter.sent - sent0,
            bytes_recv=self.node.counter.recv - recv0,
            sync_s=time.perf_counter() - t0,
            stop=tail.stop,
            tokens=tail.tokens,
            reason=reason,
            anchor_hash=tensor_digest(after),
            version=self.round,
            extra=extra,
        )

    def _round(
        self,
        own: list[Tensor],
        peers: dict[str, str],
        members: list[str],
        topology: str,
        round_idx: int,
        *,
        final: bool,
    ) -> tuple[list[Tensor], dict[str, list[Tensor]], set[str], dict[str, str]]:
        """One exchange: send, collect, replace the silent, mix. Returns (new params, what arrived
        by the peer whose weight it took, the silent peers, {silent peer: substitute})."""
        w = mixing.graph(topology, members, round_idx, self.cfg.seed)
        out, inn = mixing.out_peers(w, self.me), set(mixing.in_peers(w, self.me))
        if self.star is not None and not final:
            return self._choco(own, peers, w, out, inn, round_idx)
        body: dict[str, Any] = {"round": round_idx, "final": final}
        if self.push_sum is not None and not final:
            self.push_sum.reset(own)
            share, weight = self.push_sum.share(out)
            tensors = {f"p.{i}": t.contiguous() for i, t in enumerate(share)}
            body["weight"] = weight
        else:
            tensors = {f"p.{i}": t for i, t in enumerate(own)}
        for peer in out:
            if peer in peers:
                self.node.send(
                    peer,
                    peers[peer],
                    wire.Message(type=wire.MsgType.GOSSIP, worker=self.me, body=body, tensors=tensors),
                )
        # A peer that was silent last time is not waited for (its neighbours would all fall a timeout
        # behind, and theirs after them); a message from it that is already here still counts.
        msgs = self.node.collect(
            inn, self.o.peer_timeout_s, round_idx=round_idx, final=final, wait_for=inn - self.suspects
        )
        n = len(own)
        if not final and msgs:
            # a worker that fell behind (or joined) catches up with the round its peers are at, so
            # that time-varying graphs stay aligned
            self.round = max(self.round, max(int(m.body["round"]) for ms in msgs.values() for m in ms))
        missing = inn - set(msgs)
        if not final:
            self.suspects = (self.suspects | missing) - set(msgs)
        if self.push_sum is not None and not final:
            # every share is mass: absorb all that came
            parts = [
                ([m.tensors[f"p.{i}"].float() for i in range(n)], float(m.body.get("weight", 1.0)))
                for p in sorted(msgs)
                for m in msgs[p]
            ]
            self.push_sum.absorb(parts)
            views = {  # the peers' de-biased models, for the metrics
                p: [ms[-1].tensors[f"p.{i}"].float() / float(ms[-1].body.get("weight", 1.0)) for i in range(n)]
                for p, ms in msgs.items()
            }
            return self.push_sum.debiased(), views, missing, {}
        got = {p: [ms[-1].tensors[f"p.{i}"].float() for i in range(n)] for p, ms in msgs.items()}  # the latest
        substituted: dict[str, str] = {}
        if missing and not final:
            spare = [m for m in members if m not in inn and m != self.me and m in peers]
            for silent in sorted(missing):
                while spare:
                    candidate = spare.pop(0)
                    state = self.node.pull(candidate, peers[candidate], self.o.peer_timeout_s / 2)
                    if state is not None:
                        got[silent] = [state.tensors[f"p.{i}"].float() for i in range(len(own))]
                        substituted[silent] = candidate
                        break
            if missing:
                log.warning("round %d: no message from %s; substitutes %s", round_idx, sorted(missing), substituted)
        if self.o.nearest and got:  # robust mixing: the farthest peers are left out of this mix
            dropped = mixing.farthest(own, got, self.o.nearest)
            for peer in dropped:
                got.pop(peer)
            log.info("round %d: left out of the mix as farthest: %s", round_idx, dropped)
        weights = w[self.me]
        if self.o.variance_correction and self.o.conservative > 0 and got:
            weights = conservative_weights(weights, set(got), self.me, self.o.conservative)
        if self.o.variance_correction and got:
            # eps only guards a zero variance: the reference's 1e-4 is as large as the variance of a
            # 0.02-std init and would leave a fifth of the shrinkage uncorrected
            new = mixing.weighted_variance_corrected(own, got, weights, self.me, self.names, eps=1e-12)
        else:
            new = mixing.mix(own, got, weights, self.me)
        return new, got, missing, substituted

    def _choco(
        self, own: list[Tensor], peers: dict[str, str], w: mixing.Weights, out: list[str], inn: set[str], round_idx: int
    ) -> tuple[list[Tensor], dict[str, list[Tensor]], set[str], dict[str, str]]:
        """One compressed round: send q = C(x - x^), update the replicas, step towards the neighbours."""
        assert self.star is not None
        n = len(own)
        diff = [x - h for x, h in zip(own, self.hat)]
        tensors = self.star.encode_push(diff, round_idx, worker_key(self.me), contributes=True, feedback=False)
        for h, q in zip(self.hat, self.star.split(self.star.decode_push(tensors))):
            h.add_(q.view_as(h))
        self.hat_seq += 1
        with self._lock:  # before anyone can hear of this seq: a neighbour that pulls gets at least it
            self._hat_snapshot = ([h.clone() for h in self.hat], self.hat_seq)
        body = {"round": round_idx, "final": False, "seq": self.hat_seq}
        for peer in out:
            if peer in peers:
                self.node.send(peer, peers[peer], wire.Message(type=wire.MsgType.GOSSIP, worker=self.me, body=body,
                                                               tensors=tensors))  # fmt: skip
        msgs = self.node.collect(inn, self.o.peer_timeout_s, round_idx=round_idx, wait_for=inn - self.suspects)
        if msgs:
            self.round = max(self.round, max(int(m.body["round"]) for ms in msgs.values() for m in ms))
        missing = inn - set(msgs)
        self.suspects = (self.suspects | missing) - set(msgs)
        heard: dict[str, list[Tensor]] = {}
        for peer in sorted(msgs):
            for m in msgs[peer]:
                seq = m.body.get("seq")  # validated by the node (dilo/bodies.py GossipBody)
                if seq is None:
                    log.warning("compressed gossip from %s without a sequence number: ignored", peer)
                    continue
                replica = self.replicas.get(peer)
                if replica is not None and replica[1] >= seq:
                    continue  # already in the replica (it came with a pulled state)
                if replica is not None and replica[1] == seq - 1:
                    diffs = self.star.split(self.star.decode_push(m.tensors))
                    self.replicas[peer] = ([r + d.view_as(r) for r, d in zip(replica[0], diffs)], seq)
                    continue
                state = self.node.pull(peer, peers[peer], self.o.peer_timeout_s) if peer in peers else None
                if state is None:
                    break
                self.pulled_states += 1
                self.replicas[peer] = ([state.tensors[f"h.{i}"].float() for i in range(n)], int(state.body["seq"]))
            if peer in self.replicas:
                heard[peer] = self.replicas[peer][0]
        weights = w[self.me]
        step = self.o.consensus_step
        new = [x.clone() for x in own]
        for peer in sorted(heard):
            for x, hj, hi in zip(new, heard[peer], self.hat):
                x.add_(hj - hi, alpha=step * weights.get(peer, 0.0))
        return new, heard, missing, {}

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round}
        if self.push_sum is not None:
            out["push_sum"] = self.push_sum.state_dict()
        if self.star is not None:  # the replicas are rebuilt by pulls after a restart
            out["hat"] = [h.clone() for h in self.hat]
            out["hat_seq"] = self.hat_seq
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        if self.push_sum is not None and "push_sum" in state:
            self.push_sum.load_state_dict(state["push_sum"])
        if self.star is not None and "hat" in state:
            self.hat = [h.float().clone() for h in state["hat"]]
            self.hat_seq = int(state["hat_seq"])


def conservative_weights(weights: dict[str, float], arrived: set[str], me: str, c: float) -> dict[str, float]:
    """Blending c of the own layer into the merge (outer.conservative) re-weights it: (1 - c) times
    the weights renormalised over what arrived, plus c on this worker. The variance-corrected
    merge's target, a weighted mean of the inputs' variances, follows the same weights, so it too
    becomes c Var(own) + (1 - c) target."""
    present = [p for p in weights if p == me or p in arrived]
    total = sum(weights[p] for p in present)
    return {p: (1.0 - c) * weights[p] / total + (c if p == me else 0.0) for p in present}


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else 0.0


def _mean_distance(own: list[Tensor], others: dict[str, list[Tensor]]) -> float | None:
    if not others:
        return None
    total = 0.0
    for params in others.values():
        total += sum(float((a - b).double().pow(2).sum()) for a, b in zip(own, params)) ** 0.5
    return total / len(others)
