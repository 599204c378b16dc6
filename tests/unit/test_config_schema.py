"""The schema (workqd/config/schema.py) against what it drives: the generated key
reference in workqd.yaml(5) and etc/workqd/workqd.yaml, the readers' limits, and
the model's defaults. Pure logic: no broker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from workqd import config
from workqd.config import docgen, schema

ROOT = Path(__file__).resolve().parents[2]
HANDLER = {"python": "workqd.handlers:noop"}
# Sections where one key can be set alone in an otherwise minimal file.
SETTABLE = ("", "broker", "metrics", "log", "queues[]", "queues[].retry")
# Every name workqd.config offered as one module; other modules and tools import them.
PUBLIC_NAMES = (
    "Autoscale", "BROKER_CONSUMER_TIMEOUT", "Binding", "Broker", "Config", "ConfigError",
    "DEFAULT_JITTER", "DEFAULT_PATH", "DEFAULT_URL", "HIDDEN_VARIABLES", "Handler", "Invalid",
    "JITTER_STEPS", "MAX_ATTEMPTS", "MAX_BACKOFF", "MAX_BODY", "MAX_CONFIG_BYTES",
    "MAX_DEFERRALS", "MAX_DEPTH", "MAX_MEMORY", "MAX_NAME_BYTES",
    "MAX_NODES", "MAX_NUMBER_CHARS", "MAX_REDELIVERIES", "MAX_SECONDS", "MAX_SECRET_BYTES",
    "MAX_SOCKET_PATH", "MAX_TASKS_PER_WORKER", "MAX_TOTAL_WORKERS", "MAX_VALUES", "MetricsTLS",
    "OWNED_ARGUMENTS", "Queue", "Retry", "TLS", "U16", "URL_OPTIONS", "URL_OPTIONS_OVERRIDDEN",
    "amqp_url", "check_listen", "choice", "escape", "fraction", "host_name", "jitter_step",
    "listen_address", "load", "parse", "path_text", "python_ref", "queue_name",
    "read_password", "redact", "seconds", "size", "sizes", "text", "url_warnings",
    "virtualenv_site_packages", "whole")


def with_key(path: str, value) -> dict:
    """A minimal valid file with the key at ``path`` set to ``value``."""
    data: dict = {"queues": [{"name": "tasks", "handler": dict(HANDLER)}]}
    node = data
    *parents, name = path.split(".")
    for part in parents:
        if part == "schedules[]":
            node = data.setdefault("schedules", [{"name": "s", "queue": "tasks", "every": 60}])[0]
            continue
        node = node["queues"][0] if part == "queues[]" else node.setdefault(part, {})
    node[name] = value
    return data


def concrete(path: str) -> str:
    return path.replace("queues[]", "queues[0]")


def test_generated_docs_match_the_schema():
    for path, text in docgen.rendered(ROOT).items():
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} differs from workqd/config/schema.py: run make config-docs")


def test_every_key_appears_in_both_references():
    man = (ROOT / docgen.MAN_PAGE).read_text()
    default = (ROOT / docgen.DEFAULT_CONFIG).read_text()
    for key in schema.KEYS:
        assert f".B {key.path.replace('-', chr(92) + '-')}\n" in man
        assert f"# {key.path}: {docgen.default_text(key)}\n" in default


def test_docgen_check_fails_on_a_stale_copy_and_rewrites_it(tmp_path, capsys):
    for rel in (docgen.MAN_PAGE, docgen.DEFAULT_CONFIG):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    man = tmp_path / docgen.MAN_PAGE
    man.write_text(man.read_text().replace("Seconds a task may run; past", "Seconds a task ran; past"))
    assert docgen.main(["--check", str(tmp_path)]) == 1
    assert "workqd.yaml.5" in capsys.readouterr().err
    assert docgen.main([str(tmp_path)]) == 0
    assert docgen.main(["--check", str(tmp_path)]) == 0
    assert man.read_text() == (ROOT / docgen.MAN_PAGE).read_text()


def test_shipped_config_keeps_its_values_and_parses_as_before():
    cfg = config.load(str(ROOT / docgen.DEFAULT_CONFIG))
    text = (ROOT / docgen.DEFAULT_CONFIG).read_text()
    active = text.split(docgen.YAML_BEGIN)[0]
    assert cfg == config.parse(__import__("yaml").safe_load(active), cfg.path,
                               (ROOT / docgen.DEFAULT_CONFIG).stat().st_mode)
    assert cfg.warnings == ()


def test_keys_are_unique_and_each_has_a_parent_and_a_doc_line():
    paths = [k.path for k in schema.KEYS]
    assert len(paths) == len(set(paths))
    for key in schema.KEYS:
        assert key.section == "" or key.section.removesuffix("[]") in schema.BY_PATH, key.path
        assert key.doc and "\n" not in key.doc and len(key.doc) <= 120, key.path
        assert key.reload in (schema.RELOAD, schema.RESTART), key.path
        assert not (key.required and key.default is not None), key.path


def test_metrics_and_control_need_a_restart_everything_else_applies_on_reload():
    # master.reload keeps the running metrics endpoint and control socket.
    for key in schema.KEYS:
        restart = key.path.split(".")[0] in ("metrics", "control")
        assert (key.reload == schema.RESTART) == restart, key.path


@pytest.mark.parametrize("key", [k for k in schema.KEYS if k.section in SETTABLE
                                 and k.default is not None], ids=lambda k: k.path)
def test_the_declared_default_is_what_leaving_the_key_out_gives(key):
    """The model's dataclass defaults and the schema's agree, key by key."""
    minimal = config.parse(with_key("queues[].name", "tasks"), "x.yaml")
    assert config.parse(with_key(key.path, key.default), "x.yaml") == minimal


def _outside(key: schema.Key) -> list:
    """Values just outside the key's range."""
    below = key.low - 1 if key.type != "seconds" or key.low == 0 else key.low / 2
    return [below, key.high + 1]


