"""What `workqctl status` gets: a plain-data picture of a Snapshot, plus what /proc says.

Pure but for reading /proc/PID/statm; the master calls it only when asked (the
snapshot taken every loop turn does not read /proc).
"""

from __future__ import annotations

import os

from . import state

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid``, None when it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def queue_status(q: state.QueueView) -> dict:
    depth = q.depth
    return {
        "name": q.name, "state": q.state, "pool_state": q.pool_state, "paused": q.paused,
        "size": q.size, "configured": q.configured,
        "min": q.min_workers, "max": q.max_workers, "consuming": q.consuming,
        "in_flight": sum(1 for w in q.workers if w.state == state.W_BUSY),
        "ready": depth[0] if depth else None, "consumers": depth[1] if depth else None,
        "dead_letters": depth[2] if depth else None,
        "limits": limits_status(q),
        "workers": [{"number": w.number, "pid": w.pid, "state": w.state,
                     "message_id": w.message_id, "running_for": w.busy_for,
                     "tasks_done": w.tasks_done, "rss": rss_bytes(w.pid)}
                    for w in sorted(q.workers, key=lambda w: (w.number, w.pid))],
    }


def limits_status(q: state.QueueView) -> dict | None:
    """The queue's cluster-wide limits as this host sees them; None without limits."""
    lim = q.limits
    if lim is None or not lim.any:
        return None
    out: dict = {}
    if lim.concurrency:
        # Only a slot holder consumes, so the queue's consumers (as last polled) are the
        # slots in use on every host together.
        out["concurrency"] = {"cap": lim.concurrency, "held_here": q.slots_held,
                              "in_use": q.depth[1] if q.depth else None,
                              "workers_waiting": q.waiting_slot}
    if lim.rate:
        out["rate"] = {"rate": lim.rate_text, "per_second": lim.rate, "burst": lim.burst,
                       "tasks_waiting": q.waiting_token, "generator_here": q.leads_rate}
    return out


def status(snap: state.Snapshot, queue: str | None, pid: int, socket_path: str) -> dict:
    """The `status` answer; a queue name narrows it to that queue (ValueError if unknown)."""
    from .control import ProtocolError
    queues = [q for q in snap.queues if queue is None or q.name == queue]
    if queue is not None and not queues:
        raise ProtocolError(f"no queue {queue!r} in this daemon (queues: "
                            f"{', '.join(q.name for q in snap.queues)})")
    ready, why = snap.readiness()
    return {"pid": pid, "version": snap.version, "phase": snap.phase, "socket": socket_path,
            "broker_connected": snap.broker_connected, "ready": ready, "readiness": why,
            "delayed": snap.delayed, "cancels": snap.cancels,
            "queues": [queue_status(q) for q in queues]}


def schedules(snap: state.Snapshot, pid: int, configured: list[tuple[str, str]]) -> dict:
    """The `schedules` answer: each schedule of the config (name, queue) as this daemon
    sees it; one its poller has not reported on yet has no times and no leader."""
    seen = {s.name: s for s in snap.schedules}
    rows = []
    for name, queue in configured:
        s = seen.get(name)
        rows.append({"name": name, "queue": queue, "leading": bool(s and s.leading),
                     "leader": s.leader if s else "", "last_fired": s.last_fired if s else None,
                     "next": s.next if s else None, "fired": s.fired if s else 0})
    return {"pid": pid, "broker_connected": snap.broker_connected, "schedules": rows}
