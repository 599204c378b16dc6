"""Periodic tasks that fire once per slot however many hosts run them.

The slot logic is pure (``Slots``, ``plan``, ``slot_id``); the rest runs in a
thread of the queue poller child (poller.py) on a connection of its own, never
the poller's: a memory or disk alarm blocks a connection that publishes, and
firings must not stop the depth polling and the cancel log with them.

- Leadership, per schedule: the holder is the one connection that could declare
  the exclusive queue ``workq.schedule.<name>.leader``. The broker deletes an
  exclusive queue when its connection goes (a killed daemon, a lost node, missed
  heartbeats), and the others try to declare it every CLAIM_EVERY seconds.
- The record: the quorum queue ``workq.schedule.<name>`` (at most one message,
  overflow drop-head) holds the last slot handled. The leader reads it when it
  takes over and writes it after each firing is confirmed, so a new leader
  neither skips a slot nor repeats one, but for the one whose record a dying
  leader did not write: that one is fired again, with the same message id.
- A firing is published persistent, mandatory and confirmed, with the message
  id ``<name>@<slot, UTC ISO 8601>``, so a handler can tell a failover duplicate.
- An alarm: a publish on a blocked connection waits at most BLOCKED_TIMEOUT, then
  pika closes the connection and the leadership goes with it. The host logs one
  line, tries again every ALARM_RETRY seconds, and once publishes pass again fires
  what ``plan`` says is due: the slots missed within GRACE, older ones per catch_up.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from . import cron
from .state import ScheduleView

log = logging.getLogger("workqd.master")

UTC = dt.timezone.utc
GRACE = 60.0            # seconds a slot may be late and still fire, catch_up or not
MAX_FIRE = 120          # slots one leader fires in one step: a bound, not a rate
CLAIM_EVERY = 2.0       # seconds between a follower's tries to take the lead
FOLLOW_EVERY = 5.0      # seconds between a follower's reads of the record
RECORD_READ = 5         # messages read from the record queue to find its newest
# The record queue keeps one message. Followers read it with get and requeue, which
# counts as a delivery; RabbitMQ 4 drops a quorum queue's message after 20 by default,
# so the limit is set out of reach (a read every 5 s per host).
RECORD_ARGUMENTS = {"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "drop-head",
                    "x-delivery-limit": 1_000_000_000}
IO_EVERY = 0.25         # seconds between steps: a slot fires within this of its time
BLOCKED_TIMEOUT = 5.0   # seconds a publish may wait on a blocked connection (an alarm)
ALARM_RETRY = 5.0       # seconds between tries to fire while the broker blocks publishing
RECONNECT_EVERY = 1.0   # seconds between connects after a connection is lost
# pika's blocking calls have no deadline of their own: a node can keep the connection
# up and leave one unanswered (a quorum record queue whose leader was just lost kept a
# basic_get waiting for minutes), while this host holds the lead and fires nothing.
# A loop turn in which the broker has confirmed nothing for this long ends the poller
# child; the master starts another.
STUCK_AFTER = 60.0
H_SCHEDULE = "x-workq-schedule"   # header: the schedule a firing came from
H_SLOT = "x-workq-slot"           # header: the slot it fired for, UTC ISO 8601


def leader_queue(name: str) -> str:
    return f"workq.schedule.{name}.leader"


def record_queue(name: str) -> str:
    return f"workq.schedule.{name}"


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_iso(text) -> float | None:
    if not isinstance(text, str) or not text.endswith("Z"):
        return None
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def slot_id(name: str, slot: float) -> str:
    """The message id of the firing of ``name`` for ``slot``: the same on every host."""
    return f"{name}@{iso(slot)}"


class Slots:
    """When a schedule fires: ``next_after(t)`` is its first slot strictly after ``t``
    (seconds since the epoch, whole seconds). ``every`` slots are whole multiples of the
    period since the epoch, so every host agrees on them without talking."""

    def __init__(self, cron_text: str | None = None, every: float | None = None,
                 timezone: str = "UTC"):
        self.every = int(every) if every else None
        self.cron = cron.parse(cron_text) if cron_text is not None else None
        self.tz = cron.zone(timezone)
        self._memo: tuple[float | None, float | None] = (None, None)
        if (self.every is None) == (self.cron is None):
            raise ValueError("give exactly one of cron and every")

    def next_after(self, t: float) -> float | None:
        if self.every:
            return float((int(t // self.every) + 1) * self.every)
        memo = self._memo   # read once: the poller's report asks from another thread
        if memo[0] != t:   # a leader asks the same question every step until a slot
            nxt = self.cron.next_after(dt.datetime.fromtimestamp(int(t), UTC), self.tz)
            memo = (t, None if nxt is None else nxt.timestamp())
            self._memo = memo
        return memo[1]

    def newest_before(self, t: float, floor: float) -> float | None:
        """The newest slot in (floor, t), None if there is none. Looks back over a window
        that doubles from an hour, so a year of downtime costs a few dozen steps, not a
        step per missed slot."""
        window = 3600.0
        while True:
            start = max(floor, t - window)
            s = self.next_after(start)
            if s is not None and s < t:
                newest = s
                while True:
                    s = self.next_after(s)
                    if s is None or s >= t:
                        return newest
                    newest = s
            if start <= floor:
                return None
            window *= 2


def plan(slots: Slots, handled: float, now: float, catch_up: str) -> tuple[list[float], float]:
    """(slots to fire in order, the newest slot handled after them). A slot due no more
    than GRACE seconds ago is on time and fires; older ones were missed while no leader
    ran: catch_up "last" fires the newest of them, when no on-time slot supersedes it;
    "none" skips them."""
    fire: list[float] = []
    newest_missed = None
    s = slots.next_after(handled)
    if s is not None and s < now - GRACE:
        newest_missed = slots.newest_before(now - GRACE, handled)
        handled = newest_missed
        s = slots.next_after(handled)
    while s is not None and s <= now and len(fire) < MAX_FIRE:
        fire.append(s)
        handled = s
        s = slots.next_after(s)
    if catch_up == "last" and newest_missed is not None and not fire:
        fire.append(newest_missed)
    return fire, handled


def host_name() -> str:
    return f"{socket.gethostname()} (pid {os.getpid()})"


# --- the master's part: the poller's report ------------------------------------

def views(raw, fired_before: dict[str, int]) -> tuple[ScheduleView, ...]:
    """The poller child's report of its schedules as the master's views, with the firings
    of earlier pollers added; a field of the wrong type reads as unknown."""
    if not isinstance(raw, dict):
        return ()
    out = []
    for name, v in raw.items():
        if not isinstance(v, dict):
            continue
        fired = v.get("fired")
        fired = fired if type(fired) is int and fired >= 0 else 0
        out.append(ScheduleView(
            name=str(name), queue=str(v.get("queue", "")), leading=v.get("leading") is True,
            leader=str(v.get("leader") or ""), last_fired=_stamp(v.get("last_fired")),
            next=_stamp(v.get("next")), fired=fired + fired_before.get(name, 0)))
    return tuple(out)


def _stamp(v) -> float | None:
    return float(v) if type(v) in (int, float) else None


# --- the poller child's part -----------------------------------------------------

@dataclass
class State:
    """What this host knows of one schedule; the poller child's only, across connections."""
    schedule: object              # config.Schedule
    slots: Slots
    handled: float | None = None  # the newest slot handled (fired or skipped), as recorded
    fired_at: float | None = None  # the newest slot fired, as recorded
    leader: str = ""              # who wrote the record last (the leader, as far as known)
    holding: bool = False         # this connection declared the leader queue
    leading: bool = False         # holding, and the record read: firing
    empty_reads: int = 0          # record reads that found nothing since the claim
    fired: int = 0                # firings this host published, confirmed
    unroutable: bool = False      # the last firing came back unroutable: logged once
    next_claim: float = 0.0
    next_read: float = 0.0

    def view(self, now: float) -> dict:
        base = self.handled if self.handled is not None else now
        nxt = self.slots.next_after(base)
        return {"leading": self.leading, "leader": self.leader, "fired": self.fired,
                "last_fired": self.fired_at, "next": nxt, "queue": self.schedule.queue}


