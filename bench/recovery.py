"""W3 recovery: kill -9 a busy workqd worker while another one is idle.

Per run: a long task starts on one worker (the task log names its pid); the bench
kills that pid with SIGKILL and then measures
- redelivery: kill until the same task starts again, redelivered, in another
  worker (task log, CLOCK_MONOTONIC, comparable across processes);
- pool full: kill until /metrics shows every worker consuming again, the dead
  one replaced by a new pid;
- lost: right after the kill a batch of short tasks is published too; every
  task must end and the queue must end empty.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

from common import URL, Admin, BenchError, Workqd, persistent, queue_name, wait_for
from fair import read_log
from pika_publish import publish_pipelined


def _states(d: Workqd, q: str) -> dict[str, float]:
    return {s: d.metric("workqd_workers", queue=q, state=s) for s in ("idle", "busy", "starting")}


def w3(python: str, workdir: Path, runs: int = 3, workers: int = 3, qtype: str = "classic",
       batch: int = 30, log=print) -> list[dict]:
    admin = Admin()
    q = queue_name("w3")
    fd, log_path = tempfile.mkstemp(prefix="workqd-bench-w3-", suffix=".jsonl")
    os.close(fd)
    d = Workqd(python, workdir, [Workqd.queue(q, qtype, workers, 1, "benchtasks:recover")],
               {"BENCH_LOG": log_path})
    out = []
    try:
        d.start()
        d.wait_ready()
        for run in range(runs):
            wait_for(lambda: _states(d, q)["idle"] == workers, 30, 0.01, "all workers idle")
            before = set(d.worker_pids())
            long_id = f"long{run}"
            publish_pipelined(URL, q, [(f"{long_id} 30".encode(), persistent())])

            def started():
                for e in read_log(log_path):
                    if e["id"] == long_id and e["e"] == "start":
                        return e
            victim = wait_for(started, 10, 0.002, "the long task to start")["pid"]
            t_kill = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            # Seen from a worker: the broker noticed the closed socket and redelivered.
            short = [(f"s{run}-{i:03d} 0.05".encode(), persistent()) for i in range(batch)]

            def restarted():
                for e in read_log(log_path):
                    if e["id"] == long_id and e["e"] == "start" and e["r"] and e["pid"] != victim:
                        return e
            again = wait_for(restarted, 10, 0.001, "the killed task to start elsewhere")
            redelivery = again["t"] - t_kill
            publish_pipelined(URL, q, short)

            def full():
                pids = set(d.worker_pids())
                if victim in pids or not (pids - before):
                    return False
                s = _states(d, q)
                return s["idle"] + s["busy"] == workers and s["starting"] == 0
            wait_for(full, 10, 0.005, "the pool to be full again")
            pool_full = time.monotonic() - t_kill
            ids = {long_id, *(b.split()[0].decode() for b, _ in short)}

            def all_done():
                ended = {e["id"] for e in read_log(log_path) if e["e"] == "end"}
                return ids <= ended
            try:
                wait_for(all_done, 30, 0.02, "every task to end")
            except BenchError:
                pass
            ended = {e["id"] for e in read_log(log_path) if e["e"] == "end"}
            lost = len(ids - ended)
            wait_for(lambda: admin.depth(q) == 0, 10, 0.02, "the queue to be empty")
            r = {"run": run, "type": qtype, "workers": workers, "redelivery_ms": redelivery * 1e3,
                 "pool_full_ms": pool_full * 1e3, "lost": lost, "tasks": len(ids)}
            out.append(r)
            log(f"  W3 run {run}: killed task running again after {r['redelivery_ms']:.1f} ms, "
                f"pool full after {r['pool_full_ms']:.0f} ms, {lost} of {len(ids)} lost")
    finally:
        d.stop()
        admin.delete(q, f"{q}.dead")
        admin.close()
        os.unlink(log_path)
    return out


if __name__ == "__main__":
    import argparse
    import sys
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--type", default="classic")
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args()
    w3(a.python, Path(tempfile.mkdtemp(prefix="workqd-bench-")), a.runs, qtype=a.type)
