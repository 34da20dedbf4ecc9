"""How workers reach each other: the transport, the membership (static or a coordinator, gossip
peers) and the coordinator's own addresses."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from dilo.config.base import Frozen

_TCP = re.compile(r"tcp://[^:\s]+:(-?\d+)")


def _tcp(value: str, *, free_port: bool) -> str:
    """Check a tcp://HOST:PORT address; port 0 (bind to a free port) only where `free_port`."""
    m = _TCP.fullmatch(value)
    if m is None:
        raise ValueError("expected tcp://HOST:PORT")
    port = int(m.group(1))
    lowest = 0 if free_port else 1
    if not lowest <= port <= 65535:
        if port == 0:
            raise ValueError(
                "port 0 (a free port, chosen at bind time) cannot be known by whoever connects here: "
                "give a fixed port from 1 to 65535"
            )
        raise ValueError(f"port {port} is out of range: ports go from {lowest} to 65535")
    return value


def _connect(value: str) -> str:
    return _tcp(value, free_port=False)


def _bind(value: str) -> str:
    return _tcp(value, free_port=True)


def _advertise(value: str) -> str:
    return value and _connect(value)


Address = Annotated[str, AfterValidator(_connect)]
"""An address others connect to: tcp://HOST:PORT with a fixed port 1..65535."""
BindAddress = Annotated[str, AfterValidator(_bind)]
"""An address to listen on: tcp://HOST:PORT, port 0..65535 (0 picks a free one)."""
AdvertiseAddress = Annotated[str, AfterValidator(_advertise)]
"""Empty (derive it from the bind address) or an `Address`."""


class TransportConfig(Frozen):
    kind: Literal["torch"] = "torch"
    """torch.distributed collectives between workers."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto picks nccl when CUDA is available, gloo otherwise."""
    bucket_mb: float = Field(32.0, gt=0.0)
    """Size of the flat fp32 buckets that are all-reduced together."""
    timeout_s: float = Field(300.0, gt=0.0)
    """A collective that has not finished after this many seconds fails the round."""
    island_ranks: Annotated[int, Field(ge=1)] | Literal["node"] = 1
    """Ranks per island (static worlds). 1: every rank is a worker. N > 1: each N consecutive ranks
    (torchrun numbers a node's ranks consecutively) train one replica with data parallelism inside
    and count as one worker in the outer step; "node": one island per node (LOCAL_WORLD_SIZE
    ranks). With membership.kind = "coordinator" the ranks of one torchrun launch always form one
    island, which joins as one worker."""
    island_shard: Literal["none", "fsdp"] = "none"
    """How an island of several ranks holds its model. none: every rank holds it all (data
    parallelism). fsdp: the ranks shard it with FSDP2 (`fully_shard` per block, bf16 compute under
    inner.precision = bf16, fp32 master weights). In a static world (DiLoCo, FedAvg) the anchor,
    outer momentum and pseudo-gradient stay per shard, never gathered, and every rank exchanges
    its own shard with the same shard of the other islands (so island_wire does not apply); with
    a coordinator (DiLoCo, FedAvg, async) the lead relays a gathered host copy. Checkpoints are
    DCP's, resumable on another number of ranks per island."""
    island_wire: Literal["lead", "all"] = "lead"
    """Who carries an island's outer exchange (static worlds, islands of several ranks). lead: the
    island's local rank 0 exchanges the whole model and broadcasts the result to its island. all:
    every rank exchanges its share of the parameters (about 1/N of the bytes) with the same rank
    of the other islands, in parallel, and the island gathers the shares: N NICs instead of one."""


