"""The systems under test, each behind the same small interface.

A system knows how its queue must be declared (so the bench can pre-fill it
before any consumer exists, with arguments the system will redeclare without a
PRECONDITION_FAILED), what its messages look like on the wire, how to start N
worker processes at a given prefetch, and what it leaves on the broker.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from common import BENCH, URL, Procs, Workqd, persistent, venv_env

PIKA, WORKQD, CELERY, DRAMATIQ = "pika", "workqd", "celery", "dramatiq"


class System:
    name = ""

    def __init__(self, python: str, workdir: Path):
        self.python = python
        self.workdir = workdir

    def queue_arguments(self, queue: str, qtype: str) -> dict | None:
        return {"x-queue-type": qtype}

    def messages(self, queue: str, payloads: list[bytes], task: str = "stamp"):
        return [(p, persistent()) for p in payloads]

    def start(self, queue: str, qtype: str, workers: int, prefetch: int, env: dict,
              task: str = "stamp"):
        raise NotImplementedError

    def leftovers(self, queue: str) -> tuple[list[str], list[str]]:
        """(queues, exchanges) the system declared besides ``queue``."""
        return [], []


class PlainPika(System):
    """N tutorial consumers, one process each."""
    name = PIKA

    def start(self, queue, qtype, workers, prefetch, env, task="stamp"):
        argv = [self.python, str(BENCH / "pika_consumer.py"), "--url", URL, "--queue", queue,
                "--prefetch", str(prefetch), "--task", f"benchtasks:{task}"]
        return Procs([argv] * workers, venv_env(self.python, env),
                     self.workdir / f"pika-{queue}.log")


class WorkqdSystem(System):
    name = WORKQD

    def start(self, queue, qtype, workers, prefetch, env, task="stamp"):
        d = Workqd(self.python, self.workdir,
                   [Workqd.queue(queue, qtype, workers, prefetch, f"benchtasks:{task}")], env)
        return d.start()

    def leftovers(self, queue):
        return [f"{queue}.dead"], []


class Celery(System):
    """Celery prefork, acks_late, prefetch multiplier 1 (``celery_app.py``)."""
    name = CELERY

    def queue_arguments(self, queue, qtype):
        return {"x-queue-type": "quorum"} if qtype == "quorum" else None

    def messages(self, queue, payloads, task="stamp"):
        # Task message protocol 2, as celery.app.amqp.as_task_v2 builds it.
        out = []
        name = f"bench.{task}"
        for p in payloads:
            tid = str(uuid.uuid4())
            arg = p.decode()
            headers = {"lang": "py", "task": name, "id": tid, "shadow": None, "eta": None,
                       "expires": None, "group": None, "group_index": None, "retries": 0,
                       "timelimit": [None, None], "root_id": tid, "parent_id": None,
                       "argsrepr": repr((arg,)), "kwargsrepr": "{}", "origin": "bench",
                       "ignore_result": True}
            body = json.dumps([[arg], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                            "chord": None}]).encode()
            out.append((body, persistent(headers=headers, content_type="application/json",
                                         content_encoding="utf-8", correlation_id=tid,
                                         priority=0)))
        return out

    def start(self, queue, qtype, workers, prefetch, env, task="stamp"):
        celery = str(Path(self.python).parent / "celery")
        e = {"BENCH_QUEUE": queue, "BENCH_QTYPE": qtype, **env}
        argv = [celery, "-A", "celery_app", "worker", "-P", "prefork", "-c", str(workers),
                "--prefetch-multiplier", str(prefetch), "-Q", queue, "--without-mingle",
                "--without-gossip", "--without-heartbeat", "-l", "WARNING"]
        return Procs([argv], venv_env(self.python, e), self.workdir / f"celery-{queue}.log",
                     cwd=BENCH)

    def leftovers(self, queue):
        return [], [queue]


class Dramatiq(System):
    """Dramatiq, N processes with 1 worker thread each (``dramatiq_app.py``)."""
    name = DRAMATIQ

    def queue_arguments(self, queue, qtype):
        args = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}
        if qtype == "quorum":
            args["x-queue-type"] = "quorum"
        return args

    def messages(self, queue, payloads, task="stamp"):
        now = int(time.time() * 1000)
        return [(json.dumps({"queue_name": queue, "actor_name": task, "args": [p.decode()],
                             "kwargs": {}, "options": {}, "message_id": str(uuid.uuid4()),
                             "message_timestamp": now}, separators=(",", ":")).encode(),
                 persistent()) for p in payloads]

    def start(self, queue, qtype, workers, prefetch, env, task="stamp"):
        dramatiq = str(Path(self.python).parent / "dramatiq")
        e = {"BENCH_QUEUE": queue, "BENCH_QTYPE": qtype,
             "dramatiq_queue_prefetch": str(prefetch), **env}
        argv = [dramatiq, "dramatiq_app", "--processes", str(workers), "--threads", "1",
                "--queues", queue]
        return Procs([argv], venv_env(self.python, e), self.workdir / f"dramatiq-{queue}.log",
                     cwd=BENCH)

    def leftovers(self, queue):
        return [f"{queue}.DQ", f"{queue}.XQ"], []


def make(name: str, python: str, workdir: Path) -> System:
    return {PIKA: PlainPika, WORKQD: WorkqdSystem, CELERY: Celery, DRAMATIQ: Dramatiq}[name](
        python, workdir)
