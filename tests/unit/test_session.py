"""What the broker's closes and errors mean (workqd.worker.session), pure logic."""

from __future__ import annotations


from workqd import config, exitcodes

CFG = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}, "timeout": 5,
                                "retry": {"attempts": 1}}]}, "t.yaml")
QUEUE = CFG.queues[0]


# --- what the broker's closes and errors mean ------------------------------------

def test_close_codes_and_open_errors_are_classified():
    import ssl
    import pika.exceptions
    from workqd.worker.session import classify_channel_close, classify_open_error
    q = QUEUE
    assert classify_channel_close(406, "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'",
                                  True, q).exit_code == exitcodes.WORKER_QUEUE_MISMATCH
    timeout = classify_channel_close(
        406, "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout "
        "value used: 5000 ms.", False, q)
    assert timeout.exit_code == exitcodes.WORKER_CONSUMER_TIMEOUT and "consumer_timeout" in timeout.why
    # A queue whose home node is down may come back: retry, never a login error.
    down = classify_channel_close(404, "NOT_FOUND - home node 'wqa@localhost' of durable queue "
                                  "'q.delay.5s' in vhost '/' is down or inaccessible", True, q)
    assert down.exit_code is None
    assert classify_channel_close(403, "ACCESS_REFUSED", True, q).exit_code == \
        exitcodes.WORKER_BROKER_REFUSED
    assert classify_open_error(pika.exceptions.ProbableAuthenticationError("x"),
                               "amqp://u:secret@h").exit_code == exitcodes.WORKER_BROKER_REFUSED
    assert "secret" not in classify_open_error(ConnectionRefusedError(), "amqp://u:secret@h").why
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "Hostname mismatch, certificate is not valid for 'wrong.invalid'."
    wrapped = pika.exceptions.AMQPConnectionError(OSError(cert))
    verdict = classify_open_error(wrapped, "amqps://h")
    assert verdict.exit_code == exitcodes.WORKER_BAD_SETTINGS and "Hostname mismatch" in verdict.why
    assert classify_open_error(OSError("reset"), "amqps://h").exit_code is None


def test_a_client_certificate_refused_after_the_handshake_is_a_tls_failure():
    import pika.exceptions
    from workqd.worker.session import classify_open_error
    error = pika.exceptions.IncompatibleProtocolError(
        "StreamLostError: (\"Stream connection lost: SSLError(1, '[SSL: "
        "TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required')\",)")
    verdict = classify_open_error(error, "amqps://h")
    assert verdict.exit_code == exitcodes.WORKER_BAD_SETTINGS
    assert "certificate required" in verdict.why


def test_an_eof_right_after_the_handshake_is_retried_not_a_stop():
    # The same refusal when pika's first write loses the race with the server's close:
    # only an EOF is left, which a broker going down mid-handshake gives too. Retried;
    # the next attempt usually reads the alert and stops with the line above.
    import pika.exceptions
    from workqd.worker.session import classify_open_error
    error = pika.exceptions.IncompatibleProtocolError(
        "StreamLostError: (\"Stream connection lost: SSLEOFError(8, 'EOF occurred in "
        "violation of protocol (_ssl.c:2427)')\",)")
    verdict = classify_open_error(error, "amqps://h")
    assert verdict.exit_code is None and "cannot connect to amqps://h" in verdict.why


# --- the periodic consumer check (session.consumer_check) -------------------------------

def test_consumer_check_sees_a_lost_consumer_and_a_starved_one():
    from workqd.worker.session import consumer_check
    assert "counts no consumer" in consumer_check(0, 0, 0, False, True)
    # Tasks wait, nothing came, nothing held: the broker does not deliver to us.
    assert "17 task(s) wait" in consumer_check(3, 17, 0, False, True)
    # Normal: deliveries came, or the worker is full, or nothing waits.
    assert consumer_check(3, 17, 5, False, True) == ""
    assert consumer_check(3, 17, 0, True, True) == ""
    assert consumer_check(3, 0, 0, False, True) == ""
    # A single-active-consumer queue (or someone else's): idle consumers are normal.
    assert consumer_check(3, 17, 0, False, False) == ""
    assert "counts no consumer" in consumer_check(0, 17, 0, False, False)


def test_a_consumer_check_the_broker_never_answers_ends_the_session():
    # Heartbeats keep the connection up, but the passive declare gets no answer: after
    # CONSUMER_CHECK_UNANSWERED the session gives up its connection, so the worker
    # consumes again on a new one, instead of waiting on that answer for ever.
    import types
    from workqd.worker.session import CONSUMER_CHECK_UNANSWERED, Session
    sent, lost, closed, cut = [], [], [], []
    channel = types.SimpleNamespace(
        is_open=True, queue_declare=lambda name, passive, callback: sent.append(callback))
    s = Session(QUEUE, CFG.broker, "amqp://x", "t", None, 1, lambda: True,
                types.SimpleNamespace(on_consumer_lost=lambda: lost.append(1)), None, False,
                on_consuming=None, on_message=None, on_closed=None)
    s.channel, s.consumer_tag, s._can_consume = channel, "tag", True   # consuming
    # pika queues a channel's close behind its unanswered call: an orderly close would
    # wait for ever too, so the stream is cut, as pika does on a missed heartbeat.
    s.connection = types.SimpleNamespace(is_open=True, close=lambda: closed.append(1),
                                         _terminate_stream=cut.append)
    s.check(0.0)
    assert len(sent) == 1
    s.check(CONSUMER_CHECK_UNANSWERED / 2)   # still waiting: nothing more is sent
    assert len(sent) == 1 and not lost
    s.check(CONSUMER_CHECK_UNANSWERED)
    assert lost == [1] and not closed and len(cut) == 1 and s.consumer_tag is None
    assert "has not answered the consumer check for 60s" in s._verdict.why


