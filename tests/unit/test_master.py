"""The master's decisions as one state machine, without processes.

The Master runs with fake fork, kill, waitpid, clock and poller (its seams);
hypothesis drives it through long random sequences of everything that can
happen to it -- signals of any number, worker exits by any status or signal,
workers reporting, reloads (good and refused), control commands, HTTP
requests, the broker coming and going, a slot table too small -- and checks
the invariants after every step. Plus the table itself and the small decisions
around it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

from workqd import config, exitcodes, phases, pool as poolmod, slots as slotmod, state
from workqd.control import ProtocolError
from workqd.httpd import Request
from workqd.master import Master
from workqd.signals import signame
from workqd.slots import COUNTER_WORDS, OUTCOME_WORDS, SlotTable

CAPACITY = 6   # small on purpose: reloads and scale-ups run the table full


def _cfg(queues: list[dict]) -> config.Config:
    for q in queues:
        q.setdefault("handler", {"python": "m:f"})
    return config.parse({"queues": queues}, "t.yaml")


CONFIGS = [
    _cfg([{"name": "a", "workers": 2}]),
    _cfg([{"name": "a", "workers": 3}, {"name": "b", "workers": 1}]),
    _cfg([{"name": "b", "workers": {"min": 1, "max": 3}}]),
    _cfg([{"name": "a", "workers": 1}, {"name": "c", "workers": 2, "import_timeout": 5}]),
]
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGHUP,
           signal.SIGCHLD, signal.SIGUSR1, signal.SIGRTMIN + 1, signal.SIGRTMAX, 100]
EXITS = ([code << 8 for code in (0, 1, 3, 4, 6, 7, 9, 10, 11, 70, 255)]
         + [signal.SIGKILL, signal.SIGSEGV, signal.SIGTERM, signal.SIGRTMIN, signal.SIGRTMIN + 1,
            signal.SIGRTMAX])


class FakeOS:
    """Children as records: spawn, kill and waitpid as the master uses them."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.next_pid = 1000
        self.alive: dict[int, slotmod.Slot | None] = {}   # pid -> slot (None: the poller)
        self.termed: set[int] = set()
        self.zombies: list[tuple[int, int]] = []
        self.expected: dict[int, float] = {}   # pool id -> outcome counts written by workers
        self.forks = 0
        self.obey_term = False
        self.fork_fails = False   # True: fork() fails with EAGAIN (a process limit)
        self.threads_before = set(threading.enumerate())
        self.workers: set[int] = set()    # True: a TERM ends the child at once

    def clock(self) -> float:
        return self.now

    def spawn(self, worker) -> int:
        # The master forks from a single thread, always: no thread besides those the
        # test process had before this master existed (other tests leave daemon
        # threads behind; run alone, that is the main thread only).
        assert set(threading.enumerate()) <= self.threads_before, threading.enumerate()
        if self.fork_fails:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        self.forks += 1
        self.next_pid += 1
        self.alive[self.next_pid] = worker.slot
        self.workers.add(self.next_pid)
        return self.next_pid

    def new_pid(self) -> int:
        self.next_pid += 1
        self.alive[self.next_pid] = None
        return self.next_pid

    def kill(self, pid: int, sig: int) -> None:
        if pid not in self.alive and all(z != pid for z, _ in self.zombies):
            raise ProcessLookupError(pid)
        if pid not in self.alive:
            return   # a zombie takes signals and does nothing
        if sig == signal.SIGKILL:
            self.exit(pid, signal.SIGKILL)
        elif sig in (signal.SIGTERM, signal.SIGINT):
            self.termed.add(pid)
            if self.obey_term:
                self.exit(pid, 0)

    def exit(self, pid: int, status: int) -> None:
        del self.alive[pid]
        self.termed.discard(pid)
        self.zombies.append((pid, status))

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        assert pid == -1 and options == os.WNOHANG
        if self.zombies:
            return self.zombies.pop(0)
        if not self.alive:
            raise ChildProcessError()
        return 0, 0


