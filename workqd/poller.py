"""The master's view of the broker: queue depth, consumer count, reachability.

A thread polls every few seconds with a passive declare per queue on its own
short-lived connection, so no worker's hot path ever pays for it.
"""

from __future__ import annotations

import logging
import threading

import pika
import pika.exceptions

from .broker import connection_parameters, redact
from .config import Config

log = logging.getLogger("workqd.master")

INTERVAL = 5.0
INTERVAL_DISCONNECTED = 1.0


class QueuePoller:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.connected = False
        self.depth: dict[str, tuple[int, int]] = {}   # queue -> (ready, consumers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-poller", daemon=True)
        self._was_connected: bool | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(INTERVAL if self.connected else INTERVAL_DISCONNECTED)

    def poll_once(self) -> None:
        cfg = self.cfg
        depth: dict[str, tuple[int, int]] = {}
        last_error = "no broker URL"
        for url in cfg.broker.urls:
            try:
                params = connection_parameters(cfg.broker, url, "workqd master (queue poller)",
                                               heartbeat=0)
                conn = pika.BlockingConnection(params)
            except (pika.exceptions.AMQPError, OSError, ValueError) as e:
                last_error = f"{redact(url)}: {e!r}"
                continue
            try:
                for q in cfg.queues:
                    ch = conn.channel()
                    try:
                        ok = ch.queue_declare(q.name, passive=True)
                        depth[q.name] = (ok.method.message_count, ok.method.consumer_count)
                        ch.close()
                    except pika.exceptions.ChannelClosedByBroker:
                        pass  # not declared yet: no sample rather than a made-up 0
                conn.close()
            except (pika.exceptions.AMQPError, OSError) as e:
                last_error = f"{redact(url)}: {e!r}"
                continue
            self.depth = depth
            self._set_connected(True, "")
            return
        self.depth = {}  # no stale depth while the broker is out of reach
        self._set_connected(False, last_error)

    def _set_connected(self, ok: bool, error: str) -> None:
        self.connected = ok
        if ok != self._was_connected:
            if ok:
                log.info("broker reachable")
            else:
                log.warning("broker not reachable: %s", error)
            self._was_connected = ok