class Scheduler:
    """Every schedule of this daemon, run by a thread of the poller child on a connection
    of its own (``start``); ``report`` is read by the poller's thread."""

    def __init__(self, schedules, clock=time.time):
        self.clock = clock
        self.host = host_name()
        self.states = {s.name: State(s, Slots(s.cron, s.every, s.timezone))
                       for s in schedules}
        self.session: _Session | None = None
        self.held_since: float | None = None   # the broker blocked a publish: held up since
        # time.monotonic() at the start of the thread's latest loop turn, or of the latest
        # publish confirmed within it (a catch-up fires many); None: no thread
        self.turned_at: float | None = None

    def start(self, urls, params_for) -> None:
        """Run the schedules in a thread: ``params_for(url)`` gives the connection parameters
        (the poller's URLs, credentials and TLS). A thread, so that no wait of the schedules
        (a blocked publish, a connect to a hung node) ever holds up the poller's loop."""
        if not self.states:
            return
        self.turned_at = time.monotonic()
        threading.Thread(target=self._main, args=(urls, params_for), daemon=True,
                         name="workqd-schedules").start()

    def stuck_for(self, now: float) -> float:
        """Seconds the schedules thread has gone, inside one loop turn, without a publish
        confirmed (poller thread)."""
        turned = self.turned_at
        return 0.0 if turned is None else max(0.0, now - turned)

    def _main(self, urls, params_for) -> None:
        try:
            self._loop(urls, params_for)
        except BaseException:
            # The poller child goes with it and the master starts another: schedules that
            # silently stopped would be worse.
            log.exception("schedules crashed: the queue poller restarts")
            os._exit(70)

    def _loop(self, urls, params_for) -> None:
        import pika
        import pika.exceptions

        from .broker import Failover, redact
        failover = Failover(urls)
        conn = None
        next_connect = 0.0
        while True:
            self.turned_at = time.monotonic()
            if conn is None:
                wait = next_connect - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, 1.0))
                    continue
                params = params_for(failover.current)
                # A publish the broker blocks (an alarm) gives up after this long, and the
                # connection with it, instead of waiting out the alarm.
                params.blocked_connection_timeout = BLOCKED_TIMEOUT
                try:
                    conn = pika.BlockingConnection(params)
                except (pika.exceptions.AMQPError, OSError) as e:
                    log.debug("schedules: cannot connect to %s: %r", redact(failover.current), e)
                    next_connect = time.monotonic() + max(RECONNECT_EVERY, failover.failed())
                    continue
                failover.succeeded()
            try:
                conn.process_data_events(time_limit=IO_EVERY)
                self.tick(conn)
            except pika.exceptions.ConnectionBlockedTimeout:
                self._blocked()
                next_connect = time.monotonic() + ALARM_RETRY
                conn = _close(conn)
            except (pika.exceptions.AMQPError, OSError) as e:
                log.debug("schedules: connection to %s lost: %r", redact(failover.current), e)
                failover.failed()
                next_connect = time.monotonic() + RECONNECT_EVERY
                conn = _close(conn)

    def _blocked(self) -> None:
        if self.held_since is None:
            self.held_since = self.clock()
            log.warning("schedules: the broker blocks publishing (a memory or disk alarm): "
                        "firing is held up; this host tries again every %gs and then fires "
                        "the slots missed up to %gs before (older ones per catch_up)",
                        ALARM_RETRY, GRACE)

    def published(self) -> None:
        """A publish was confirmed: an alarm that held firing up is over, and the turn
        is making progress."""
        self.turned_at = time.monotonic()
        if self.held_since is not None:
            log.info("schedules: the broker takes publishes again; firing was held up %.0fs",
                     self.clock() - self.held_since)
            self.held_since = None

    def tick(self, conn) -> None:
        """Claim, read, fire what is due. Raises the connection's errors (AMQPError,
        OSError) for the caller to reconnect; a channel's refusal is handled here."""
        if not self.states:
            return
        if self.session is None or self.session.conn is not conn:
            for st in self.states.values():
                st.holding = st.leading = False   # leadership died with the old connection
                st.next_claim = st.next_read = 0.0
            self.session = _Session(conn, self)
        self.session.step(self.clock())

    def report(self) -> dict:
        now = self.clock()
        session = self.session
        connected = session is not None and session.conn.is_open
        views = {name: st.view(now) for name, st in self.states.items()}
        for v in views.values():
            v["leading"] = v["leading"] and connected
        return views