class FakePoller:
    def __init__(self, fake: FakeOS):
        self.fake = fake
        self.pid = fake.new_pid()
        self.depth: dict[str, tuple[int, int, int]] = {}
        self.connected = False
        self.delayed: int | None = None
        self.rounds = 0
        self.cancels_held = None
        self.schedules = ()

    def manage(self, now: float) -> None:
        if not self.pid:
            self.pid = self.fake.new_pid()

    def on_exit(self, now: float) -> None:
        self.pid = 0

    def stop(self) -> None:
        if self.pid in self.fake.alive:
            self.fake.exit(self.pid, signal.SIGTERM)
        self.pid = 0

    def reconfigure(self, cfg) -> None:
        self.stop()

    def nudge(self) -> None:
        pass

    def fds(self) -> tuple[int, ...]:
        return ()


class Complaints(logging.Handler):
    """Log lines that say the master or a worker record moved off its table."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "no move" in text or "no transition" in text:
            self.lines.append(text)


class MasterMachine(RuleBasedStateMachine):
    sequences = 0   # state machines run
    steps = 0       # rules applied (each one event, then the invariants)
    turns = 0       # turns of the master's loop
    cells: set = set()   # (phase, event) pairs of phases.TABLE the runs went through

    def __init__(self) -> None:
        super().__init__()
        type(self).sequences += 1
        self.fake = FakeOS()
        self.next_cfg = CONFIGS[0]
        self.master = Master(CONFIGS[0], slots=SlotTable(capacity=CAPACITY),
                             clock=self.fake.clock, waitpid=self.fake.waitpid,
                             spawn=self.fake.spawn, kill=self.fake.kill,
                             poller=FakePoller(self.fake), load_config=self.load)
        self.master.configure_logging = lambda *a: None
        dispatch = self.master.dispatch

        def dispatch_and_count(event, **data):
            type(self).cells.add((self.master.phase, event))
            return dispatch(event, **data)
        self.master.dispatch = dispatch_and_count
        for queue in CONFIGS[0].queues:
            self.master.add_pool(queue)
        self.done = False
        self.complaints = Complaints()
        logging.getLogger("workqd").addHandler(self.complaints)
        logging.getLogger("workqd").propagate = False   # thousands of runs: keep only complaints
        self.turn()

    def load(self, path):
        if self.next_cfg is None:
            raise config.ConfigError(["t.yaml: queues: refused on purpose"])
        return self.next_cfg

    def teardown(self) -> None:
        logging.getLogger("workqd").removeHandler(self.complaints)
        logging.getLogger("workqd").propagate = True
        self.master.sel.close()
        sq = self.master.signals
        for fd in (sq.read_fd, sq._sig_w, sq.wake_r, sq.wake_w):
            os.close(fd)

    # --- helpers -----------------------------------------------------------

    def turn(self, *sigs: int) -> None:
        type(self).turns += 1
        if not self.done:
            self.done = self.master.turn(self.fake.now, list(sigs))

    def procs(self):
        return [p for pool in [*self.master.pools.values(), *self.master._orphans]
                for p in pool.procs.values()]

    def child(self, i: int):
        live = sorted(pid for pid, slot in self.fake.alive.items() if slot is not None)
        if not live:
            return None, None
        pid = live[i % len(live)]
        return pid, self.fake.alive[pid]

    # --- events --------------------------------------------------------------

    @rule(sig=st.sampled_from(SIGNALS))
    def a_signal(self, sig):
        self.turn(sig)

    @rule(i=st.integers(0, 50), word=st.sampled_from(
        ["importing", "connecting", "consuming", "paused", "draining", "tick"]))
    def a_worker_reports(self, i, word):
        pid, slot = self.child(i)
        if slot is None:
            return
        if word == "importing":
            slot.set_state(slotmod.IMPORTING)
        elif word == "connecting":
            slot.set_state(slotmod.CONNECTING)
        elif word == "consuming":
            slot.subscribed()
        elif word == "paused" and slot.paused:
            slot.set_state(slotmod.PAUSED)
        elif word == "draining":
            slot.set_draining()
        slot._d[slot._base + slotmod.W_TICK] = self.fake.now
        self.turn()

    @rule(i=st.integers(0, 50), outcome=st.integers(0, len(OUTCOME_WORDS) - 1),
          finish=st.booleans())
    def a_worker_runs_a_task(self, i, outcome, finish):
        pid, slot = self.child(i)
        if slot is None or slot.state != slotmod.CONSUMING:
            return
        if not slot.busy:
            slot.begin(f"m-{pid}-{slot.consumed}", False, self.fake.now)
        if finish:
            slot.end()
            slot.record(outcome, 0.01)
            self.fake.expected[slot.pool_id] = self.fake.expected.get(slot.pool_id, 0) + 1
        self.turn()

    @rule(i=st.integers(0, 50), status=st.sampled_from(EXITS))
    def a_worker_dies(self, i, status):
        pid, slot = self.child(i)
        if slot is not None:
            self.fake.exit(pid, status)
        self.turn()

    @rule()
    def workers_obey_term(self):
        for pid in list(self.fake.termed):
            self.fake.exit(pid, 0)
        self.turn()

    @rule()
    def the_poller_dies(self):
        pid = self.master.poller.pid
        if pid in self.fake.alive:
            self.fake.exit(pid, signal.SIGKILL)
        self.turn()

    @rule(k=st.integers(0, len(CONFIGS)))
    def a_reload(self, k):
        self.next_cfg = CONFIGS[k] if k < len(CONFIGS) else None   # None: refused
        self.turn(signal.SIGHUP)

    @rule(cmd=st.sampled_from(["status", "pause", "resume", "quiet", "scale", "scale", "bogus"]),
          queue=st.sampled_from([None, "a", "b", "c", "x"]), n=st.integers(-1, 300))
    def a_control_command(self, cmd, queue, n):
        req = {"v": 1, "cmd": cmd, "workers": n}
        if queue is not None:
            req["queue"] = queue
        try:
            answer = self.master.serve_control(req)
            assert answer["ok"] is True
        except ProtocolError:
            pass   # the error answer workqctl gets
        self.turn()

    @rule(path=st.sampled_from(["/metrics", "/healthz", "/readyz", "/nope"]))
    def an_http_request(self, path):
        r = self.master.serve_http(Request("GET", path, "", {}))
        assert r.status in (200, 404, 503)
        self.turn()

    @rule(up=st.booleans(), ready=st.integers(0, 20))
    def the_broker(self, up, ready):
        poller = self.master.poller
        poller.connected = up
        if up:
            poller.depth = {name: (ready, 0, 0) for name in self.master.pools}
        poller.rounds += 1
        self.turn()

    @rule(fails=st.booleans())
    def the_process_limit(self, fails):
        self.fake.fork_fails = fails
        self.turn()

    @rule(dt=st.sampled_from([0.05, 0.6, 2.0, 6.0, 31.0, 130.0]))
    def time_passes(self, dt):
        self.fake.now += dt
        self.turn()

    @precondition(lambda self: not self.done)
    @rule()
    def everything_settles(self):
        """Workers come up and obey; then every pool is at its size, or the slot table
        is full, and the master is ready (unless it is stopping)."""
        # Long enough for the longest backoff before FATAL (0.5+1+2+4 s) and a
        # reload's one-by-one takeover.
        self.fake.fork_fails = False
        for _ in range(12):
            for pid, slot in list(self.fake.alive.items()):
                if slot is None:
                    continue
                if pid in self.fake.termed:
                    self.fake.exit(pid, 0)
                    continue
                if slot.paused:
                    slot.set_state(slotmod.PAUSED)
                elif not slot.draining:
                    slot.subscribed()
                slot._d[slot._base + slotmod.W_TICK] = self.fake.now + 1.0
                if slot.busy:
                    slot.end()
            self.fake.now += 1.0
            self.turn()
            if self.done:
                return
        m = self.master
        if m.phase == state.STOPPING:
            return
        for pool in m.pools.values():
            if pool.removed or pool.state == poolmod.FATAL:
                continue
            full = len(self.procs()) == CAPACITY
            assert len(pool.current()) == pool.size or full, (
                pool.name, len(pool.current()), pool.size, len(self.procs()))
        assert m.phase == state.READY or m._spawn_blocked, m.phase

    # --- invariants, after every step -----------------------------------------

    @invariant()
    def no_slot_shared_and_none_freed_under_a_live_worker(self):
        type(self).steps += 1
        procs = self.procs()
        indices = [p.slot.index for p in procs]
        assert len(indices) == len(set(indices)), indices
        for p in procs:
            assert p.slot.state != slotmod.FREE and p.slot.pid == p.pid
        assert len(procs) <= CAPACITY

    @invariant()
    def counters_survive_every_death(self):
        """Nothing a worker counted is lost: a slot is freed only after its counters
        are folded (a freed slot is scribbled over at once, see freed_slots_are_reused)."""
        seen: dict[int, float] = {}
        for pool_id in self.fake.expected:
            seen[pool_id] = sum(self.master.totals.get(pool_id)[w] for w in OUTCOME_WORDS)
        for p in self.procs():
            pid = p.slot.pool_id
            seen[pid] = seen.get(pid, 0) + sum(p.slot.counters()[w] for w in OUTCOME_WORDS)
        for pool_id, n in self.fake.expected.items():
            assert seen.get(pool_id, 0) == n, (pool_id, seen, self.fake.expected)

    @invariant()
    def within_the_cap(self):
        current = sum(len(p.current()) for p in self.master.pools.values())
        assert current <= config.MAX_TOTAL_WORKERS

    @invariant()
    def every_move_along_a_table(self):
        assert not self.complaints.lines and self.master.refused_moves == 0, \
            self.complaints.lines

    @invariant()
    def stopped_means_nothing_left(self):
        if self.done:
            worker_zombies = [pid for pid, _ in self.fake.zombies if pid in self.fake.workers]
            assert not self.procs() and not worker_zombies
            assert not any(p for p, s in self.fake.alive.items() if s is not None)
            table = self.master.slots
            assert all(table._q[i * slotmod.SLOT_WORDS + slotmod.W_STATE] == slotmod.FREE
                       for i in range(table.capacity))


@pytest.fixture
def freed_slots_are_reused(monkeypatch):
    """A freed slot's counters are zeroed at once, as a new worker's allocation would."""
    release = slotmod.Slot.release

    def release_and_scribble(slot):
        release(slot)
        for w in COUNTER_WORDS:
            slot._q[slot._base + w] = 0
    monkeypatch.setattr(slotmod.Slot, "release", release_and_scribble)


def test_the_master_as_a_state_machine(freed_slots_are_reused):
    MasterMachine.sequences = MasterMachine.steps = MasterMachine.turns = 0
    MasterMachine.cells = set()
    examples = int(os.environ.get("WORKQ_MASTER_EXAMPLES", "1500"))
    started = time.monotonic()
    run_state_machine_as_test(MasterMachine, settings=settings(
        max_examples=examples,
        # Derandomized: the same sequences every run, so the cell coverage asserted
        # below is a property of the test, not of a lucky draw.
        stateful_step_count=40, deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck)))
    took = time.monotonic() - started
    print(f"\nmaster state machine: {MasterMachine.sequences} sequences, "
          f"{MasterMachine.steps} steps, {MasterMachine.turns} loop turns, {took:.1f}s")
    # The random runs reach every cell of the table but those no sequence can:
    # workers are all up before READY, and a pool fails only while it runs.
    unreachable = {(state.READY, phases.ALL_CONSUMING), (state.STOPPING, phases.SLOTS_FULL),
                   (state.STOPPING, phases.FORK_FAILED), (state.STOPPING, phases.POOL_FATAL),
                   (state.STOPPING, phases.ALL_CONSUMING), (state.STARTING, phases.RELOAD_OVERDUE),
                   (state.READY, phases.RELOAD_OVERDUE), (state.STOPPING, phases.RELOAD_OVERDUE)}
    every = {(ph, ev) for ev in phases.TABLE for ph in phases.PHASE_ORDER}
    missed = every - unreachable - MasterMachine.cells
    print(f"table cells visited: {len(MasterMachine.cells)} of {len(every)}; missed: {missed}")
    assert not missed or examples < 1000
    assert MasterMachine.sequences >= examples and MasterMachine.steps >= 20 * MasterMachine.sequences


# --- the table and the small decisions around it ------------------------------------

def test_every_phase_has_an_answer_for_every_event_and_the_master_a_method_for_it():
    for event, row in phases.TABLE.items():
        assert len(row) == len(phases.PHASE_ORDER), event
    assert set(phases.PHASE_ORDER) == set(state.PHASES)
    missing = [a for a in phases.actions() if not callable(getattr(Master, f"do_{a}", None))]
    assert missing == []
    assert phases.decide(state.STARTING, phases.SIG_HUP) == "reload_at_start"
    assert phases.decide(state.STOPPING, phases.SIG_HUP) == "ignore_reload"
    assert phases.decide(state.READY, "an event nobody listed") == "nothing"


@pytest.mark.parametrize("sig, name", [
    (signal.SIGTERM, "SIGTERM"), (signal.SIGRTMIN, "SIGRTMIN"),
    (signal.SIGRTMIN + 1, "SIGRTMIN+1"), (200, "signal 200")])
def test_any_signal_number_has_a_name(sig, name):
    assert signame(sig) == name


def test_a_worker_killed_by_a_real_time_signal_is_a_crash():
    proc = poolmod.WorkerProc(1, 1, None)
    ex = poolmod.classify(proc, signal.SIGRTMIN + 1, None, True)
    assert ex.kind == poolmod.CRASHED and ex.how == "killed by SIGRTMIN+1"


def _master(cfg, capacity=CAPACITY):
    fake = FakeOS()
    m = Master(cfg, slots=SlotTable(capacity=capacity), clock=fake.clock,
               waitpid=fake.waitpid, spawn=fake.spawn, kill=fake.kill,
               poller=FakePoller(fake), load_config=lambda path: cfg)
    m.configure_logging = lambda *a: None
    for q in cfg.queues:
        m.add_pool(q)
    return m, fake


def test_a_full_slot_table_defers_the_spawn_and_says_so_once(caplog):
    m, fake = _master(_cfg([{"name": "a", "workers": 3}]), capacity=2)
    with caplog.at_level(logging.INFO, "workqd"):
        for _ in range(5):
            assert m.turn(fake.now, []) is False
            fake.now += 1
    lines = [r.getMessage() for r in caplog.records if "cannot start a worker" in r.getMessage()]
    assert lines == ["queue a: cannot start a worker: no free worker slot (2 in use); "
                     "trying again as workers leave"]
    assert len(m.pools["a"].procs) == 2
    pid = next(iter(m.pools["a"].procs))
    fake.exit(pid, signal.SIGKILL)       # one leaves: its slot is free again
    with caplog.at_level(logging.INFO, "workqd"):
        m.turn(fake.now, [])
        m.turn(fake.now, [])
    assert len(m.pools["a"].procs) == 2 and "workers can be started again" not in caplog.text
    pool = m.pools["a"]
    pool.size = 2
    with caplog.at_level(logging.INFO, "workqd"):
        m.turn(fake.now, [])
    assert "workers can be started again" in caplog.text


def test_a_reload_while_starting_replaces_the_starting_workers_at_once():
    cfg = _cfg([{"name": "a", "workers": 2}])
    m, fake = _master(cfg)
    m.turn(fake.now, [])
    old = set(m.pools["a"].procs)
    m.turn(fake.now, [signal.SIGHUP])
    assert m.phase == state.STARTING
    assert old <= fake.termed                      # TERM at once, no waiting for takeover
    assert len(m.pools["a"].current()) == 2 and not old & {p.pid for p in m.pools["a"].current()}
    for pid in list(fake.termed):
        fake.exit(pid, 0)
    for p in m.pools["a"].current():
        p.slot.subscribed()
    m.turn(fake.now, [])
    assert m.phase == state.READY


def test_scale_counts_the_other_queues_at_their_autoscale_max():
    cfg = _cfg([{"name": "auto", "workers": {"min": 1, "max": 250}},
                {"name": "plain", "workers": 1}])
    m, fake = _master(cfg)
    with pytest.raises(ProtocolError, match="at most 256 workers in all; the other "
                                            "queues may have 250"):
        m.serve_control({"v": 1, "cmd": "scale", "queue": "plain", "workers": 10})
    assert m.serve_control({"v": 1, "cmd": "scale", "queue": "plain", "workers": 6})["ok"]
    # The autoscaled queue itself counts at its max too, whatever size it is scaled to.
    with pytest.raises(ProtocolError, match="the other queues may have 6"):
        m.serve_control({"v": 1, "cmd": "scale", "queue": "auto", "workers": 251})
    assert m.serve_control({"v": 1, "cmd": "scale", "queue": "auto", "workers": 2})["ok"]


def test_the_import_budget_and_the_hang_clock_are_apart():
    cfg = _cfg([{"name": "a", "workers": 1, "import_timeout": 10}])
    m, fake = _master(cfg)
    pool = m.pools["a"]
    pool.hung_after = 1.0
    m.turn(fake.now, [])
    (proc,) = pool.procs.values()
    proc.slot.set_state(slotmod.IMPORTING)
    proc.slot._d[proc.slot._base + slotmod.W_TICK] = fake.now
    fake.now += 9.0                       # far past the hang clock, inside the import budget
    m.turn(fake.now, [])
    assert proc.state == poolmod.IMPORTING and proc.pid in fake.alive
    fake.now += 1.5                       # past the import budget: killed, a boot failure
    m.turn(fake.now, [])
    assert proc.state == poolmod.KILLED
    m.turn(fake.now, [])                  # reaped
    assert proc.pid not in pool.procs and pool.state == poolmod.BACKOFF
    assert pool.boot_failures == 1 and pool.restarts["crash"] == 1


def test_the_last_net_stops_every_child_and_exits_internal_error(caplog):
    m, fake = _master(_cfg([{"name": "a", "workers": 2}]))
    m.turn(fake.now, [])
    assert len(m.pools["a"].procs) == 2
    fake.obey_term = True
    with caplog.at_level(logging.INFO, "workqd"):
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            code = m.stop_after_bug()
    assert code == exitcodes.INTERNAL_ERROR == 1
    assert not fake.alive and not fake.zombies
    assert caplog.text.count("Traceback") == 1 and "ZeroDivisionError: boom" in caplog.text


# --- a reload as a plan ---------------------------------------------------------------

def test_plan_reload_adds_removes_readds_and_updates_without_touching_anything():
    from workqd import reloadplan as rp
    old = _cfg([{"name": "a", "workers": 2}, {"name": "b", "workers": 1},
                {"name": "c", "workers": 1}])
    new = config.parse({"queues": [{"name": "a", "workers": 3, "handler": {"python": "m:f"}},
                                   {"name": "c", "workers": 1, "handler": {"python": "m:f"}},
                                   {"name": "d", "workers": 1, "handler": {"python": "m:f"}}],
                        "metrics": {"listen": "127.0.0.1:9999"},
                        "control": {"socket": "/tmp/other.sock"}}, "t.yaml")
    pools = {"a": rp.PoolView("a", 5, False), "b": rp.PoolView("b", 1, False),
             "c": rp.PoolView("c", 1, True)}
    plan = rp.plan_reload(old, new, pools)
    assert [(s.kind, s.name, s.was) for s in plan.steps] == [
        (rp.REMOVE, "b", 0), (rp.UPDATE, "a", 5), (rp.READD, "c", 0), (rp.ADD, "d", 0)]
    assert plan.kept_metrics and plan.kept_control_socket
    assert plan.config.metrics_listen == old.metrics_listen
    assert plan.config.control_socket == old.control_socket
    assert [q.name for q in plan.config.queues] == ["a", "c", "d"]
    same = rp.plan_reload(old, old, {n: rp.PoolView(n, 1, False) for n in ("a", "b", "c")})
    assert not same.kept_metrics and not same.kept_control_socket
    assert {s.kind for s in same.steps} == {rp.UPDATE}
