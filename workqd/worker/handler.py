"""The handler thread: runs one task at a time, hands each result back to the I/O loop.

Ownership: this thread alone writes ``running`` and the slot's busy word and
message id (``Slot.begin``/``Slot.end``); the I/O thread only reads them. It also
raises the draining flag of a recycling worker as it begins the last task. A
task's start time is written on its Delivery before the Delivery is published as
``running``, so a reader never sees a task without its start time. Results travel
back through a deque: the handler thread writes the run's outcome on the Delivery
(fields of its own, intake.py), then appends it. No record is built per task. The
eventfd is written only when the I/O thread is not already due to look, and not
for a success this thread acked itself (prefetch 1, settle.py's
``ack_from_handler``): the I/O thread reads that one when it wakes for the next
delivery or at its tick, unless it asked to hear of every result (``wake_always``).

The loop runs once per task, so it is written for speed: locals for
everything it touches, no helper frames on the common path.

Whatever a handler raises is its task's outcome, SystemExit included: a handler
ends no worker. Anything else that ends this thread is a fault of workqd's own
code, and the task it holds would wait for its timeout with nobody to settle it:
the worker leaves at once instead, with nothing acked, so the broker hands every
task it held to another worker (``_last_resort``).
"""

from __future__ import annotations

import collections
import logging
import os
import queue as queue_mod
import threading
import time
from typing import Callable

from .. import exitcodes, runner, vocab
from ..slots import Slot
from ..task import Reject, RetryLater, Task
from .intake import Delivery, published_at

log = logging.getLogger("workqd.worker")


SUCCESS = vocab.SUCCESS


