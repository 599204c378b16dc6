"""One small run of the benchmark code (bench/suite.py --smoke) with sane numbers.

The benchmarks themselves are not part of the test suite (``make bench``); this
only proves the bench still works against the current daemon. It needs the
broker and fails, never skips, when RabbitMQ is not there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def test_bench_smoke_run_produces_sane_numbers(tmp_path, broker):
    out = tmp_path / "results.json"
    # The test's own Python stands in for both pika venvs: no venv is built here. The
    # bound only catches a hang: the smoke run takes about 40 s on a quiet machine and
    # has taken over 150 s beside the rest of CI.
    r = subprocess.run([sys.executable, str(BENCH / "suite.py"), "--py12", sys.executable,
                        "--pynew", sys.executable, "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, f"bench smoke run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    res = json.loads(out.read_text())
    assert res["errors"] == []

    w1 = res["w1"]
    assert {(x["system"], x["prefetch"]) for x in w1} == {
        ("pika", 1), ("pika", 50), ("workqd", 1), ("workqd", 50)}
    for x in w1:
        assert x["rate"] > 0
        assert x["calls"] == x["tasks"], f"{x['system']} ran {x['calls']} of {x['tasks']}"
        assert x["remaining"] == 0, f"{x['system']} left {x['remaining']} in the queue"

    for x in res["w2"]:
        assert x["vs_greedy"] >= 0.99 and x["vs_lower_bound"] >= 1.0
        assert x["makespan"] < 3 * x["greedy"]

    assert res["w3"], "W3 produced no run"
    for x in res["w3"]:
        assert x["lost"] == 0
        assert 0 < x["redelivery_ms"] < 5000 and 0 < x["pool_full_ms"] < 10000

    assert {x["publisher"] for x in res["w4"]} == {
        "workq-submit", "pika-pipelined", "pika-one-at-a-time"}
    assert all(x["rate"] > 0 for x in res["w4"])

    assert {(x["system"], x["task"]) for x in res["w5"]} == {
        (s, t) for s in ("pika", "workqd") for t in ("cpu_1ms", "io_5ms")}
    assert all(x["calls"] == x["tasks"] and x["remaining"] == 0 and x["workers"] == 4
               for x in res["w5"])

    assert res["scale"] and all(x["remaining"] == 0 and x["rate"] > 0 for x in res["scale"])

    mem = {(x["system"], x["workers"]): x for x in res["memory"]}
    assert mem[("workqd", 2)]["processes"] == 4   # master, 2 workers, the queue poller
    assert mem[("workqd", 2)]["rss_mib"] > mem[("workqd", 2)]["pss_mib"] > 0
    assert all(0 < x["all_consuming_s"] < 30 for x in res["ready"])
    q = res["queues"]["median"]["this"]
    assert 0 < q["ready_s"] < 30 and q["scrape_ms_median"] > 0 and q["status_ms_median"] > 0

    # The report renders from those results (Markdown only: matplotlib is bench-only).
    md = tmp_path / "RESULTS.md"
    r = subprocess.run([sys.executable, str(BENCH / "report.py"), str(out), "--md", str(md)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "## W1 drain" in md.read_text() and "## W5 tasks that do something" in md.read_text()
