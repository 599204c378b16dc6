"""The intake's clock decisions, from headers alone."""

from __future__ import annotations

import pytest

from workqd import delays, vocab
from workqd.worker import timing

NOW = 1_800_000_000_000


@pytest.mark.parametrize("headers, kind", [
    (None, timing.ON_TIME),
    ({}, timing.ON_TIME),
    ({vocab.H_EXPIRES_MS: NOW - 1}, timing.EXPIRED),
    ({vocab.H_EXPIRES_MS: NOW + 1}, timing.ON_TIME),
    ({delays.H_DUE_MS: NOW + 10_000}, timing.EARLY),
    ({delays.H_DUE_MS: NOW + 1_000}, timing.ON_TIME),     # within the levels' rounding
    ({delays.H_DUE_MS: NOW + 10_000, vocab.H_EXPIRES_MS: NOW - 1}, timing.EXPIRED),
    # What a publisher may write instead of whole milliseconds is not acted on.
    ({vocab.H_EXPIRES_MS: "0"}, timing.ON_TIME),
    ({vocab.H_EXPIRES_MS: True}, timing.ON_TIME),
    ({vocab.H_EXPIRES_MS: -5}, timing.ON_TIME),
    ({delays.H_DUE_MS: 2 ** 70}, timing.ON_TIME),
    ({delays.H_DUE_MS: 1.5e12}, timing.ON_TIME),
])
def test_verdicts(headers, kind):
    assert timing.judge(headers, NOW).kind == kind


def test_an_early_task_knows_how_long_it_still_waits():
    v = timing.judge({delays.H_DUE_MS: NOW + 200 * 86400 * 1000}, NOW)
    assert v.kind == timing.EARLY and v.seconds_left == 200 * 86400
