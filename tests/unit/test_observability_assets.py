"""The operator's observability assets: Prometheus alert rules and the Grafana dashboard.

The metric names they may use are not listed here: they come from workqd.metrics
itself, rendered for a master made of a real pool, real shared-memory slots and a
real poller. A metric renamed in the code breaks this test, not an operator's
dashboard at 3 a.m.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from workqd import state
from workqd.config import Limits
from workqd.metrics import Exposition
from workqd.slots import COUNTER_WORDS, OUTCOME_WORDS, SlotTable
from workqd.vocab import DEAD_LETTER, RESTART_REASONS, SUCCESS

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "packaging" / "prometheus" / "workqd-rules.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "workqd-rules.test.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "workqd.json"

# Series the assets may use that workqd does not export: Prometheus adds `up` per target.
PROMETHEUS_SERIES = {"up"}
# Grafana's built-in variables, and what stands in for them when promtool parses a query.
GRAFANA_BUILTINS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


# --- what workqd exports ------------------------------------------------------

def _snapshot() -> state.Snapshot:
    """One queue whose every series has a sample: a busy worker with settled tasks, a
    crash restart, a polled queue depth."""
    slot = SlotTable(capacity=2).allocate(1)
    slot.record(DEAD_LETTER, 2.0)
    slot.record(SUCCESS, 0.3)
    slot.begin("m-1", redelivered=True, started=time.monotonic())
    counters = dict.fromkeys(COUNTER_WORDS, 0)
    counters.update(slot.counters())
    assert counters[OUTCOME_WORDS[SUCCESS]] == 1
    restarts = dict.fromkeys(RESTART_REASONS, 0)
    restarts["crash"] = 1
    q = state.QueueView(name="tasks", size=1, pool_state="running",
                        counters=state.frozen(counters), restarts=state.frozen(restarts),
                        workers=(state.WorkerView(1, 4242, state.W_BUSY, "m-1"),), consuming=1,
                        depth=(5, 1, 2),
                        limits=Limits(concurrency=3, rate=20.0, rate_text="20/s", burst=1))
    sched = state.ScheduleView(name="nightly", queue="reports", leading=True, leader="h1",
                               last_fired=1.7e9, next=1.7e9 + 86400, fired=3)
    return state.Snapshot(phase=state.READY, queues=(q,), broker_connected=True, loop_age=0.0,
                          version="0.0-test", delayed=7, schedules=(sched,))


@pytest.fixture(scope="module")
def exposition() -> str:
    return Exposition().render(_snapshot())[0].decode()


@pytest.fixture(scope="module")
def families(exposition: str) -> dict[str, dict]:
    """Family name -> {"type", "help", "samples": {sample name: set of label names}}."""
    fams: dict[str, dict] = {}
    for line in exposition.splitlines():
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            fams.setdefault(name, {"samples": {}})["help"] = help_
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            fams.setdefault(name, {"samples": {}})["type"] = kind
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
            assert m, f"unparsable exposition line: {line!r}"
            labels = set(re.findall(r'([a-zA-Z_]\w*)="', m.group(2) or ""))
            family = next(f for f in sorted(fams, key=len, reverse=True)
                          if m.group(1).startswith(f))
            fams[family]["samples"].setdefault(m.group(1), set()).update(labels)
    return fams


@pytest.fixture(scope="module")
def exported(families: dict[str, dict]) -> dict[str, set[str]]:
    """Every series name a query may name -> its label names (job and instance added)."""
    names = {s: labels | {"job", "instance"}
             for fam in families.values() for s, labels in fam["samples"].items()}
    names.update({s: {"job", "instance"} for s in PROMETHEUS_SERIES})
    return names


def test_every_family_has_help_type_and_samples(families):
    assert families, "workqd.metrics exported nothing"
    for name, fam in families.items():
        assert name.startswith("workqd_"), name
        assert fam.get("help"), f"{name}: no HELP text"
        assert fam.get("type") in {"counter", "gauge", "histogram"}, f"{name}: {fam.get('type')}"
        assert fam["samples"], f"{name}: no sample (the fake master misses something)"
        if fam["type"] == "counter":  # the text format names the family with or without _total
            assert set(fam["samples"]) == {name.removesuffix("_total") + "_total"}, name
        if fam["type"] == "histogram":
            assert set(fam["samples"]) == {f"{name}_{s}" for s in ("bucket", "sum", "count")}


def test_exposition_passes_promtool_lint(exposition):
    out = subprocess.run([promtool(), "check", "metrics"], input=exposition, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


# --- PromQL: which series does an expression name? -------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "inf", "nan"}


def series_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions,
    aggregations, keywords, label names, strings, durations or numbers."""
    e = _STRING.sub('""', expr)
    e = _MATCHERS.sub(" ", e)
    e = _RANGE.sub(" ", e)
    e = _GROUPING.sub(" ", e)
    e = re.sub(r"\$\w+", " ", e)
    return {m.group(1) for m in _IDENT.finditer(e)
            if not m.group(2) and m.group(1).lower() not in _KEYWORDS}