def test_declarations_the_broker_never_answers_end_the_session():
    import types
    from workqd.worker.session import CONSUMER_CHECK_UNANSWERED, Session
    sent, cut = [], []
    channel = types.SimpleNamespace(
        is_open=True, queue_declare=lambda *a, callback, **k: sent.append(callback))
    s = Session(QUEUE, CFG.broker, "amqp://x", "t", None, 1, lambda: True, None, None, False,
                on_consuming=None, on_message=None, on_closed=None)
    s.channel = channel
    s.connection = types.SimpleNamespace(is_open=True, _terminate_stream=cut.append)
    s._declare()
    assert len(sent) == 1
    # Each answer restarts the clock: many slow declarations are not one stuck one.
    s._waiting_since = 100.0
    s.check(100.0 + CONSUMER_CHECK_UNANSWERED - 1)
    sent[-1](None)                                  # answered: the next one goes out
    assert len(sent) == 2 and not cut and s._waiting_since != 100.0
    s._waiting_since = 200.0                          # ... and is never answered
    s.check(200.0 + CONSUMER_CHECK_UNANSWERED - 1)
    assert not cut
    s.check(200.0 + CONSUMER_CHECK_UNANSWERED)
    assert len(cut) == 1 and "has not answered the declarations for 60s" in s._verdict.why


def test_a_session_ending_for_a_cause_keeps_that_cause():
    # The consumer was lost and the orderly close is under way: the next periodic check
    # must neither cut the connection nor put another reason in the log line.
    import types
    from workqd.worker.session import CONSUMER_CHECK_UNANSWERED, Session
    cut, closed = [], []
    s = Session(QUEUE, CFG.broker, "amqp://x", "t", None, 1, lambda: True,
                types.SimpleNamespace(on_consumer_lost=lambda: None), None, False,
                on_consuming=None, on_message=None, on_closed=None)
    s.channel = types.SimpleNamespace(is_open=True)
    s.connection = types.SimpleNamespace(is_open=True, close=lambda: closed.append(1),
                                         _terminate_stream=cut.append)
    s._waiting_since, s.consumer_tag, s._can_consume = 0.0, "tag", True
    s._lost_consumer("queue q: 17 task(s) wait")
    assert closed == [1] and "17 task(s) wait" in s._verdict.why
    s.check(10 * CONSUMER_CHECK_UNANSWERED)
    assert not cut and "17 task(s) wait" in s._verdict.why


def test_an_answered_consumer_check_lets_the_next_one_go():
    import types
    from workqd.worker.session import CONSUMER_CHECK_UNANSWERED, Session
    sent = []
    channel = types.SimpleNamespace(
        is_open=True, queue_declare=lambda name, passive, callback: sent.append(callback))
    s = Session(QUEUE, CFG.broker, "amqp://x", "t", None, 1, lambda: True, None, None, False,
                on_consuming=None, on_message=None, on_closed=None)
    s.channel, s.consumer_tag, s._can_consume = channel, "tag", True   # consuming
    answer = types.SimpleNamespace(method=types.SimpleNamespace(consumer_count=1,
                                                                 message_count=0))
    for i in range(5):   # answered each time, however slowly: never taken as stuck
        s.check(i * CONSUMER_CHECK_UNANSWERED)
        sent[-1](answer)
    assert len(sent) == 5 and s.consumer_tag == "tag" and s._verdict is None


# --- what a session declares ----------------------------------------------------------

class _Channel:
    """Answers every declaration at once and records it, in order."""
    is_open = True

    def __init__(self):
        self.calls = []

    def _answer(self, what, *args, callback=None, **kwargs):
        self.calls.append((what, args[0] if args else kwargs.get("prefetch_count")))
        if callback is not None:
            callback(None)

    def __getattr__(self, name):
        if name in ("queue_declare", "exchange_declare", "queue_bind", "queue_unbind",
                    "exchange_bind", "basic_qos"):
            return lambda *a, **k: self._answer(name, *a, **k)
        raise AttributeError(name)

    def basic_consume(self, queue, *a, **k):
        self.calls.append(("basic_consume", queue))
        return "tag"


def _declared(declare_levels: bool) -> list:
    from workqd.worker.session import Session
    consuming = []
    s = Session(QUEUE, CFG.broker, "amqp://x", "t", None, 1, lambda: True, None, None,
                declare_levels, on_consuming=consuming.append, on_message=None,
                on_closed=None)
    s.channel = _Channel()
    s._declare()
    assert consuming == [s] and s.consuming
    return s.channel.calls


def test_a_worker_declares_its_own_queues_and_binding_when_the_poller_declared_the_levels():
    from workqd import delays
    calls = _declared(declare_levels=False)
    assert calls == [("queue_declare", "q"), ("queue_declare", "q.dead"),
                     ("queue_unbind", "q"), ("queue_bind", "q"), ("basic_qos", 1),
                     ("basic_consume", "q")]
    # Without the poller's word it declares every level itself, before it consumes: a
    # retry publishes into them.
    calls = _declared(declare_levels=True)
    exchanges, levels, binds = delays.topology()
    assert len(calls) == 6 + len(exchanges) + len(levels) + len(binds)
    assert ("queue_declare", delays.level_name(delays.LEVELS - 1)) in calls
    assert calls[-2:] == [("basic_qos", 1), ("basic_consume", "q")]
