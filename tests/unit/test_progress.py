"""workq-submit's progress line (workqd.progress), against fake streams and a fake clock."""

from __future__ import annotations

import io

from workqd.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_line_rewritten_in_place_and_cleared_at_the_end():
    now = [100.0]
    out = Terminal()
    p = Progress(1000, out, clock=lambda: now[0])
    now[0] = 102.0
    p.show(500)
    assert out.getvalue() == "\r\x1b[Kworkq-submit: 500/1000 confirmed, 250/s, 2s left"
    p.close()
    assert out.getvalue().endswith("\r\x1b[K")


def test_a_pipe_gets_nothing():
    out = io.StringIO()
    p = Progress(1000, out)
    p.show(10)
    p.close()
    assert out.getvalue() == ""


def test_one_task_or_nothing_done_yet_says_no_rate():
    out = Terminal()
    assert not Progress(1, out).enabled
    p = Progress(10, out, clock=lambda: 5.0)
    assert p.line(0).endswith("0/10 confirmed, 0/s, -")


def test_updates_are_drawn_at_most_five_times_a_second():
    now = [0.0]
    out = Terminal()
    p = Progress(100, out, clock=lambda: now[0])
    p.update(1)                    # at once after the start: not yet
    now[0] = 0.25
    p.update(2)
    now[0] = 0.3
    p.update(3)                    # 0.05 s after the last draw: skipped
    assert out.getvalue().count("\r\x1b[K") == 1 and "2/100" in out.getvalue()