class MembershipConfig(Frozen):
    kind: Literal["static", "coordinator"] = "static"
    """static: the world is fixed by the launcher (torchrun, Slurm, dilo run: RANK, WORLD_SIZE);
    coordinator: workers join and leave a `dilo coordinator` over ZeroMQ (elastic)."""
    address: Address = "tcp://127.0.0.1:29600"
    """coordinator: where workers connect (tcp://HOST:PORT)."""
    worker_id: str = ""
    """coordinator: this worker's stable id (re-joins after a restart keep it); empty: DILO_WORKER_ID
    from the environment, else host-pid."""
    heartbeat_s: float = Field(1.0, gt=0.0)
    """Seconds between two heartbeats of a worker."""
    heartbeat_timeout_s: float = Field(5.0, gt=0.0)
    """A worker silent for this long leaves the view (five missed heartbeats by default: a dead
    worker's round closes about 5 s after its last heartbeat; heartbeats have a thread and socket of
    their own, so a busy worker keeps sending them)."""
    round_timeout_s: float = Field(120.0, gt=0.0)
    """A synchronous round closes at this deadline with whoever pushed (at least min_workers)."""
    min_workers: int = Field(1, gt=0)
    """Fewest pushes that may close a round at its deadline."""
    backup_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = 0
    """Semi-synchronous rounds (backup workers): a round closes as soon as all but this many of its
    members have pushed (and at least min_workers have), instead of waiting for the slowest; the
    rest are late. 0: wait for every member (or round_timeout_s). "auto": tuned every round from
    the members' arrival times: the members expected to arrive later than twice the median
    member's (an average of their last arrivals after the round opened) are not waited for."""
    schedule: Literal["fixed", "compass"] = "fixed"
    """Inner steps per worker and round (synchronous rounds through a coordinator). fixed: every
    worker trains outer.inner_steps. compass (after FedCompass): each worker is handed steps in
    proportion to its measured speed, the fastest outer.inner_steps and none fewer than
    min_steps_ratio of them, so that workers of different speeds arrive together; with uniform
    weighting each update then weighs the share of a full round it trained."""
    min_steps_ratio: float = Field(0.25, gt=0.0, le=1.0)
    """schedule = compass: the fewest steps a round hands out, as a share of outer.inner_steps."""
    participation: Literal["equal", "fedau"] = "equal"
    """How often a member takes part changes its weight (synchronous rounds through a coordinator).
    equal: not at all. fedau (Wang & Ji, arXiv:2306.03401): each update is weighted by the mean
    number of rounds between the member's participations (estimated online, each interval capped
    at participation_cap), so a member present in a quarter of the rounds weighs about 4x when it
    is: over time every member moves the model about as much as one always present."""
    participation_cap: int = Field(50, ge=1)
    """participation = fedau: the longest interval between two participations that is counted."""
    late_weight: float = Field(0.0, ge=0.0, le=1.0)
    """A push that arrives after its round closed is folded into the open round with its weight
    times late_weight ** staleness (versions behind; at most 8) instead of being dropped; the
    worker still catches up from the current state. 0: late pushes are dropped."""
    start_quorum: int = Field(0, ge=0)
    """The first round waits for this many pushes (or round_timeout_s), so a run does not start with
    whichever worker was up first; `dilo run` sets it to --workers."""
    request_timeout_s: float = Field(30.0, gt=0.0)
    """A worker waits this long for any reply before reconnecting (with backoff). A push waits for
    its RESULT at most round_timeout_s + request_timeout_s (async: plus grace_s), then re-joins."""
    rate_limit: float = Field(200.0, ge=0.0)
    """Messages per second one connection may send to a coordinator or a gossip peer, in bursts of
    up to twice that; the rest are dropped unread and unanswered, and counted (0: no limit). A
    worker sends about one heartbeat per heartbeat_s and a few requests per round."""
    secret_file: str = ""
    """File holding the shared secret (else DILO_SECRET from the environment; else no
    authentication)."""
    curve_dir: str = ""
    """Directory with CURVE keys from `dilo keys` (server.key / server.pub / client.key): encrypts
    the ZeroMQ traffic. Empty: no encryption."""
    p2p_bind: BindAddress = "tcp://127.0.0.1:0"
    """gossip: where this worker listens for its peers (tcp://HOST:PORT; port 0 picks a free one)."""
    p2p_advertise: AdvertiseAddress = ""
    """gossip: the address peers reach this worker at; empty: derived from p2p_bind."""
    peers: list[Address] = Field(default_factory=list)
    """gossip with membership.kind = "static": every worker's listening address, by rank (the
    coordinator is then not needed; worker `rank` binds peers[rank])."""

    @model_validator(mode="after")
    def _heartbeats(self) -> MembershipConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_s:
            raise ValueError("heartbeat_timeout_s must exceed heartbeat_s")
        return self


class CoordinatorConfig(Frozen):
    bind: BindAddress = "tcp://0.0.0.0:29600"
    """Where `dilo coordinator` listens (tcp://HOST:PORT; port 0 picks a free one)."""
    advertise: AdvertiseAddress = ""
    """The address printed for workers to connect to; empty: derived from bind."""
    checkpoint_every: int = Field(1, ge=0)
    """Checkpoint the global state every this many versions (0: only on SIGTERM)."""
