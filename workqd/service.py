"""Does the broker serve a queue that our workers consume? Judged after each depth poll.

Either of two signs is enough:

- **too few consumers**: the broker counts fewer consumers of the queue than consume
  from it here. A quorum queue whose leader is gone answers a passive declare through
  a new leader that does not know our consumers, or with 0.
- **starved**: tasks wait, a worker here sits idle with room for one, and between two
  polls nothing was delivered here. The leader of a quorum queue that lost its quorum
  goes on answering from its last committed state, consumers included, so the first
  sign never shows; this one does. It does not apply to a queue with a single active
  consumer, where idle consumers beside the active one are the point, nor to a queue
  workqd did not declare (it may have one).

A sign must hold for ``UNSERVED_AFTER`` polls in a row: one sample can be a late one
(a queue just declared answers with 0 consumers for a moment).

Pure logic, no I/O: the master feeds it samples; tests/unit/test_service.py drives it.
"""

from __future__ import annotations

from dataclasses import dataclass

UNSERVED_AFTER = 2


@dataclass(frozen=True)
class Sample:
    ready: int                 # the broker's count of tasks waiting in the queue
    broker_consumers: int      # the broker's count of consumers, from every host
    consuming: int             # workers consuming from it here
    idle: int                  # of those, how many run no task
    progress: frozenset        # (pid, tasks settled, busy) of each worker: moves on a delivery


class ServiceJudge:
    """One queue's verdict, carried from poll to poll."""

    def __init__(self, starvation_applies: bool):
        self.starvation_applies = starvation_applies
        self._previous: Sample | None = None
        self._strikes = 0
        self.sign = ""             # why it looks unserved, for the log and /readyz

    @property
    def unserved(self) -> bool:
        return self._strikes >= UNSERVED_AFTER

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
        if now is None or now.consuming == 0:
            return ""   # nothing consumes here (paused, reconnecting): nothing to judge
        if now.broker_consumers < now.consuming:
            return (f"the broker counts {now.broker_consumers} consumer(s) but "
                    f"{now.consuming} consume here")
        if (self.starvation_applies and before is not None
                and before.ready > 0 and now.ready > 0 and before.idle > 0 and now.idle > 0
                and before.progress == now.progress):
            return (f"{now.ready} task(s) wait and {now.idle} worker(s) here are idle, "
                    f"but the broker delivered nothing since the last poll")
        return ""