def _close(conn) -> None:
    import pika.exceptions
    try:
        if conn.is_open:
            conn.close()
    except (pika.exceptions.AMQPError, OSError):
        pass
    return None


class _Session:
    """Leadership and channels on one connection; built anew per connection."""

    def __init__(self, conn, scheduler: Scheduler):
        self.conn = conn
        self.sched = scheduler
        self.channel = None        # confirms on: firings and records
        self.declared: set[str] = set()   # record queues declared on this connection
        self.refusals: dict[str, str] = {}  # schedule -> the broker's last refusal, logged

    def step(self, now: float) -> None:
        import pika.exceptions
        for st in self.sched.states.values():
            try:
                self._step_one(st, now)
            except pika.exceptions.ChannelClosedByBroker as e:
                # A channel refused (a record queue deleted under it, say): the next
                # step opens another; the connection and the leadership stay.
                log.warning("schedule %s: the broker closed a channel: %s", st.schedule.name,
                            e.reply_text)
                self.declared.discard(st.schedule.name)

    def _step_one(self, st: State, now: float) -> None:
        if not st.holding and now >= st.next_claim:
            st.next_claim = now + CLAIM_EVERY
            self._claim(st)
        if st.holding and not st.leading and now >= st.next_read:
            self._take_over(st, now)
        if st.leading:
            self._fire_due(st, now)
        elif not st.holding and now >= st.next_read:
            st.next_read = now + FOLLOW_EVERY
            self._read(st)

    def _ch(self):
        if self.channel is None or not self.channel.is_open:
            self.channel = self.conn.channel()
            self.channel.confirm_delivery()
        return self.channel

    def _claim(self, st: State) -> None:
        import pika.exceptions
        name = st.schedule.name
        ch = self.conn.channel()
        try:
            ch.queue_declare(leader_queue(name), exclusive=True, auto_delete=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 405:   # 405 RESOURCE_LOCKED: another connection leads
                log.warning("schedule %s: cannot declare %s: %s", name, leader_queue(name),
                            e.reply_text)
            return
        ch.close()
        st.holding, st.empty_reads, st.next_read = True, 0, 0.0

    def _take_over(self, st: State, now: float) -> None:
        """Start firing once the record is read. An empty record queue is read twice, a
        step apart: a follower may hold the one record for a moment while it reads it."""
        found = self._read(st)
        if found is None:
            st.next_read = now + CLAIM_EVERY   # unreadable: leading blind could repeat slots
            return
        if not found and st.empty_reads == 0:
            st.empty_reads = 1
            return
        if st.handled is None:
            # Never fired anywhere: it starts now, not with the slots of the past.
            st.handled = float(int(now))
        st.leading = True
        st.leader = self.sched.host
        # While an alarm holds firing up, each try takes the lead anew: the alarm's one
        # line says it, not a line per try.
        log.log(logging.DEBUG if self.sched.held_since is not None else logging.INFO,
                "schedule %s: this host leads it now (last fired %s)", st.schedule.name,
                iso(st.fired_at) if st.fired_at is not None else "never")
        self._record(st)

    def _declare_record(self, name: str):
        import pika.exceptions
        ch = self._ch()
        if name not in self.declared:
            try:
                ch.queue_declare(record_queue(name), durable=True, arguments=RECORD_ARGUMENTS)
            except pika.exceptions.ChannelClosedByBroker as e:
                if self.refusals.get(name) != e.reply_text:   # a lasting refusal: one line
                    self.refusals[name] = e.reply_text
                    log.warning("schedule %s: cannot declare its record %s, so no host can "
                                "fire it: %s", name, record_queue(name), e.reply_text)
                return None
            if self.refusals.pop(name, None) is not None:
                log.info("schedule %s: its record %s is usable again", name, record_queue(name))
            self.declared.add(name)
        return self._ch()

    def _read(self, st: State) -> bool | None:
        """Take the newest record into ``st``: True if there was one, False if none, None
        when the record queue is refused."""
        import pika.exceptions
        ch = self._declare_record(st.schedule.name)
        if ch is None:
            return None
        newest = None
        tags = []
        try:
            for _ in range(RECORD_READ):
                method, _props, body = ch.basic_get(record_queue(st.schedule.name))
                if method is None:
                    break
                tags.append(method.delivery_tag)
                rec = _record_of(body)
                if rec is not None and (newest is None or rec[0] >= newest[0]):
                    newest = rec
            if tags:
                ch.basic_nack(tags[-1], multiple=True, requeue=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            log.warning("schedule %s: cannot read its record: %s", st.schedule.name,
                        e.reply_text)
            self.declared.discard(st.schedule.name)
            return None
        if newest is None:
            return False
        handled, fired_at, leader = newest
        if st.handled is None or handled >= st.handled:
            st.handled, st.fired_at, st.leader = handled, fired_at, leader
        return True

    def _record(self, st: State) -> None:
        import pika
        ch = self._declare_record(st.schedule.name)
        if ch is None:
            return
        body = json.dumps({"slot": iso(st.handled), "fired": None if st.fired_at is None
                           else iso(st.fired_at), "leader": st.leader}).encode()
        ch.basic_publish("", record_queue(st.schedule.name), body,
                         pika.BasicProperties(delivery_mode=2, content_type="application/json"))
        self.sched.published()

    def _fire_due(self, st: State, now: float) -> None:
        import pika
        import pika.exceptions
        s = st.schedule
        fire, handled = plan(st.slots, st.handled, now, s.catch_up)
        if handled == st.handled:
            return
        for slot in fire:
            headers = {**dict(s.headers), H_SCHEDULE: s.name, H_SLOT: iso(slot)}
            props = pika.BasicProperties(delivery_mode=2, message_id=slot_id(s.name, slot),
                                         headers=headers, timestamp=int(now),
                                         content_type="application/octet-stream")
            try:
                self._ch().basic_publish("", s.queue, s.body.encode(), props, mandatory=True)
            except pika.exceptions.UnroutableError:
                if not st.unroutable:
                    log.warning("schedule %s: firing %s returned unroutable: no queue %s "
                                "(logged once until one routes)", s.name,
                                slot_id(s.name, slot), s.queue)
                st.unroutable = True
            except pika.exceptions.NackError:
                log.warning("schedule %s: the broker refused firing %s; tried again next "
                            "step", s.name, slot_id(s.name, slot))
                return
            else:
                self.sched.published()
                if st.unroutable:
                    log.info("schedule %s: firings route to %s again", s.name, s.queue)
                st.unroutable = False
                st.fired += 1
                st.fired_at = slot
                log.info("schedule %s: fired %s to %s", s.name, slot_id(s.name, slot), s.queue)
            st.handled = slot
            self._record(st)
        if st.handled != handled:
            st.handled = handled   # skipped slots, missed while no leader ran
            self._record(st)


def _record_of(body: bytes) -> tuple[float, float | None, str] | None:
    """(slot handled, slot fired, leader) of a record, None if it is not one (someone
    else's bytes)."""
    try:
        rec = json.loads(body)
        handled = from_iso(rec["slot"])
        fired = from_iso(rec.get("fired")) if rec.get("fired") is not None else None
        leader = rec.get("leader")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if handled is None or not isinstance(leader, str):
        return None
    return handled, fired, leader[:200]
