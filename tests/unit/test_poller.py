"""The poller keeps the vhost's delay levels for the host's workers: pure logic, a fake
connection in place of the broker."""

from __future__ import annotations

import pika.exceptions

from workqd import cancels, config, delays, poller
from workqd.cancels import CancelTable

CFG = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}}]}, "t.yaml")


class _Conn:
    """A broker whose levels are ``present`` (names); ``refuse``: declaring one is refused."""

    def __init__(self, present=(), refuse=False):
        self.present = set(present)
        self.refuse = refuse
        self.declared = 0   # declarations of a whole topology

    def channel(self):
        return _Channel(self)


class _Channel:
    def __init__(self, conn):
        self.conn = conn
        self.is_open = True

    def _missing(self, name):
        self.is_open = False
        raise pika.exceptions.ChannelClosedByBroker(404, f"NOT_FOUND - no {name}")

    def exchange_declare(self, name, *a, passive=False, **k):
        if passive and name not in self.conn.present:
            self._missing(name)
        if not passive:
            if self.conn.refuse:
                self.is_open = False
                raise pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED")
            if name == delays.DELIVER_EXCHANGE:
                self.conn.declared += 1
            self.conn.present.add(name)

    def queue_declare(self, name, passive=False, **k):
        if passive and name not in self.conn.present:
            self._missing(name)
        self.conn.present.add(name)
        return type("Ok", (), {"method": type("M", (), {"message_count": 1})})

    def queue_bind(self, *a, **k):
        pass

    exchange_bind = queue_bind

    def close(self):
        self.is_open = False


def test_the_levels_are_declared_once_per_connection_and_the_workers_told():
    table = CancelTable(capacity=64)
    levels = poller._Levels(CFG, table)
    conn = _Conn()
    assert table.levels == cancels.LEVELS_UNKNOWN
    assert levels.keep(conn) == delays.LEVELS          # one message counted in each level
    assert conn.declared == 1 and table.levels == cancels.LEVELS_DECLARED
    levels.keep(conn)
    assert conn.declared == 1                           # not again on the same connection
    again = _Conn()
    levels.keep(again)
    assert again.declared == 1                          # a new connection re-asserts them


def test_a_level_gone_missing_is_declared_again_and_counting_waits_its_interval(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(poller.time, "monotonic", lambda: clock[0])
    levels = poller._Levels(CFG, CancelTable(capacity=64))
    conn = _Conn()
    levels.keep(conn)
    conn.present.discard(delays.level_name(5))          # someone deleted a level
    clock[0] += 1
    assert levels.keep(conn) == delays.LEVELS           # not counted again yet
    clock[0] += poller.DELAYED_EVERY
    assert levels.keep(conn) == delays.LEVELS - 1       # counted: one level missing
    assert conn.declared == 1
    levels.keep(conn)                                   # the next round declares it again
    assert conn.declared == 2 and delays.level_name(5) in conn.present


def test_a_refusal_leaves_the_levels_to_the_workers_and_is_not_repeated():
    table = CancelTable(capacity=64)
    levels = poller._Levels(CFG, table)
    conn = _Conn(refuse=True)
    assert levels.keep(conn) is None                    # no levels to count
    assert table.levels == cancels.LEVELS_REFUSED
    conn.refuse = False
    levels.keep(conn)
    assert conn.declared == 0                           # not asked again on this connection


def test_a_daemon_without_side_queues_declares_no_levels():
    cfg = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}, "type": "classic",
                                    "declare_side_queues": False}]}, "t.yaml")
    table = CancelTable(capacity=64)
    conn = _Conn()
    assert poller._Levels(cfg, table).keep(conn) is None
    assert conn.declared == 0 and table.levels == cancels.LEVELS_UNKNOWN


def test_a_reload_that_replaces_the_poller_makes_new_workers_wait_for_its_word():
    table = CancelTable(capacity=64)
    table.set_levels(cancels.LEVELS_DECLARED)
    poller.PollerProcess(CFG, lambda: None, table).reconfigure(CFG)
    assert table.levels == cancels.LEVELS_UNKNOWN


class _Method:
    delivery_tag = 1


class _Acks:
    def basic_ack(self, tag):
        pass


def _reader_by_count(to_load: int, table: CancelTable) -> "poller._CancelReader":
    """A reader whose mark the broker refused: it goes by the log's length."""
    r = poller._CancelReader.__new__(poller._CancelReader)
    r.table, r.mark, r.to_load = table, None, to_load
    r.read = r.added = r.ignored = 0
    return r


def test_a_log_that_ends_in_another_readers_mark_is_read_to_its_end():
    table = CancelTable()
    r = _reader_by_count(2, table)
    cancel = pika.BasicProperties(message_id="m1", headers={cancels.H_CANCELLED_MS: 1})
    mark = pika.BasicProperties(message_id="workqd-log-mark-x", headers={cancels.H_MARK: 1})
    r._on_entry(_Acks(), _Method(), cancel, b"")
    assert not table.loaded
    r._on_entry(_Acks(), _Method(), mark, b"")
    assert table.loaded


def test_a_poller_that_stops_reporting_is_replaced_and_its_last_word_dropped(monkeypatch,
                                                                             caplog):
    killed = []
    monkeypatch.setattr(poller, "_kill", lambda pid, sig: killed.append((pid, sig)))
    p = poller.PollerProcess(CFG, lambda: None)
    p.pid = 4242   # as _spawn leaves it, without a child
    p._apply(True, "", {"q": (7, 2, 0)}, 3)
    p.manage(100.0)                               # the master first sees that report
    p.manage(100.0 + poller.STUCK_AFTER)          # slow, not stuck
    p._apply(True, "", {"q": (6, 2, 0)}, 3)       # a new report restarts the count
    p.manage(150.0 + poller.STUCK_AFTER)
    assert killed == [] and p.connected and p.depth == {"q": (6, 2, 0)}
    with caplog.at_level("WARNING", logger="workqd.master"):
        p.manage(150.1 + 2 * poller.STUCK_AFTER)  # a report due every 5 s, none for 60
        p.manage(500.0)                           # not killed again while it is reaped
    assert killed == [(4242, poller.signal.SIGKILL)]
    assert not p.connected and p.depth == {} and p.delayed is None
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "queue poller (pid 4242) has not reported for 60s" in warned[0]
