"""Slot ownership across the worker's two threads (workqd.slots), with no processes."""

from __future__ import annotations

import time

from workqd.slots import CONNECTING, SlotTable


def test_task_finishing_during_a_reconnect_does_not_make_the_worker_consuming():
    slot = SlotTable(capacity=1).allocate(1)
    slot.subscribed()
    slot.begin("m1", False, time.monotonic())   # handler thread
    slot.set_state(CONNECTING)             # I/O thread: connection lost
    assert not slot.consuming and slot.message_id() == "m1"   # still truthfully held
    slot.end()                             # handler thread finishes meanwhile
    assert not slot.consuming and slot.message_id() is None
    slot.subscribed()
    assert slot.consuming
