"""Turn the suite's results.json into RESULTS.md and a PNG chart (matplotlib, bench venv only).

    python bench/report.py bench/out/results.json --md bench/RESULTS.md --png bench/results.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from drain import summarize as summarize_w1
from publish import summarize as summarize_w4


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec=".0f", none="–"):
    return none if v is None or v != v else format(v, spec)


def ratio(v):
    return "–" if v is None else f"{v:.2f}×"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


class Report:
    def __init__(self, r: dict):
        self.r = r
        self.targets: list[list] = []

    def target(self, what: str, goal: str, measured: str, met: bool | None) -> None:
        status = "–" if met is None else ("met" if met else "**not met**")
        self.targets.append([what, goal, measured, status])

    # --- sections ------------------------------------------------------------

    def header(self) -> str:
        m, v = self.r["machine"], self.r["versions"]
        v12, vnew = v["py12"], v["pynew"]
        lines = [
            "# workqd benchmark results",
            "",
            f"Written by `bash bench/run.sh`{' --smoke' if self.r.get('smoke') else ''} on "
            f"{m['date']} in {self.r['seconds'] / 60:.1f} minutes.",
            "",
            table(["", ""], [
                ["machine", f"{m['cpu']}, {m['cores']} cores, {m['memory']} RAM"],
                ["OS", f"{m['os']}, Linux {m['kernel']}"],
                ["broker", f"RabbitMQ {m['rabbitmq']} on 127.0.0.1, durable queues, "
                           f"persistent messages"],
                ["Python", v12.get("python", "?")],
                ["workqd", f"{v12.get('workqd', '?')}, commit {m.get('workqd_commit', '?')}"],
                ["pika", f"{v12.get('pika')} (bookworm's) and {vnew.get('pika')} (PyPI)"],
                ["others", ", ".join(f"{k} {v['others'][k]}" for k in
                                     ("celery", "kombu", "amqp", "dramatiq", "pika")
                                     if k in v.get("others", {})) or "not run"],
                ["load average", f"{m['load_at_start']:.2f} at start, "
                                 f"{m.get('load_at_end', 0):.2f} at end (other work on the machine "
                                 f"shows here)"],
                ["failed runs retried", str(self.r.get("retries", 0))],
            ]),
        ]
        if self.r.get("errors"):
            lines += ["", "Errors (their numbers are missing below):", ""]
            lines += [f"- `{e}`" for e in self.r["errors"]]
        return "\n".join(lines)

    def w1(self) -> str:
        rows_all = summarize_w1(self.r.get("w1", []))
        if not rows_all:
            return ""
        key = {(x["system"], x["type"], x["prefetch"], x["pika"]): x for x in rows_all}
        pikas = list(dict.fromkeys(x["pika"] for x in rows_all))
        rows = []
        n = self.r["w1"][0]["tasks"]
        for qtype in ("classic", "quorum"):
            for prefetch in (1, 50):
                for system in ("pika", "workqd"):
                    cells = [key.get((system, qtype, prefetch, p)) for p in pikas]
                    if not any(cells):
                        continue
                    row = [system, qtype, prefetch]
                    for c in cells:
                        row += [fmt(c and c["rate"]), ratio(c and c["ratio"]) if system != "pika"
                                else "1"]
                    rows.append(row)
                for p in pikas:
                    c = key.get(("workqd", qtype, prefetch, p))
                    if c is None or c["ratio"] is None:
                        continue
                    goal = 0.95 if prefetch == 1 else 1.3
                    self.target(f"W1 {qtype} prefetch {prefetch}, pika {p}",
                                f"≥ {goal}× plain pika", f"{c['ratio']:.2f}×",
                                c["ratio"] >= goal)
        header = ["system", "queue", "prefetch"]
        for p in pikas:
            tasks = next(x["tasks"] for x in self.r["w1"] if x["pika"] == p)
            header += [f"tasks/s (pika {p}, {tasks:,} tasks)", "vs plain pika"]
        runs = max(x["runs"] for x in rows_all)
        return "\n".join([
            "## W1 drain",
            "",
            f"{n:,} pre-published persistent no-op tasks of 100 B (10,000 in the repeat with the "
            "current pika, for the time budget), 2 worker processes, ack after "
            f"the task. Median of {runs} runs; the ratio is the median of per-run ratios against "
            "plain pika consumers (the RabbitMQ tutorial's `BlockingConnection` consumer, one "
            "process each, same prefetch, one ack per message) measured in the same run with the "
            "same pika." + self.noise(self.r["w1"]),
            "",
            table(header, rows),
        ])

    def noise(self, rs) -> str:
        loads = [x["other_load"] for x in rs if "other_load" in x]
        if not loads:
            return ""
        return (f" Other work on the machine during these drains (CPU not used by the bench, the "
                f"system under test or the broker): median {med(loads):.0%}, worst "
                f"{max(loads):.0%} of both cores; a drain above {25}% was measured again "
                f"({self.r.get('noisy_repeats', 0)} times in the whole suite).")

    def w1_others(self) -> str:
        rows_all = summarize_w1(self.r.get("w1_others", []))
        if not rows_all:
            return ""
        n = self.r["w1_others"][0]["tasks"]
        rows = []
        names = {"pika": "plain pika", "celery": "Celery prefork, acks_late, multiplier 1",
                 "dramatiq": "Dramatiq, 2 processes × 1 thread"}
        for x in sorted(rows_all, key=lambda x: (x["type"], x["prefetch"], x["system"] != "pika")):
            rows.append([names.get(x["system"], x["system"]), x["type"],
                         x["prefetch"] if x["system"] != "celery" else "1 per process",
                         fmt(x["rate"]), ratio(x["ratio"]) if x["system"] != "pika" else "1",
                         x["rates"]])
        return "\n".join([
            "### W1 with Celery and Dramatiq",
            "",
            f"Same tasks (in each framework's own message format), {n:,} per drain so the slow "
            "ones fit the time budget (their rate is steady long before that). Baseline: plain "
            f"pika {rows_all[0]['pika']} from the same venv, same run." +
            self.noise(self.r["w1_others"]),
            "",
            table(["system", "queue", "prefetch", "tasks/s", "vs plain pika", "runs"], rows),
        ])

    def w2(self) -> str:
        rs = self.r.get("w2", [])
        if not rs:
            return ""
        rows = []
        for system in dict.fromkeys(x["system"] for x in rs):
            xs = [x for x in rs if x["system"] == system]
            rows.append([system, fmt(med(x["makespan"] for x in xs), ".3f") + " s",
                         fmt(med(x["vs_lower_bound"] for x in xs), ".3f") + "×",
                         fmt(med(x["vs_greedy"] for x in xs), ".3f") + "×", len(xs)])
        x0 = rs[0]
        wq = med(x["vs_greedy"] for x in rs if x["system"] == "workqd")
        if wq is not None:
            self.target("W2 makespan", "≤ 1.02× greedy schedule", f"{wq:.3f}×", wq <= 1.02)
        return "\n".join([
            "## W2 fair dispatch",
            "",
            f"{x0['tasks']} tasks, a seeded mix of 20 ms and 400 ms sleeps (20 % long), "
            f"{x0['workers']} workers, prefetch 1, published once every worker consumes. "
            "Makespan = first task start to last task end. Ideal lower bound "
            f"max(sum/4, longest) = {x0['lower_bound']:.3f} s; the zero-overhead greedy schedule "
            f"of the same order (each task to the first free worker) = {x0['greedy']:.3f} s "
            f"({x0['greedy_vs_lower_bound']:.3f}× the bound).",
            "",
            table(["system", "makespan", "vs lower bound", "vs greedy", "runs"], rows),
        ])

    def w3(self) -> str:
        rs = self.r.get("w3", [])
        if not rs:
            return ""
        rows = []
        for qtype in dict.fromkeys(x["type"] for x in rs):
            xs = [x for x in rs if x["type"] == qtype]
            rows.append([qtype, fmt(med(x["redelivery_ms"] for x in xs), ".1f") + " ms",
                         fmt(max(x["redelivery_ms"] for x in xs), ".1f") + " ms",
                         fmt(med(x["pool_full_ms"] for x in xs), ".0f") + " ms",
                         fmt(max(x["pool_full_ms"] for x in xs), ".0f") + " ms",
                         f"{sum(x['lost'] for x in xs)} of {sum(x['tasks'] for x in xs)}", len(xs)])
        red = max(x["redelivery_ms"] for x in rs)
        full = max(x["pool_full_ms"] for x in rs)
        lost = sum(x["lost"] for x in rs)
        self.target("W3 redelivered task running elsewhere", "< 50 ms", f"{red:.1f} ms (worst)",
                    red < 50)
        self.target("W3 pool full again", "< 1 s", f"{full:.0f} ms (worst)", full < 1000)
        self.target("W3 tasks lost", "0", str(lost), lost == 0)
        return "\n".join([
            "## W3 recovery",
            "",
            f"workqd with {rs[0]['workers']} workers at prefetch 1; one runs a long task, the "
            "others are idle. `kill -9` of the busy worker, then: time until the task starts "
            "again (redelivered) in another worker, read from the task's own log; time until "
            "/metrics shows every worker consuming with the dead one replaced; a batch of short "
            "tasks published right after the kill must all complete.",
            "",
            table(["queue", "task running again (median)", "(worst)", "pool full (median)",
                   "(worst)", "tasks lost", "kills"], rows),
        ])

    def w4(self) -> str:
        rs = self.r.get("w4", [])
        if not rs:
            return ""
        rows = []
        for label in dict.fromkeys(x["pika"] for x in rs):
            xs = [x for x in rs if x["pika"] == label]
            for row in summarize_w4(xs):
                rows.append([row["publisher"], label, row_tasks(xs, row["publisher"]),
                             fmt(row["rate"]), fmt(row["inner_rate"]),
                             ratio(row["ratio"]), row["rates"]])
                if row["publisher"] == "workq-submit" and row["ratio"] is not None:
                    self.target(f"W4 workq-submit --file, pika {label}",
                                "≥ 0.95× pipelined pika", f"{row['ratio']:.2f}×",
                                row["ratio"] >= 0.95)
        return "\n".join([
            "## W4 submit",
            "",
            "One ~100 B task per line of a file into a durable classic queue, each publisher a "
            "whole process timed from spawn to exit (interpreter start-up included); the queue "
            "must then hold every task. `workq-submit --file` pipelines confirms (mandatory, a "
            "message id per task); plain pika pipelined keeps up to 1,000 unconfirmed; "
            "one-at-a-time waits for each confirm (`BlockingConnection.confirm_delivery`); Celery "
            "`apply_async` with `confirm_publish`. The slow publishers publish fewer tasks so the "
            "suite fits its time budget; their rate is per task either way.",
            "",
            table(["publisher", "pika", "tasks", "tasks/s (whole process)",
                   "tasks/s (in-process)", "vs pipelined pika", "runs"], rows),
        ])

    def w5(self) -> str:
        rs = self.r.get("w5", [])
        if not rs:
            return ""
        tasks = {"cpu_1ms": "1 ms CPU", "io_5ms": "5 ms I/O wait"}
        venvs = {"1.2.0": "pika 1.2.0", "current": "current pika",
                 "others": "Celery/Dramatiq venv"}
        names = {"pika": "plain pika", "celery": "Celery prefork, acks_late",
                 "dramatiq": "Dramatiq, 1 thread per process"}
        order = {"pika": 0, "workqd": 1, "dramatiq": 2, "celery": 3}
        rows = []
        summary = summarize_w1(rs)
        for x in sorted(summary, key=lambda x: (x["task"], x["type"], x["pika"],
                                                order.get(x["system"], 9))):
            rows.append([tasks.get(x["task"], x["task"]), x["type"], venvs.get(x["pika"], x["pika"]),
                         names.get(x["system"], x["system"]), fmt(x["rate"]),
                         ratio(x["ratio"]) if x["system"] != "pika" else "1", x["rates"]])
            if x["system"] == "workqd" and x["ratio"] is not None:
                self.target(f"W5 {tasks.get(x['task'], x['task'])}, {x['type']}, "
                            f"{venvs.get(x['pika'], x['pika'])}", "≥ 0.98× plain pika",
                            f"{x['ratio']:.2f}×", x["ratio"] >= 0.98)
        w = rs[0]["workers"]
        return "\n".join([
            "## W5 tasks that do something",
            "",
            f"Prefetch 1, {w} worker processes (each system), tasks of 1 ms of CPU "
            "(`benchtasks.cpu_1ms`: a loop on the thread's own CPU clock) or of 5 ms waiting "
            "(`io_5ms`: a sleep), then the W1 stamp. Each row's baseline is plain pika from the "
            "same venv in the same run. " + self.noise(rs),
            "",
            table(["task", "queue", "venv", "system", "tasks/s", "vs plain pika", "runs"], rows),
        ])

    def scale(self) -> str:
        rs = self.r.get("scale", [])
        if not rs:
            return ""
        sizes = list(dict.fromkeys(x["size"] for x in rs))
        workers = sorted(set(x["workers"] for x in rs))
        rows = []
        for size in sizes:
            for w in workers:
                cell = {s: [x for x in rs if x["size"] == size and x["workers"] == w
                            and x["system"] == s] for s in ("pika", "workqd")}
                if not cell["workqd"]:
                    continue
                pk = med(x["rate"] for x in cell["pika"])
                wq = med(x["rate"] for x in cell["workqd"])
                ratios = []
                for x in cell["workqd"]:
                    base = [y["rate"] for y in cell["pika"] if y["run"] == x["run"]]
                    if base:
                        ratios.append(x["rate"] / base[0])
                rows.append([human(size), cell["workqd"][0]["tasks"], w, fmt(pk), fmt(wq),
                             ratio(med(ratios)),
                             fmt(wq * size / 1048576 if wq else None, ".1f")])
        return "\n".join([
            "## Scale",
            "",
            "W1 (classic queue, prefetch 1) with 1, 2, 4 and 8 worker processes and bodies of "
            "100 B, 10 KiB and 1 MiB; median of the runs, workqd against plain pika with the same "
            "number of consumer processes in the same run (pika 1.2.0). Fewer tasks per drain "
            "than W1 so the suite fits its budget.",
            "",
            table(["body", "tasks", "workers", "plain pika tasks/s", "workqd tasks/s",
                   "workqd vs pika", "workqd MiB/s"], rows),
        ])

    def memory(self) -> str:
        rs = self.r.get("memory", [])
        parts = []
        if rs:
            rows = []
            seen = []
            for x in rs:
                k = (x["system"], x["workers"], x["pika"])
                if k in seen:
                    continue
                seen.append(k)
                xs = [y for y in rs if (y["system"], y["workers"], y["pika"]) == k]
                rows.append([x["system"], x["workers"], x["processes"], x["pika"],
                             fmt(med(y["rss_mib"] for y in xs), ".1f"),
                             fmt(med(y["pss_mib"] for y in xs), ".1f")])
                if x["system"] == "workqd" and x["workers"] == 2:
                    rss = med(y["rss_mib"] for y in xs)
                    self.target(f"idle RSS master + 2 workers, pika {x['pika']}", "≤ 60 MiB",
                                f"{rss:.1f} MiB (PSS {med(y['pss_mib'] for y in xs):.1f})",
                                rss <= 60)
            parts += [
                "## Idle memory",
                "",
                "Once every worker consumes from an empty queue, summed over the system's whole "
                "process tree (workqd: master + workers; Celery: main + prefork children; "
                "Dramatiq: main + worker processes). **RSS** = sum of VmRSS from "
                "/proc/PID/status, what `ps` shows: a page shared by several processes counts "
                "in each, which is how the targets are stated. **PSS** = sum of Pss from "
                "/proc/PID/smaps_rollup: shared pages are split among their sharers, so it is "
                "what the tree really costs (forked workers share their master's pages).",
                "",
                table(["system", "workers", "processes", "pika", "RSS MiB", "PSS MiB"], rows),
            ]
        rd = self.r.get("ready", [])
        if rd:
            rows = []
            for label in dict.fromkeys(x["pika"] for x in rd):
                xs = [x for x in rd if x["pika"] == label]
                rz, ac = med(x["readyz_s"] for x in xs), med(x["all_consuming_s"] for x in xs)
                rows.append([label, xs[0]["workers"], f"{rz * 1000:.0f} ms",
                             f"{max(x['readyz_s'] for x in xs) * 1000:.0f} ms",
                             f"{ac * 1000:.0f} ms", len(xs)])
                self.target(f"start to ready (4 workers), pika {label}", "< 1 s",
                            f"{ac * 1000:.0f} ms (all consuming)", ac < 1)
            parts += [
                "",
                "## Start to ready",
                "",
                "From spawning `workqd` (4 workers, existing classic queue) until /readyz answers "
                "200, and until /metrics shows all 4 workers consuming.",
                "",
                table(["pika", "workers", "/readyz 200 (median)", "(worst)",
                       "all consuming (median)", "runs"], rows),
            ]
        return "\n".join(parts)

    def queues(self) -> str:
        q = self.r.get("queues")
        if not q or not q.get("median"):
            return ""
        m = q["median"]["this"]
        size = f"{q['queues']} queues x {q['workers']} workers"
        if q["queues"] >= 50 and q["workers"] >= 2:   # the size the targets are set for
            self.target(f"start to ready, {size}", "< 1.5 s", f"{m['ready_s']:.2f} s",
                        m["ready_s"] < 1.5)
            self.target(f"idle master CPU, {size}", "< 1 % of a core",
                        f"{m['idle_cpu_pct']:.2f} %", m["idle_cpu_pct"] < 1)
            self.target(f"GET /metrics, {size}", "< 10 ms", f"{m['scrape_ms_median']:.1f} ms",
                        m["scrape_ms_median"] < 10)
            self.target(f"control socket status, {size}", "< 20 ms",
                        f"{m['status_ms_median']:.1f} ms", m["status_ms_median"] < 20)
        rows = [["start to ready (master's log)", f"{m['ready_s']:.2f} s"],
                ["start to ready (spawn to the log line)", f"{m['ready_wall_s']:.2f} s"],
                ["idle master CPU", f"{m['idle_cpu_pct']:.2f} % of a core"],
                ["GET /metrics, median / p95", f"{m['scrape_ms_median']:.1f} / "
                 f"{m['scrape_ms_p95']:.1f} ms ({m['scrape_cpu_ms']:.1f} ms master CPU)"],
                ["status on the control socket, median / p95", f"{m['status_ms_median']:.1f} / "
                 f"{m['status_ms_p95']:.1f} ms ({m['status_cpu_ms']:.1f} ms master CPU)"]]
        return "\n".join([
            "## Many queues in one daemon",
            "",
            f"`bench/scale.py`: one workqd with {size} (existing classic queues), medians of "
            f"{len(q['runs'])} run(s): the master's CPU over {q['idle_s']:g} s idle, then "
            f"{q['requests']} scrapes and {q['requests']} `status` requests, one connection "
            "each, timed from connect to the last byte.",
            "",
            table(["", "measured"], rows),
        ])

    def render(self) -> str:
        body = [self.w1(), self.w1_others(), self.w2(), self.w3(), self.w4(), self.w5(),
                self.scale(), self.memory(), self.queues()]
        targets = "\n".join(["## Targets", "",
                             table(["what", "target", "measured", ""], self.targets)])
        method = "\n".join([
            "## How it is measured",
            "",
            "- Every system runs as real processes against the same local RabbitMQ, each in its "
            "own venv; queues are fresh per run, pre-filled with pipelined confirms before any "
            "consumer starts, and deleted afterwards.",
            "- The W1 task is the same function everywhere (`bench/benchtasks.py:stamp`): it "
            "counts its calls and notes the first and last call time in a per-process tmpfs "
            "file. Rate = tasks / (last task end − first task start), so process start-up and "
            "connection set-up are not counted; the bench polls those files, never the system "
            "under test. After each drain the system is stopped gracefully and the queue must be "
            "empty with every task run exactly once, or the run is invalid.",
            "- Run order alternates between runs; each ratio is taken within one run.",
            "- Reproduce: `bash bench/run.sh` (or `make bench`); one part only: "
            "`bench/.venv-bench/bin/python bench/suite.py --py12 bench/.venv-bench/bin/python "
            "--pynew bench/.venv-pika/bin/python --others bench/.venv-others/bin/python "
            "--only w1`.",
        ])
        return "\n\n".join([self.header(), targets, *[b for b in body if b], method]) + "\n"


def row_tasks(xs, publisher):
    return next(x["tasks"] for x in xs if x["publisher"] == publisher)


def human(size: int) -> str:
    if size >= 1 << 20:
        return f"{size >> 20} MiB"
    if size >= 1024:
        return f"{size >> 10} KiB"
    return f"{size} B"


def chart(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {"pika": "#888888", "workqd": "#1f77b4", "dramatiq": "#2ca02c", "celery": "#d62728"}

    ax = axes[0][0]
    w1 = summarize_w1(r.get("w1", []) + r.get("w1_others", []))
    first_pika = next((x["pika"] for x in w1), None)
    cells = [(t, p) for t in ("classic", "quorum") for p in (1, 50)]
    systems = ["pika", "workqd", "dramatiq", "celery"]
    width = 0.2
    for i, s in enumerate(systems):
        ys = []
        for t, p in cells:
            c = [x for x in w1 if x["system"] == s and x["type"] == t and x["prefetch"] == p
                 and (x["pika"] == first_pika or s in ("celery", "dramatiq"))]
            if s == "pika":
                c = [x for x in w1 if x["system"] == s and x["type"] == t and x["prefetch"] == p
                     and x["pika"] == first_pika]
            ys.append(c[0]["rate"] if c else 0)
        ax.bar([j + (i - 1.5) * width for j in range(len(cells))], ys, width, label=s,
               color=colors[s])
    ax.set_xticks(range(len(cells)), [f"{t}\nprefetch {p}" for t, p in cells])
    ax.set_ylabel("tasks/s")
    ax.set_title("W1 drain, 2 workers (higher is better)")
    ax.legend()

    ax = axes[0][1]
    w4 = r.get("w4", [])
    labels, vals = [], []
    for label in dict.fromkeys(x["pika"] for x in w4):
        for row in summarize_w4([x for x in w4 if x["pika"] == label]):
            labels.append(f"{row['publisher']}\n(pika {label})" if label != "-"
                          else row["publisher"])
            vals.append(row["rate"])
    ax.barh(labels, vals, color=["#1f77b4" if "workq" in lab else "#888888" for lab in labels])
    ax.set_xlabel("tasks/s, whole process")
    ax.set_title("W4 submit (higher is better)")
    ax.invert_yaxis()

    ax = axes[1][0]
    sc = r.get("scale", [])
    palette = ["#1f77b4", "#ff7f0e", "#9467bd"]
    for k, size in enumerate(dict.fromkeys(x["size"] for x in sc)):
        for s, style in (("workqd", "-o"), ("pika", "--x")):
            ws = sorted(set(x["workers"] for x in sc if x["size"] == size))
            ys = [med(x["rate"] for x in sc if x["size"] == size and x["workers"] == w
                      and x["system"] == s) for w in ws]
            ax.plot(ws, ys, style, label=f"{s} {human(size)}", color=palette[k % 3])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("worker processes")
    ax.set_ylabel("tasks/s")
    ax.set_title("Scale: W1 prefetch 1 by workers and body size")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[1][1]
    mem = r.get("memory", [])
    keys = list(dict.fromkeys((x["system"], x["workers"], x["pika"]) for x in mem))
    def of(field, k):
        return med(x[field] for x in mem if (x["system"], x["workers"], x["pika"]) == k)
    rss = [of("rss_mib", k) for k in keys]
    pss = [of("pss_mib", k) for k in keys]
    ys = range(len(keys))
    ax.barh([y - 0.2 for y in ys], rss, 0.4, label="RSS (sum of VmRSS)", color="#1f77b4")
    ax.barh([y + 0.2 for y in ys], pss, 0.4, label="PSS (sum of Pss)", color="#aec7e8")
    ax.set_yticks(list(ys), [f"{s} ×{w} (pika {p})" for s, w, p in keys], fontsize=8)
    ax.axvline(60, color="red", linestyle=":", label="target: 60 MiB RSS, master + 2")
    ax.set_xlabel("MiB, whole process tree, idle")
    ax.set_title("Idle memory (lower is better)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)

    m = r["machine"]
    fig.suptitle(f"workqd benchmarks — {m['date']}, {m['cores']} cores ({m['cpu']}), "
                 f"RabbitMQ {m['rabbitmq']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results")
    p.add_argument("--md", required=True)
    p.add_argument("--png")
    a = p.parse_args()
    r = json.loads(Path(a.results).read_text())
    Path(a.md).write_text(Report(r).render())
    print(f"wrote {a.md}")
    if a.png:
        chart(r, a.png)
        print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
