"""Bounded fuzzing of config parsing: whatever the input, only ConfigError (or Invalid) comes out.

Fixed budgets (max_examples) and no deadline, so the run takes a few seconds and
never flakes on a busy machine; derandomized so a failure reproduces.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workqd import config, webauth

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

KEYS = ["broker", "url", "urls", "password_file", "heartbeat", "tls", "ca_file", "cert_file",
        "key_file", "metrics", "listen", "basic_auth", "client_ca_file", "shutdown_timeout", "log",
        "level", "queues", "name", "type", "workers", "prefetch", "handler", "python", "command",
        "timeout", "retry", "attempts", "backoff", "max_redeliveries", "max_tasks_per_worker",
        "max_memory_per_worker", "max_body"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2, max_value=70000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["amqp://u:pw@h:5672/%2F", "amqp://[::1", "amqp://h:99999", "127.0.0.1:²",
                     "[::1]:9464", "m:f", "/bin/true", "512MiB", "quorum", "info", "amq.x",
                     "tasks\n", "pbkdf2_sha256$1000$c2FsdA$" + "A" * 43, "/dev/zero", "."]),
)
TREES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers()),
                        children, max_size=5)),
    max_leaves=12)
# Trees shaped like a config, so the fuzz reaches the per-key converters.
QUEUE = st.dictionaries(st.sampled_from(KEYS[17:]), st.one_of(SCALARS, TREES), max_size=8)
CONFIGS = st.fixed_dictionaries({}, optional={
    "broker": st.dictionaries(st.sampled_from(KEYS[:9]), TREES, max_size=4),
    "metrics": st.dictionaries(st.sampled_from(["listen", "tls", "basic_auth"]), TREES, max_size=3),
    "log": st.dictionaries(st.just("level"), TREES),
    "shutdown_timeout": SCALARS,
    "queues": st.one_of(st.lists(QUEUE, max_size=3), TREES),
})
YAML_TOKENS = st.sampled_from([
    "queues:", "\n", "  ", "- ", "name: a", "handler: {python: m:f}", "&a ", "*a", "<<: ", "[", "]",
    "{", "}", ", ", ": ", "!!binary ", "!!int ", "!!timestamp ", "? ", "'", '"', "#", "---", "...",
    "%YAML 1.1", "\t", "\\x00", "é", "1e9", ".inf", ".nan", "0x1F", "1:2:3", "2024-02-30", "~"])


def only_config_error(call) -> None:
    try:
        call()
    except config.ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p.isprintable() for p in e.problems)


@settings(FUZZ, max_examples=150)  # drawing these trees costs more than parsing them
@given(data=st.one_of(TREES, CONFIGS))
def test_parse_raises_only_config_error(data):
    only_config_error(lambda: config.parse(data, "f.yaml"))


@FUZZ
@given(tokens=st.lists(YAML_TOKENS, max_size=40))
def test_load_of_yaml_ish_text_raises_only_config_error(tmp_path, tokens):
    path = tmp_path / "f.yaml"
    path.write_text("".join(tokens))
    only_config_error(lambda: config.load(str(path)))


@FUZZ
@given(raw=st.binary(max_size=300))
def test_load_of_random_bytes_raises_only_config_error(tmp_path, raw):
    path = tmp_path / "f.yaml"
    path.write_bytes(raw)
    only_config_error(lambda: config.load(str(path)))


URLISH = st.text(alphabet=string.ascii_letters + string.digits + ":/@?&=%[]#.+-_ ²\n", max_size=40)


@FUZZ
@given(url=st.one_of(URLISH, URLISH.map(lambda s: "amqp://" + s)))
def test_amqp_url_raises_only_invalid_and_never_shows_the_password(url):
    try:
        config.amqp_url(url)
    except config.Invalid as e:
        if "@" in url and ":" in url.partition("://")[2].rpartition("@")[0]:
            password = url.partition("://")[2].rpartition("@")[0].partition(":")[2]
            if len(password) >= 4:
                assert password not in str(e)


@FUZZ
@given(line=st.one_of(st.text(max_size=60),
                      st.builds(lambda a, b, c: f"pbkdf2_sha256${a}${b}${c}", st.integers(0, 10**8),
                                st.text(string.ascii_letters + "-_=", max_size=30),
                                st.text(string.ascii_letters + "-_=", max_size=50))),
       password=st.text(max_size=20))
def test_verify_password_never_raises(line, password):
    assert webauth.verify_password(line, password) in (True, False)


@pytest.mark.parametrize("password", ["pw", "", "é ü", "x" * 200])
def test_hash_and_verify_round_trip(password):
    line = webauth.hash_password(password, iterations=1000)
    assert webauth.verify_password(line, password)
    assert not webauth.verify_password(line, password + "x")
