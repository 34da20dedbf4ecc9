"""P2PNode's rejected / overflow counters: one lock for both threads, logged like the
coordinator's rejections (first of each code or sender, then summaries), read-only snapshots."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from dilo import wire
from dilo.transport import zmq_p2p
from dilo.transport.zmq_p2p import MAX_QUEUED, P2PNode

SECRET = b"p2p-counters-secret-0123456789ab"
SPEC = {"p.0": ((2, 2), "float32")}


def _node(name: str) -> P2PNode:
    return P2PNode(
        name, bind="tcp://127.0.0.1:0", run="r", fingerprint="f", secret=SECRET, spec=SPEC, max_message_bytes=1 << 16
    )


@pytest.fixture
def pair() -> Iterator[tuple[P2PNode, P2PNode]]:
    node, sender = _node("me"), _node("you")
    try:
        yield node, sender
    finally:
        node.close()
        sender.close()


def _gossip(r: int) -> wire.Message:
    return wire.Message(type=wire.MsgType.GOSSIP, worker="you", body={"round": r}, tensors={"p.0": torch.ones(2, 2)})


def _wait(cond: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def test_overflow_is_logged_once_then_summarised(
    pair: tuple[P2PNode, P2PNode], caplog: pytest.LogCaptureFixture
) -> None:
    node, sender = pair
    caplog.set_level(logging.WARNING, logger="dilo.transport.p2p")
    extra = 5
    for r in range(MAX_QUEUED + extra):
        assert sender.send("me", node.address, _gossip(r))
        time.sleep(0.02)  # stay under the DEALER's send queue
    _wait(lambda: node.overflow == extra)
    assert node.overflow == extra
    assert node.stats() == {"rejected": {}, "overflow": extra, "overflow_by_peer": {"you": extra}}
    drops = [r.getMessage() for r in caplog.records if "uncollected" in r.getMessage()]
    assert len(drops) == 1 and "you" in drops[0]  # the first drop only; the rest wait for a summary
    node.flush_log(force=True)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped")]
    assert summary == [f"dropped {extra - 1} more uncollected messages: you {extra - 1}"]
    node.flush_log(force=True)  # nothing new: no second summary
    assert len([r for r in caplog.records if r.getMessage().startswith("dropped")]) == 1
    assert len(node.collect({"you"}, timeout_s=0.1, round_idx=MAX_QUEUED + extra)["you"]) == MAX_QUEUED


def test_counters_are_read_only_snapshots(pair: tuple[P2PNode, P2PNode]) -> None:
    node, _ = pair
    with pytest.raises(AttributeError):
        node.overflow = 3  # type: ignore[misc]
    node._reject("shape", "a test rejection")
    copy = node.rejected
    copy["shape"] += 100
    assert node.rejected["shape"] == 1
    stats = node.stats()
    stats["rejected"]["shape"] = 7
    assert node.stats()["rejected"] == {"shape": 1}


def test_both_threads_count_without_losing_updates(pair: tuple[P2PNode, P2PNode]) -> None:
    """The server thread and the training thread both count: a lock keeps every update."""
    node, _ = pair
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: unguarded += loses counts
    try:
        n, threads = 20_000, 4

        def hammer(i: int) -> None:
            for k in range(n):
                if k % 2:
                    node._count_reject("rate")
                else:
                    node._reject("shape", "x")
                node._dropped(f"w{i}")

        ts = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert node.rejected == {"rate": n * threads // 2, "shape": n * threads // 2}
    assert node.overflow == n * threads
    assert node.stats()["overflow_by_peer"] == {f"w{i}": n for i in range(threads)}


def test_close_flushes_the_last_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dilo.transport.p2p")
    node = _node("me")
    for _ in range(3):
        node._reject("auth", "bad HMAC")
    node.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("rejected a message (auth)" in m for m in msgs) == 1
    assert any(m.startswith("rejected 2 more messages") and "auth 2" in m for m in msgs), msgs
    assert zmq_p2p.SUMMARY_PERIOD_S > 0
