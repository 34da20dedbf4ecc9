"""Workers that gossip with each other directly (outer.kind = "gossip").

Peers come from a coordinator acting as a tracker (membership.kind = "coordinator": it knows the
members and their listening addresses, nothing else) or from a fixed list (membership.kind =
"static": membership.peers[rank], rank from RANK). Every worker evaluates the whole validation set
on its own parameters and reports its own totals.

    world = GossipWorld(cfg, worker_id)           # tracked
    world = GossipWorld(cfg, rank=r)              # static peers list
"""

from __future__ import annotations

from torch import nn

from dilo import wire
from dilo.config import RunConfig
from dilo.errors import DiloError
from dilo.model import param_names
from dilo.outer.base import GossipLinks, Joined, Links
from dilo.transport.base import ByteCounter
from dilo.transport.zmq_p2p import P2PNode
from dilo.transport.zmq_star import StarClient
from dilo.worlds.base import OwnTotals, Placement, WallClock, check_worker_id, default_worker_id, island_of, pick_device


class GossipWorld(OwnTotals):
    elastic = True

    def __init__(self, cfg: RunConfig, worker_id: str | None = None, *, rank: int | None = None) -> None:
        self.cfg = cfg
        self._precision = cfg.inner.precision
        m = cfg.membership
        self.tracked = m.kind == "coordinator"
        self._secret = wire.load_secret(file=m.secret_file or None)
        self.size = max(1, cfg.workers)
        if self.tracked:
            if Placement.from_env().size > 1:
                raise DiloError(
                    "outer.kind='gossip' runs one rank per worker: start each `dilo worker` on its own, not as "
                    "several ranks of one torchrun"
                )
            self.worker_id = check_worker_id(worker_id or m.worker_id or default_worker_id())
            self.rank, _ = island_of(self.worker_id, self.size, allow_auto=False)
        else:
            if not m.peers:
                raise DiloError(
                    "outer.kind='gossip' with membership.kind='static' needs membership.peers (one tcp://HOST:PORT "
                    "per worker, by rank), or membership.kind='coordinator' to let a coordinator track the peers"
                )
            self.rank = Placement.from_env().rank if rank is None else rank
            if not 0 <= self.rank < len(m.peers):
                raise DiloError(f"rank {self.rank} has no entry in membership.peers ({len(m.peers)} addresses)")
            self.worker_id = check_worker_id(worker_id or f"rank{self.rank}")
        self.log_name = f"worker-{self.worker_id}"
        self.device = pick_device(cfg.transport.backend)
        self.clock = WallClock(cfg.heterogeneity.slowdown_of(self.rank))
        own = cfg.heterogeneity.max_steps_of(self.rank)
        self.step_limit = min(cfg.steps, own) if own else cfg.steps
        self._counter = ByteCounter()
        self.client: StarClient | None = None
        self.node: P2PNode | None = None
        self._welcome_peers: dict[str, str] = {}
        self._closed = False

    @property
    def counter(self) -> ByteCounter:
        return self._counter

    def links(self, model: nn.Module, cfg: RunConfig) -> Links:
        from dilo.outer.star import StarCodec

        params = list(model.parameters())
        param_bytes = sum(p.numel() * 4 for p in params)
        m = cfg.membership
        fp32 = {f"p.{i}": (tuple(p.shape), "float32") for i, p in enumerate(params)}
        spec, state_spec = fp32, fp32
        if cfg.codec.kind != "none":  # compressed gossip: encoded differences; states carry x and x^
            spec = StarCodec(param_names(model), [p.shape for p in params], cfg.codec).push_spec()
            state_spec = {**fp32, **{f"h.{i}": v for i, (_, v) in enumerate(fp32.items())}}
        self.node = P2PNode(
            self.worker_id,
            bind=m.p2p_bind if self.tracked else m.peers[self.rank],
            advertise=m.p2p_advertise if self.tracked else m.peers[self.rank],
            run=cfg.name,
            fingerprint=cfg.fingerprint(),
            secret=self._secret,
            spec=spec,
            state_spec=state_spec,
            max_message_bytes=3 * param_bytes + (1 << 20),
            curve_dir=m.curve_dir,
            rate_limit=m.rate_limit,
            hello_timeout_s=min(cfg.outer.peer_timeout_s if cfg.outer.kind == "gossip" else 10.0, 5.0),
        )
        self._counter = self.node.counter
        if self.tracked:
            self.client = StarClient(
                m,
                self.worker_id,
                run=cfg.name,
                fingerprint=cfg.fingerprint(),
                secret=self._secret,
                max_message_bytes=1 << 20,
            )
            self.client.join_body = {"p2p": self.node.address}
            links = GossipLinks(self.node, self._tracked_view, self.worker_id, self.rank, join=self._join_tracker)
        else:
            static = {f"rank{r}": a for r, a in enumerate(m.peers)}
            links = GossipLinks(self.node, lambda: dict(static), self.worker_id, self.rank)
        return Links(counter=self._counter, gossip=links)

    def _join_tracker(self) -> None:
        assert self.client is not None
        welcome = self.client.join()
        self._welcome_peers = {str(k): str(v) for k, v in dict(welcome.body["peers"]).items()}

    def _tracked_view(self) -> dict[str, str]:
        assert self.client is not None
        peers = self.client.heartbeat.peers
        return dict(peers) if peers else dict(self._welcome_peers)

    def adopt(self, joined: Joined, *, resumed: bool) -> None:
        """A gossip worker's island is fixed by its id or rank."""

    def close(self, *, leaving: bool) -> None:
        """Leave the tracker, close its link and the node (once; the node's counters stay readable)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.client is not None:
                try:
                    if leaving:
                        self.client.leave()
                finally:
                    self.client.close()
        finally:
            if self.node is not None:
                self.node.close()
