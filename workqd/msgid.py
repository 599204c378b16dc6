"""Message ids that carry their publish time: UUID version 7 (RFC 9562), as 32 hex digits.

The first 48 bits of a version 7 UUID are its creation time in milliseconds since the
epoch, the rest random (74 bits) but for the version and variant. workqd's publishers
make an id the moment they first publish a task, so the id itself says when the task
was published and a message needs no header for ``workqd_task_queue_wait_seconds``: a
headers table costs the broker more work per message than every other property of
workq-submit's messages together. Ids an application chooses keep the header.

Any producer's version 7 ids count, in either spelling (hex, or hex with dashes); any
other id, or one whose time is implausible, says nothing.
"""

from __future__ import annotations

import os

# The id's time counts only within this window around the reader's clock: a random hex
# id that happens to look like a version 7 UUID (1 in 64) then gives a time at random
# over nine millennia, and falls inside it about once in a hundred thousand.
PAST_MS = 30 * 86_400_000
FUTURE_MS = 60_000
_HEX = frozenset("0123456789abcdefABCDEF")


def new_message_ids(n: int, ms: int) -> list[str]:
    """``n`` distinct version 7 ids stamped ``ms`` (milliseconds since the epoch), from one
    read of the system's randomness instead of one per id."""
    head = f"{ms & 0xFFFFFFFFFFFF:012x}7"
    raw = bytearray(os.urandom(10 * n))
    # Each id's tail is 19 of its 20 random hex digits, from the second on; the tail's
    # fourth is the variant (RFC 9562: binary 10xx), the high half of the third byte.
    raw[2::10] = bytes(b & 0x3F | 0x80 for b in raw[2::10])
    text = raw.hex()
    return [head + text[k + 1:k + 20] for k in range(0, 20 * n, 20)]


def stamp_ms(message_id, now_ms: int) -> int | None:
    """The publish time a version 7 id carries, in ms; None for any other id, or for a
    time outside the plausible window around ``now_ms``."""
    if type(message_id) is not str:
        return None
    if len(message_id) == 36 and message_id[8] == message_id[13] == message_id[18] \
            == message_id[23] == "-":
        message_id = message_id.replace("-", "")
    if len(message_id) != 32 or message_id[12] != "7" or message_id[16] not in "89abAB" \
            or not _HEX.issuperset(message_id):
        return None
    ms = int(message_id[:12], 16)
    if not now_ms - PAST_MS <= ms <= now_ms + FUTURE_MS:
        return None
    return ms
