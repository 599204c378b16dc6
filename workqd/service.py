"""Does the broker serve a queue that our workers consume? Judged after each depth poll.

Any of three signs is enough:

- **too few consumers**: the broker counts fewer consumers of the queue than consume
  from it here. A quorum queue whose leader is gone answers a passive declare through
  a new leader that does not know our consumers, or with 0.
- **starved**: tasks wait, a worker here sits idle with room for one, and between two
  polls nothing was delivered here. The leader of a quorum queue that lost its quorum
  goes on answering from its last committed state, consumers included, so the first
  sign never shows; this one does. It does not apply to a queue with a single active
  consumer, where idle consumers beside the active one are the point, nor to a queue
  workqd did not declare (it may have one).
- **churn**: a worker here had to consume again CHURN_TIMES times within the last
  CHURN_POLLS polls, and no task was delivered here meanwhile. A worker that moves to the
  leader of a quorum queue without a quorum gets consume-ok, then the broker's 541 when
  the registration times out (15 s on RabbitMQ 3.10), and consumes again: it is counted
  as consuming nearly all the time, and the leader may count the consumers it committed
  before the loss, so the first sign can stay silent. A failover consumes again once or
  twice; a pause or resume clears the window.

A sign must hold for ``UNSERVED_AFTER`` polls in a row: one sample can be a late one
(a queue just declared answers with 0 consumers for a moment).

Pure logic, no I/O: the master feeds it samples; tests/unit/test_service.py drives it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

UNSERVED_AFTER = 2
CHURN_POLLS = 12    # the churn window: a minute at the poller's round of 5 s
CHURN_TIMES = 3     # consumes again by one worker within it, with nothing delivered


@dataclass(frozen=True)
class Sample:
    ready: int                 # the broker's count of tasks waiting in the queue
    broker_consumers: int      # the broker's count of consumers, from every host
    consuming: int             # workers consuming from it here
    idle: int                  # of those, how many run no task
    progress: frozenset        # (pid, tasks settled, busy) of each worker: moves on a delivery
    # (pid, times it started consuming) of each worker: moves when one consumes again
    subscriptions: frozenset = field(default_factory=frozenset)


class ServiceJudge:
    """One queue's verdict, carried from poll to poll."""

    def __init__(self, starvation_applies: bool):
        self.starvation_applies = starvation_applies
        self._previous: Sample | None = None
        self._strikes = 0
        # The last CHURN_POLLS + 1 samples' (subscriptions by pid, progress), oldest first.
        self._window: deque[tuple[dict[int, int], frozenset]] = deque(maxlen=CHURN_POLLS + 1)
        self.sign = ""             # why it looks unserved, for the log and /readyz

    @property
    def unserved(self) -> bool:
        return self._strikes >= UNSERVED_AFTER

    def forget_churn(self) -> None:
        """The master paused or resumed the queue: its workers consume again because
        they were told to, which says nothing about the broker."""
        self._window.clear()

    def observe(self, sample: Sample | None) -> str:
        """Take one poll's sample (None: no depth known, e.g. not declared yet).

        Returns "lost" when the queue has just been judged unserved, "back" when it is
        served again, "" otherwise, so the caller logs each change once.
        """
        was = self.unserved
        sign = self._sign(self._previous, sample)
        self._previous = sample
        if sign:
            self._strikes += 1
            self.sign = sign
        else:
            self._strikes = 0
        if self.unserved and not was:
            return "lost"
        if was and not self.unserved:
            self.sign = ""
            return "back"
        return ""

    def _sign(self, before: Sample | None, now: Sample | None) -> str:
        if now is None:
            return ""   # no depth known: nothing to judge, and no evidence against churn
        if now.consuming == 0:
            self._window.clear()   # paused or all reconnecting: consuming again is expected
            return ""   # nothing consumes here: nothing to judge
        self._window.append((dict(now.subscriptions), now.progress))
        if now.broker_consumers < now.consuming:
            return (f"the broker counts {now.broker_consumers} consumer(s) but "
                    f"{now.consuming} consume here")
        if (self.starvation_applies and before is not None
                and before.ready > 0 and now.ready > 0 and before.idle > 0 and now.idle > 0
                and before.progress == now.progress):
            return (f"{now.ready} task(s) wait and {now.idle} worker(s) here are idle, "
                    f"but the broker delivered nothing since the last poll")
        return self._churn()

    def _churn(self) -> str:
        oldest_progress = self._window[0][1]
        latest, progress = self._window[-1]
        if progress != oldest_progress:
            return ""   # something was delivered (or a worker replaced) within the window
        most = 0
        for pid, times in latest.items():
            # Counts only rise, so the oldest sample that knew the worker has its least.
            first = next(seen[pid] for seen, _ in self._window if pid in seen)
            most = max(most, times - first)
        if most < CHURN_TIMES:
            return ""
        return (f"a worker here consumed again {most} times in the last "
                f"{len(self._window) - 1} polls, and nothing was delivered")