@pytest.mark.parametrize("expr, names", [
    ('up{job="workqd"} == 0', {"up"}),
    ('sum by (queue, le) (rate(a_bucket{queue=~"$queue", x="rate(b)"}[$__rate_interval]))',
     {"a_bucket"}),
    ("histogram_quantile(0.99, sum without (pod) (rate(a_bucket[5m:1m] offset 1h)))",
     {"a_bucket"}),
    ("a / on (queue) group_left (version) b > bool 1e3 unless c", {"a", "b", "c"}),
    ("deriv(a[15m]) > 0 and on (job) sum by (job) (increase(b{o='x'}[15m])) < 1", {"a", "b"}),
    ("sum(max by (queue) (ready))", {"ready"}),
])
def test_series_names(expr, names):
    assert series_names(expr) == names


# --- alert rules --------------------------------------------------------------

def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        why = "promtool not found (Debian package prometheus)"
        if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
            pytest.fail(why)
        pytest.skip(why)
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)
    print(out.stdout, out.stderr)
    return out


def load_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_rules_pass_promtool_check():
    out = run_promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_rules_pass_their_unit_tests():
    out = run_promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    fired = {case["alertname"] for test in tests["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    alerts = {r["alert"] for r in load_rules() if "alert" in r}
    assert alerts - fired == set(), "alerts no unit test proves to fire"


@pytest.mark.parametrize("rule", load_rules(), ids=lambda r: r.get("alert") or r["record"])
def test_rule_names_only_exported_series(rule, exported):
    unknown = series_names(rule["expr"]) - set(exported)
    assert not unknown, f"{rule.get('alert') or rule['record']} names series workqd does not " \
                        f"export: {sorted(unknown)}; exported: {sorted(exported)}"


@pytest.mark.parametrize("rule", [r for r in load_rules() if "alert" in r],
                         ids=lambda r: r["alert"])
def test_alert_is_actionable(rule, exported):
    assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{rule['alert']}: no for:"
    assert rule.get("labels", {}).get("severity") in {"critical", "warning"}
    notes = rule.get("annotations", {})
    assert notes.get("summary") and notes.get("description"), rule["alert"]
    text = notes["summary"] + notes["description"]
    assert "$labels.instance" in text, f"{rule['alert']}: annotations do not name the instance"
    # Alerts on per-queue series must say which queue.
    per_queue = all("queue" in exported.get(s, set()) for s in series_names(rule["expr"]))
    if per_queue:
        assert "$labels.queue" in text, f"{rule['alert']}: annotations do not name the queue"


# --- dashboard ----------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panel_targets(dashboard: dict):
    """(where, expr) for every query: panel targets and query variables."""
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            yield f"panel {panel['id']} ({panel['title']}) {t['refId']}", t["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"].strip())
            assert m, f"variable {var['name']}: not label_values(selector, label)"
            yield f"variable {var['name']}", m.group(1)


def test_dashboard_is_importable(dashboard):
    assert dashboard["schemaVersion"] >= 36, "needs Grafana 9 or later"
    assert dashboard["uid"] and dashboard["title"] and dashboard.get("id") is None
    inputs = {i["name"]: i for i in dashboard.get("__inputs", [])}
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "queue"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"] == DATASOURCE, name
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_dashboard_panels_use_the_datasource_variable_and_fit_the_grid(dashboard):
    cells: dict[tuple[int, int], int] = {}
    for panel in dashboard["panels"]:
        where = f"panel {panel['id']} ({panel['title']})"
        assert panel["datasource"] == DATASOURCE, where
        assert panel["targets"], f"{where}: no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{where}: duplicate refIds"
        for t in panel["targets"]:
            assert t["datasource"] == DATASOURCE, where
            assert t["expr"].strip(), where
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{where}: {g}"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                other = cells.setdefault((x, y), panel["id"])
                assert other == panel["id"], f"{where} overlaps panel {other}"


def test_dashboard_variables_are_defined(dashboard):
    defined = {f"${v['name']}" for v in dashboard["templating"]["list"]} | set(GRAFANA_BUILTINS)
    for where, expr in panel_targets(dashboard):
        used = set(re.findall(r"\$\w+", expr))
        assert used <= defined, f"{where}: undefined {sorted(used - defined)}"


def test_dashboard_queries_are_valid_promql(dashboard, tmp_path):
    """promtool parses every query, Grafana variables filled in, as a recording rule."""
    rules = []
    for i, (where, expr) in enumerate(panel_targets(dashboard)):
        for var, value in GRAFANA_BUILTINS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr,
                      "labels": {"where": where}})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_names_only_exported_series(dashboard, exported):
    for where, expr in panel_targets(dashboard):
        unknown = series_names(expr) - set(exported)
        assert not unknown, f"{where} names series workqd does not export: {sorted(unknown)}"


def test_dashboard_shows_every_exported_family(dashboard, families):
    used = set().union(*(series_names(e) for _, e in panel_targets(dashboard)))
    missing = [f for f, fam in families.items() if not used & set(fam["samples"])]
    assert not missing, f"metrics workqd exports that no dashboard panel shows: {missing}"