RANGED = [k for k in schema.KEYS if k.section in SETTABLE and isinstance(k.low, (int, float))]


@pytest.mark.parametrize("key", RANGED, ids=lambda k: k.path)
def test_the_declared_range_is_the_one_enforced(key):
    for inside in (key.low, key.high):
        config.parse(with_key(key.path, inside), "x.yaml")
    for outside in _outside(key):
        with pytest.raises(config.ConfigError) as e:
            config.parse(with_key(key.path, outside), "x.yaml")
        assert [line.split(": ")[1] for line in e.value.problems] == [concrete(key.path)]


@pytest.mark.parametrize("key", [k for k in schema.KEYS if k.choices], ids=lambda k: k.path)
def test_the_declared_choices_are_the_ones_enforced(key):
    for choice in key.choices:
        config.parse(with_key(key.path, choice), "x.yaml")
    with pytest.raises(config.ConfigError) as e:
        config.parse(with_key(key.path, "bogus"), "x.yaml")
    assert f"must be one of {', '.join(key.choices)}" in e.value.problems[0]


@pytest.mark.parametrize("section", sorted({k.section for k in schema.KEYS} - {
    "queues[].handler.environment", "metrics.basic_auth", "queues[].arguments"}))
def test_a_key_the_schema_does_not_declare_is_refused(section):
    path = f"{section}.undeclared" if section else "undeclared"
    data = with_key(path, 1)
    if section.startswith("queues[].workers"):
        data = with_key("queues[].workers", {"min": 1, "max": 2, "undeclared": 1})
    if section.startswith("queues[].retry.backoff"):
        data = with_key("queues[].retry.backoff", {"initial": 1, "undeclared": 1})
    if section == "queues[].bindings[]":
        data = with_key("queues[].bindings", [{"exchange": "uploads", "undeclared": 1}])
    with pytest.raises(config.ConfigError) as e:
        config.parse(data, "x.yaml")
    (line,) = e.value.problems
    assert "unknown key" in line and "undeclared" in line
    known = line.rpartition("(")[2].removeprefix("known: ").rstrip(")").split(", ")
    assert sorted(known) == sorted(schema.names(section))


def test_the_new_queue_keys_are_declared_with_their_limits():
    imp = schema.BY_PATH["queues[].import_timeout"]
    assert (imp.default, imp.low, imp.high, imp.reload) == (120, 1, 86400, schema.RELOAD)
    reply = schema.BY_PATH["queues[].allow_reply_queues"]
    assert (reply.type, reply.default) == ("true|false", False)
    q = config.parse(with_key("queues[].allow_reply_queues", True), "x.yaml").queues[0]
    assert q.allow_reply_queues is True and q.import_timeout == 120.0


def test_every_public_name_of_the_config_module_is_still_there():
    assert [n for n in PUBLIC_NAMES if not hasattr(config, n)] == []


def test_the_declared_defaults_inside_the_mapping_forms():
    def default(path):
        return schema.BY_PATH[path].default

    q = config.parse(with_key("queues[].workers", {"min": 1, "max": 2}), "x.yaml").queues[0]
    assert q.autoscale.idle_after == default("queues[].workers.idle_after")
    q = config.parse(with_key("queues[].retry", {"backoff": {"initial": 1}}), "x.yaml").queues[0]
    assert q.retry.jitter == default("queues[].retry.backoff.jitter")
    q = config.parse(with_key("queues[].retry", {"attempts": 40, "backoff": {
        "initial": 1, "jitter": 0}}), "x.yaml").queues[0]
    assert max(q.retry.backoff) == default("queues[].retry.backoff.max")
    q = config.parse(with_key("queues[].bindings", [{"exchange": "x"}]), "x.yaml").queues[0]
    assert q.bindings[0].routing_key == default("queues[].bindings[].routing_key")