class HandlerThread:
    def __init__(self, run: Callable[[bytes, Task], None], slot: Slot, timeout: float,
                 on_leaving: Callable[[], None] = lambda: None,
                 cancelled: Callable[[Task], int] | None = None):
        self._run = run
        # When the task's id was cancelled (0: it was not); a task cancelled while it
        # waited behind others here is handed back unrun (the I/O thread settles it).
        self._cancelled = cancelled
        self._slot = slot
        self._timeout = timeout   # the queue's: each task's deadline is its start plus this
        self._on_leaving = on_leaving
        # A recycling worker's last task, when it runs next (I/O thread writes it once,
        # before submitting it). This thread raises the slot's draining flag as it
        # begins that task: raised before, the master would see, for as long as this
        # thread takes to wake, a worker that holds a task as leaving with nothing.
        self.last: Delivery | None = None
        self._tasks: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        # The queue's own C methods, not wrappers: the I/O thread calls them per task.
        self.submit: Callable[[Delivery], None] = self._tasks.put
        # Nothing queued for this thread (it may still be finishing the current task).
        self.idle: Callable[[], bool] = self._tasks.empty
        self.results: collections.deque[Delivery] = collections.deque()   # run, unread
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Set by this thread when it writes the eventfd, cleared by the I/O
        # thread before it drains: at worst one extra wake-up, never a missed one.
        self.wake_pending = False
        # False: a success this thread acked itself is appended without a wake-up;
        # the I/O thread, about to wake for the next delivery anyway, reads it then,
        # or at its next tick (Worker._settle_results). True (the I/O thread's word):
        # every result wakes it, for a worker that stops or a queue with limits.
        self.wake_always = True
        # The Delivery being run, its ``started`` already set (this thread writes it).
        self.running: Delivery | None = None
        self._thread = threading.Thread(target=self._last_resort, name="handler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def busy(self) -> bool:
        """A task queued, running or with its result unread (I/O thread). A task settled
        as timed out (abandoned) no longer counts: its thread may never return."""
        running = self.running
        return ((running is not None and not running.abandoned)
                or not self._tasks.empty() or bool(self.results))

    def take_unstarted(self) -> list[Delivery]:
        """Deliveries submitted but not started; they will not run here."""
        taken = []
        while True:
            try:
                taken.append(self._tasks.get_nowait())
            except queue_mod.Empty:
                return taken

    def results_due(self) -> collections.deque[Delivery]:
        """The deliveries run, to drain now (I/O thread, on the eventfd): pop them from the left."""
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass
        self.wake_pending = False  # before draining: a later append wakes us again
        return self.results

    def _last_resort(self) -> None:
        try:
            self._loop()
        except BaseException:   # noqa: B036 - the thread's end, whatever ended it
            running = self.running
            log.critical("internal error in the handler thread%s; this worker leaves now "
                         "without settling anything, and the broker hands the tasks it "
                         "held to another worker",
                         f" running task {running.task.message_id}" if running else "",
                         exc_info=True)
            os._exit(exitcodes.WORKER_CRASH)

    def _loop(self) -> None:
        slot, run, tasks, results = self._slot, self._run, self._tasks, self.results
        timeout, monotonic, now = self._timeout, time.monotonic, time.time
        debug = log.isEnabledFor(logging.DEBUG)
        cancelled = self._cancelled
        while True:
            d = tasks.get()
            task = d.task
            if cancelled is not None and cancelled(task):
                d.ran_for, d.outcome, d.failure = 0.0, vocab.DEAD_LETTER, "cancelled before it ran"
                results.append(d)
                if not self.wake_pending:
                    self.wake_pending = True
                    os.eventfd_write(self.wake_fd, 1)
                continue
            # Time in the queue, for first deliveries of a first try only: a retry's
            # or a redelivery's wait would include earlier runs and backoff delays.
            wait = None
            props = d.props
            if task.attempt == 1 and not task.redelivered:
                t = now()
                published = published_at(props, t)   # here, not on the busier I/O thread
                if published is not None:
                    wait = max(0.0, t - published)
            d.started = started = monotonic()
            slot.begin(task.message_id, task.redelivered, started, wait)
            task.deadline = started + timeout
            self.running = d
            if d is self.last:
                slot.set_draining()
                self._on_leaving()
            if debug:
                log.debug("task %s started", task.message_id)
            try:
                run(d.body, task)
                outcome, error = SUCCESS, ""
            except runner.HandlerTimedOut as e:
                outcome, error = vocab.TIMEOUT, str(e)
            except runner.HandlerCancelled as e:
                # Stopped on the I/O thread's word: it settles the task as cancelled.
                outcome, error = vocab.DEAD_LETTER, str(e)
            except Reject as e:
                # The handler's own verdict: no retry can help this task.
                outcome, error = vocab.DEAD_LETTER, runner.error_line(e)
                log.warning("task %s rejected by its handler: %s", task.message_id, error)
            except RetryLater as e:
                # Not a failure of the task: something it needs is not there now.
                outcome, error = vocab.DEFERRED, runner.error_line(e)
                d.defer_for = e.delay
            except Exception as e:
                outcome, error = vocab.RETRY, runner.error_line(e)
                log.warning("task %s failed: %s", task.message_id, error,
                            exc_info=not isinstance(e, runner.HandlerFailed))
            except BaseException as e:   # noqa: B036 - sys.exit() in a handler is a failure
                outcome, error = vocab.RETRY, runner.error_line(e)
                log.warning("task %s failed: its handler raised %s, which ends the task, "
                            "not the worker", task.message_id, error)
            d.ran_for = ran_for = monotonic() - started
            settler = d.settler
            if settler.direct_ack and outcome == SUCCESS and not props.reply_to:
                # The broker's next delivery need not wait for the I/O thread to wake;
                # whoever acks a success counts it.
                try:
                    settler.ack_from_handler(d, lambda: slot.record(SUCCESS, ran_for))
                except Exception:   # never the end of this thread: the I/O thread acks it
                    log.exception("internal error acking task %s on the handler thread",
                                  task.message_id)
            d.outcome, d.failure = outcome, error
            self.running = None
            slot.end()
            results.append(d)
            if not self.wake_pending and (self.wake_always or not d.acked):
                self.wake_pending = True
                os.eventfd_write(self.wake_fd, 1)
