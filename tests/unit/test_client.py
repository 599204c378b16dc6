"""The client's pure parts: message ids, a burst's shared properties, confirm settling."""

from __future__ import annotations

import types

import pika
import pika.spec
import pytest

from workqd.client import Batch, Outgoing, _Burst, _Session


@pytest.mark.parametrize("props", [
    dict(delivery_mode=2, content_type="text/plain", timestamp=1700000000,
         headers={"x-workq-submitted-ms": 1700000000123, "k": "v", "n": [1, "a"]}),
    dict(delivery_mode=2, priority=7, reply_to="amq.rabbitmq.reply-to", headers={}),
    dict(delivery_mode=2),
])
@pytest.mark.parametrize("mid", ["abc", "é" * 100, "x" * 255, "line\tid"])
def test_a_burst_encodes_what_pika_encodes(props, mid):
    burst = _Burst(pika.BasicProperties(**props))
    ours = b"".join(burst.of(mid).encode())
    assert ours == b"".join(pika.BasicProperties(message_id=mid, **props).encode())
    back = pika.BasicProperties()
    back.decode(ours)
    assert back.message_id == mid and back.delivery_mode == 2


def test_an_id_pika_cannot_encode_gets_pikas_own_properties_and_error():
    burst = _Burst(pika.BasicProperties(delivery_mode=2))
    props = burst.of("x" * 256)
    assert type(props) is pika.BasicProperties and props.message_id == "x" * 256
    with pytest.raises(Exception):
        props.encode()


def _session(batch: Batch) -> _Session:
    s = _Session.__new__(_Session)   # no connection: only the confirm bookkeeping
    s.batch, s.abandoned, s.low, s.pending = batch, False, 1, {}
    return s


def _confirm(s: _Session, tag: int, multiple: bool = False, nack: bool = False) -> None:
    method = (pika.spec.Basic.Nack if nack else pika.spec.Basic.Ack)(tag, multiple)
    s._on_confirm(types.SimpleNamespace(method=method))


def test_confirms_settle_each_task_once_whatever_their_mix():
    tasks = [Outgoing(f"m{i}", b"x") for i in range(10)]
    b = Batch([], "q", tasks)
    b._maybe_finish = lambda: None
    s = _session(b)
    b.session = s
    s.pending.update({i + 1: i for i in range(10)})   # tag = index + 1
    b.next = 10
    _confirm(s, 3)                      # a single one ahead of the low mark
    _confirm(s, 2, multiple=True)       # 1, 2
    _confirm(s, 5, nack=True)
    b.returned.add("m5")                # a return comes before its confirm
    _confirm(s, 7, multiple=True)       # 4, 6 (3 and 5 settled already); 6 unroutable
    assert b.confirmed == {0, 1, 2, 3, 6} and set(b.failed) == {4, 5}
    assert "nack" in b.failed[4] and "unroutable" in b.failed[5]
    _confirm(s, 10, multiple=True)
    assert b.confirmed == {0, 1, 2, 3, 6, 7, 8, 9} and not s.pending and b.unconfirmed() == []
    _confirm(s, 10, multiple=True)      # a repeat settles nothing again
    assert len(b.confirmed) == 8
