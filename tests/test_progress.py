"""dilo/metrics.py Progress: a bar on a terminal, one plain line per round anywhere else."""

from __future__ import annotations

import io

from dilo.metrics import Progress


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _run(stream: FakeStream, enabled: bool = True) -> Progress:
    bar = Progress(total=200, initial=0, enabled=enabled, desc="diloco x4", stream=stream)
    for r in range(4):
        for _ in range(50):
            bar.update()
        bar.show(round=r + 1, loss=2.5 - 0.1 * r, val="-", sent="1.00 MB")
    bar.print("a note")
    bar.close()
    return bar


def test_not_a_tty_prints_one_line_per_round_and_no_carriage_returns() -> None:
    stream = FakeStream(tty=False)
    bar = _run(stream)
    assert not bar.is_bar
    out = stream.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 5, lines  # 4 rounds and the note
    assert lines[0].startswith("diloco x4: step 50/200 (25%), ") and "round=1 loss=2.5 val=- sent=1.00 MB" in lines[0]
    assert lines[3].startswith("diloco x4: step 200/200 (100%), ") and "round=4 loss=2.2" in lines[3]
    assert lines[4] == "a note"


def test_a_tty_keeps_the_bar() -> None:
    stream = FakeStream(tty=True)
    bar = _run(stream)
    assert bar.is_bar
    out = stream.getvalue()
    assert "\r" in out and "200/200" in out and "a note" in out
    assert "step 50/200 (25%)" not in out  # no plain lines on a terminal


def test_disabled_prints_only_messages() -> None:
    for tty in (False, True):
        stream = FakeStream(tty=tty)
        _run(stream, enabled=False)
        assert stream.getvalue() == "a note\n"


def test_a_stream_without_isatty_counts_as_not_a_tty() -> None:
    class Bare:
        def __init__(self) -> None:
            self.parts: list[str] = []

        def write(self, s: str) -> int:
            self.parts.append(s)
            return len(s)

        def flush(self) -> None:
            pass

    stream = Bare()
    bar = Progress(total=10, initial=5, enabled=True, desc="ddp x2", stream=stream)  # type: ignore[arg-type]
    bar.update(5)
    bar.show(round=1)
    assert not bar.is_bar and stream.parts[0].startswith("ddp x2: step 10/10 (100%)")
