"""A corpus of bad config files: each refused with one line per problem.

Every file must give exit status 2, one stderr line per problem that names the
file and the key, no traceback, no password, within 5 s (CPU time for the
CLI runs, so that a busy shared machine cannot fail the test). The files are written
to tmp_path at test time. Every file goes through what the command line does
(``config.load`` and ``config.check_listen``) in-process; the special files and
every eighth other one also through the real ``python -m workqd.cli --check``,
several in parallel, with the same assertions.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from workqd import config, webauth

PASSWORD = "s3cr3t-Pw"  # must never appear on stderr
HANDLER = {"python": "workqd.handlers:noop"}
HASH = webauth.hash_password("pw", iterations=1000)


def q(**overrides) -> dict:
    return {"name": "tasks", "handler": HANDLER, **overrides}


def cfg(queue: dict | None = None, **top) -> str:
    """A YAML file that is valid but for what the arguments change."""
    return yaml.safe_dump({"queues": [queue if queue is not None else q()], **top},
                          allow_unicode=False)


def broker(**b) -> str:
    return cfg(broker=b)


def url(u: str) -> str:
    return broker(url=u)


def metrics(**m) -> str:
    return cfg(metrics=m)


def retry(**r) -> str:
    return cfg(q(retry=r))


GOOD_Q = "queues:\n  - name: tasks\n    handler: {python: 'workqd.handlers:noop'}\n"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
) + GOOD_Q
MERGE_BOMB = "a: &a {x: 1, y: 2, z: 3}\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} {{<<: [{', '.join(['*' + chr(97 + i)] * 9)}]}}\n"
    for i in range(8)) + GOOD_Q

# (id, content, [(key path, fragment), ...]); key "" means the line is "<file>: <message>".
# Content may be str (written as UTF-8), bytes, or the name of a special file made by
# `special`. "{tmp}" in content is the directory holding the auxiliary files.
CASES: list[tuple[str, object, list[tuple[str, str]]]] = [
    # --- files ---
    ("fifo", "special:fifo", [("", "is a FIFO, not a regular file")]),
    ("dev-zero", "special:/dev/zero", [("", "is a character device")]),
    ("directory", "special:dir", [("", "is a directory")]),
    ("50MB", "special:50MB", [("", "is larger than 1MiB")]),
    ("1MiB+1", "special:1MiB+1", [("", "is larger than 1MiB")]),
    ("missing", "special:missing", [("", "no such file")]),
    ("symlink-loop", "special:loop", [("", "cannot read: Too many levels of symbolic links")]),
    ("not-utf8", b"queues: [\xff\xfe]\n", [("", "not UTF-8 text")]),
    ("latin1-name", b"queues:\n  - name: caf\xe9\n", [("", "not UTF-8 text")]),
    ("nul-byte", b"queues: []\n\x00\n", [("", "YAML syntax error")]),
    ("bell", "queues: [\x07]\n", [("", "YAML syntax error")]),
    # --- YAML shape and limits ---
    ("alias-bomb", BOMB, [("", "aliases expand to more than")]),
    ("merge-bomb", MERGE_BOMB, [("", "aliases expand to more than")]),
    ("alias-cycle", "a: &a [*a]\n" + GOOD_Q, [("a[0]", "refers to a value that contains it")]),
    ("deep-600-flow-list", "x: " + "[" * 600 + "]" * 600 + "\n" + GOOD_Q, [("x[0][0][0]...", "nested deeper than")]),
    ("deep-600-flow-map", "x: " + "{a: " * 600 + "1" + "}" * 600 + "\n" + GOOD_Q, [("x.a.a.a...", "nested deeper than")]),
    ("deep-block", "x:\n" + "".join("  " * i + "- \n" for i in range(1, 100)) + GOOD_Q, [("x[0][0][0]...", "nested deeper than")]),
    ("30000-values", "x: [" + "1, " * 30000 + "]\n" + GOOD_Q, [("x", "more than 20000 values")]),
    ("dup-queues", GOOD_Q + "queues: []\n", [("queues", "given twice (lines 1 and 4)")]),
    ("dup-timeout", GOOD_Q + "    timeout: 5\n    timeout: 6\n", [("queues[0].timeout", "given twice (lines 4 and 5)")]),
    ("dup-url", "broker:\n  url: amqp://h/\n  url: amqp://g/\n" + GOOD_Q, [("broker.url", "given twice (lines 2 and 3)")]),
    ("dup-flow", "broker: {heartbeat: 1, heartbeat: 2}\n" + GOOD_Q, [("broker.heartbeat", "given twice (line 1, columns")]),
    ("dup-two", GOOD_Q + "    workers: 1\n    workers: 2\nlog: {level: info, level: debug}\n",
     [("queues[0].workers", "lines 4 and 5"), ("log.level", "given twice")]),
    ("syntax-unclosed", "queues: [\n  - name: a\n", [("", "YAML syntax error: line")]),
    ("syntax-tab", "queues:\n\t- name: a\n", [("", "YAML syntax error")]),
    ("syntax-indent", "queues:\n  - name: a\n   handler: x\n", [("", "YAML syntax error")]),
    ("two-documents", GOOD_Q + "---\nqueues: []\n", [("", "but found another document")]),
    ("python-tag", "x: !!python/object/apply:os.system [true]\n" + GOOD_Q, [("", "could not determine a constructor")]),
    ("unhashable-key", "? [a, b]\n: 1\n" + GOOD_Q, [("", "found unhashable key")]),
    ("huge-int", "x: " + "9" * 5000 + "\n" + GOOD_Q, [("x", "a number of 5000 characters")]),
    ("sexagesimal", "x: 1" + ":1" * 2000 + "\n" + GOOD_Q, [("x", "a number of")]),
    ("bad-date", "x: 2024-02-30\n" + GOOD_Q, [("", "YAML value error: day is out of range")]),
    ("bad-timestamp-tag", "x: !!timestamp nope\n" + GOOD_Q, [("", "YAML value error")]),
    ("bad-binary", "x: !!binary 'A'\n" + GOOD_Q, [("", "YAML syntax error")]),
    ("top-list", "- a\n- b\n", [("", "must be a mapping")]),
    ("top-string", "just a string\n", [("", "must be a mapping")]),
    ("top-int", "42\n", [("", "must be a mapping")]),
    ("empty", "", [("queues", "must be a non-empty list")]),
    ("comments-only", "# nothing\n", [("queues", "must be a non-empty list")]),
    # --- top level ---
    ("unknown-top", cfg(colour="red"), [("colour", "unknown key")]),
    ("int-key", "1: x\n" + GOOD_Q, [("1", "unknown key")]),
    ("shutdown-neg", cfg(shutdown_timeout=-1), [("shutdown_timeout", ">= 0")]),
    ("shutdown-inf", cfg(shutdown_timeout=float("inf")), [("shutdown_timeout", "finite")]),
    ("shutdown-nan", cfg(shutdown_timeout=float("nan")), [("shutdown_timeout", "finite")]),
    ("shutdown-str", cfg(shutdown_timeout="30"), [("shutdown_timeout", "number of seconds")]),
    ("shutdown-huge", cfg(shutdown_timeout=1e12), [("shutdown_timeout", "at most")]),
    ("shutdown-bool", cfg(shutdown_timeout=True), [("shutdown_timeout", "number of seconds")]),
    ("log-upper", cfg(log={"level": "INFO"}), [("log.level", "must be one of")]),
    ("log-int", cfg(log={"level": 3}), [("log.level", "must be one of")]),
    ("log-list", cfg(log=["info"]), [("log", "must be a mapping")]),
    ("log-unknown", cfg(log={"colour": "red"}), [("log.colour", "unknown key")]),
    ("metrics-list", cfg(metrics=[1]), [("metrics", "must be a mapping")]),
    ("broker-string", cfg(broker="amqp://h/"), [("broker", "must be a mapping")]),
    # --- broker URLs ---
    ("url-http", url("http://h/"), [("broker.url", "amqp:// or amqps://")]),
    ("url-empty", url(""), [("broker.url", "non-empty string")]),
    ("url-int", broker(url=5), [("broker.url", "non-empty string")]),
    ("url-space", url("amqp://h /"), [("broker.url", "without spaces")]),
    ("url-newline", url("amqp://h/\n"), [("broker.url", "without spaces or control")]),
    ("url-v6-open", url(f"amqp://u:{PASSWORD}@[::1"), [("broker.url", "[ADDRESS]:PORT")]),
    ("url-v6-bad", url("amqp://[zz::1]:5672/"), [("broker.url", "IP address or a host name")]),
    ("url-port-big", url(f"amqp://u:{PASSWORD}@h:99999"), [("broker.url", "port must be a number from 1 to 65535")]),
    ("url-port-0", url("amqp://h:0/"), [("broker.url", "port must be")]),
    ("url-port-sup", url("amqp://h:²/"), [("broker.url", "port must be")]),
    ("url-port-word", url("amqp://h:abc/"), [("broker.url", "port must be")]),
    ("url-port-empty", url("amqp://h:/"), [("broker.url", "port must be")]),
    ("url-no-host", url("amqp://:5672/"), [("broker.url", "no host")]),
    ("url-nothing", url("amqp://"), [("broker.url", "no host")]),
    ("url-host-bad", url("amqp://h$st/"), [("broker.url", "host name")]),
    ("url-host-digits", url("amqp://1.2.3/"), [("broker.url", "host name")]),
    ("url-two-vhosts", url("amqp://h/a/b"), [("broker.url", "one path segment")]),
    ("url-vhost-latin1", url("amqp://h/%ff"), [("broker.url", "not UTF-8")]),
    ("url-vhost-ctl", url("amqp://h/%0a"), [("broker.url", "control characters")]),
    ("url-vhost-long", url("amqp://h/" + "v" * 256), [("broker.url", "longer than 255")]),
    ("url-fragment", url("amqp://h/#x"), [("broker.url", "#fragment")]),
    ("url-query-unknown", url("amqp://h/?bogus=1"), [("broker.url", 'unknown query option "bogus"')]),
    ("url-query-ssl", url("amqp://h/?ssl_options={}"), [("broker.url", "broker.tls")]),
    ("url-query-hb-word", url("amqp://h/?heartbeat=abc"), [("broker.url", "whole number")]),
    ("url-query-hb-big", url("amqp://h/?heartbeat=70000"), [("broker.url", "at most 65535")]),
    ("url-query-frame", url("amqp://h/?frame_max=10"), [("broker.url", "pika refuses")]),
    ("url-query-chan", url("amqp://h/?channel_max=0"), [("broker.url", "pika refuses")]),
    ("url-query-nan", url("amqp://h/?socket_timeout=nan"), [("broker.url", "finite number")]),
    ("url-query-neg", url("amqp://h/?socket_timeout=-1"), [("broker.url", "pika refuses")]),
    ("url-query-twice", url("amqp://h/?locale=a&locale=b"), [("broker.url", "given twice")]),
    ("url-query-props", url("amqp://h/?client_properties=5"), [("broker.url", "dict literal")]),
    ("url-query-tcp", url("amqp://h/?tcp_options=((((("), [("broker.url", "dict literal")]),
    ("url-query-malformed", url("amqp://h/?a&&b"), [("broker.url", "malformed")]),
    ("url-user-no-pw", url("amqp://app@h/"), [("broker.url", "names a user but no password")]),
    ("url-empty-user", url(f"amqp://:{PASSWORD}@h/"), [("broker.url", "user name is empty")]),
    ("url-pw-latin1", url("amqp://u:%ff@h/"), [("broker.url", "password is not UTF-8")]),
    ("url-pw-slash", url(f"amqp://u:{PASSWORD}/x@h/"), [("broker.url", "%-encoded")]),
    ("url-pw-hash", url(f"amqp://u:{PASSWORD}#x@h/"), [("broker.url", "%-encoded")]),
    ("url-and-urls", broker(url="amqp://h/", urls=["amqp://g/"]), [("broker", "either url or urls")]),
    ("urls-empty", broker(urls=[]), [("broker.urls", "non-empty list")]),
    ("urls-string", broker(urls=f"amqp://u:{PASSWORD}@h/"), [("broker.urls", "non-empty list")]),
    ("urls-null", broker(urls=[None]), [("broker.urls[0]", "non-empty string")]),
    ("urls-second-bad", broker(urls=["amqp://h/", "amqp://g:70000/"]), [("broker.urls[1]", "port")]),
    ("heartbeat-big", broker(heartbeat=65536), [("broker.heartbeat", "at most 65535")]),
    ("heartbeat-neg", broker(heartbeat=-1), [("broker.heartbeat", ">= 0")]),
    ("heartbeat-float", broker(heartbeat=1.5), [("broker.heartbeat", "whole number")]),
    ("heartbeat-str", broker(heartbeat="30"), [("broker.heartbeat", "whole number")]),
    ("heartbeat-bool", broker(heartbeat=True), [("broker.heartbeat", "whole number")]),
    ("broker-unknown", broker(password=PASSWORD), [("broker.password", "unknown key")]),
    # --- password_file ---
    ("pw-missing", broker(password_file="{tmp}/nope"), [("broker.password_file", "No such file")]),
    ("pw-dir", broker(password_file="{tmp}"), [("broker.password_file", "is a directory")]),
    ("pw-fifo", broker(password_file="{tmp}/fifo"), [("broker.password_file", "is a FIFO")]),
    ("pw-dev-zero", broker(password_file="/dev/zero"), [("broker.password_file", "character device")]),
    ("pw-empty", broker(password_file="{tmp}/pw-empty"), [("broker.password_file", "is empty")]),
    ("pw-latin1", broker(password_file="{tmp}/pw-latin1"), [("broker.password_file", "not UTF-8")]),
    ("pw-two-lines", broker(password_file="{tmp}/pw-two-lines"), [("broker.password_file", "more than one line")]),
    ("pw-big", broker(password_file="{tmp}/pw-big"), [("broker.password_file", "larger than 64KiB")]),
    ("pw-empty-name", broker(password_file=""), [("broker.password_file", "non-empty string")]),
    ("pw-int", broker(password_file=5), [("broker.password_file", "non-empty string")]),
    ("pw-ctl-name", broker(password_file="/etc/x\n"), [("broker.password_file", "control characters")]),
    # --- broker.tls ---
    ("tls-string", broker(url="amqps://h/", tls="yes"), [("broker.tls", "must be a mapping")]),
    ("tls-unknown", broker(url="amqps://h/", tls={"ca": "x"}), [("broker.tls.ca", "unknown key")]),
    ("tls-ca-missing", broker(url="amqps://h/", tls={"ca_file": "{tmp}/nope"}), [("broker.tls.ca_file", "No such file")]),
    ("tls-ca-dir", broker(url="amqps://h/", tls={"ca_file": "{tmp}"}), [("broker.tls.ca_file", "is a directory")]),
    ("tls-ca-fifo", broker(url="amqps://h/", tls={"ca_file": "{tmp}/fifo"}), [("broker.tls.ca_file", "is a FIFO")]),
    ("tls-ca-not-cert", broker(url="amqps://h/", tls={"ca_file": "{tmp}/pw-ok"}), [("broker.tls", "no usable CA certificate")]),
    ("tls-cert-missing", broker(url="amqps://h/", tls={"cert_file": "{tmp}/nope", "key_file": "{tmp}/key.pem"}),
     [("broker.tls.cert_file", "No such file")]),
    ("tls-key-only", broker(url="amqps://h/", tls={"key_file": "{tmp}/key.pem"}), [("broker.tls.key_file", "needs cert_file")]),
    ("tls-mismatch", broker(url="amqps://h/", tls={"cert_file": "{tmp}/cert.pem", "key_file": "{tmp}/other-key.pem"}),
     [("broker.tls", "cannot load the certificate")]),
    ("tls-encrypted-key", broker(url="amqps://h/", tls={"cert_file": "{tmp}/cert.pem", "key_file": "{tmp}/key-enc.pem"}),
     [("broker.tls", "passphrase")]),
    ("tls-cert-not-pem", broker(url="amqps://h/", tls={"cert_file": "{tmp}/pw-ok"}), [("broker.tls", "cannot load")]),
    # --- metrics ---
    ("listen-word", metrics(listen="nowhere"), [("metrics.listen", "HOST:PORT")]),
    ("listen-sup", metrics(listen="127.0.0.1:²"), [("metrics.listen", "port must be")]),
    ("listen-no-host", metrics(listen=":9464"), [("metrics.listen", "HOST:PORT")]),
    ("listen-port-0", metrics(listen="127.0.0.1:0"), [("metrics.listen", "port must be")]),
    ("listen-port-big", metrics(listen="127.0.0.1:65536"), [("metrics.listen", "port must be")]),
    ("listen-port-plus", metrics(listen="127.0.0.1:+9"), [("metrics.listen", "port must be")]),
    ("listen-v6-bare", metrics(listen="::1:9464"), [("metrics.listen", "in brackets")]),
    ("listen-v6-open", metrics(listen="[::1:9464"), [("metrics.listen", "[ADDRESS]:PORT")]),
    ("listen-v4-brackets", metrics(listen="[127.0.0.1]:9464"), [("metrics.listen", "brackets are for IPv6")]),
    ("listen-digits", metrics(listen="1.2.3:9464"), [("metrics.listen", "host name")]),
    ("listen-space", metrics(listen="local host:9464"), [("metrics.listen", "host name")]),
    ("listen-int", metrics(listen=9464), [("metrics.listen", "non-empty string")]),
    ("listen-unresolvable", metrics(listen="no-such-host.invalid:9464"), [("metrics.listen", "cannot resolve")]),
    ("metrics-unknown", metrics(port=1), [("metrics.port", "unknown key")]),
    ("mtls-cert-only", metrics(tls={"cert_file": "{tmp}/cert.pem"}), [("metrics.tls", "both cert_file and key_file")]),
    ("mtls-key-only", metrics(tls={"key_file": "{tmp}/key.pem"}), [("metrics.tls", "both cert_file and key_file")]),
    ("mtls-ca-only", metrics(tls={"client_ca_file": "{tmp}/cert.pem"}), [("metrics.tls", "both cert_file and key_file")]),
    ("mtls-missing", metrics(tls={"cert_file": "{tmp}/nope", "key_file": "{tmp}/key.pem"}), [("metrics.tls.cert_file", "No such file")]),
    ("mtls-mismatch", metrics(tls={"cert_file": "{tmp}/cert.pem", "key_file": "{tmp}/other-key.pem"}), [("metrics.tls", "cannot load")]),
    ("mtls-bad-ca", metrics(tls={"cert_file": "{tmp}/cert.pem", "key_file": "{tmp}/key.pem", "client_ca_file": "{tmp}/pw-ok"}),
     [("metrics.tls", "no usable CA certificate")]),
    ("mtls-unknown", metrics(tls={"cert": "x"}), [("metrics.tls.cert", "unknown key")]),
    ("auth-string", metrics(basic_auth="prom:pw"), [("metrics.basic_auth", "must be a mapping")]),
    ("auth-plain", metrics(basic_auth={"prom": "pw"}), [("metrics.basic_auth.prom", "pbkdf2_sha256$")]),
    ("auth-iter-low", metrics(basic_auth={"prom": "pbkdf2_sha256$999$c2FsdA$" + "A" * 43}), [("metrics.basic_auth.prom", "iterations")]),
    ("auth-iter-high", metrics(basic_auth={"prom": "pbkdf2_sha256$99999999$c2FsdA$" + "A" * 43}), [("metrics.basic_auth.prom", "iterations")]),
    ("auth-short-hash", metrics(basic_auth={"prom": "pbkdf2_sha256$1000$c2FsdA$AAAA"}), [("metrics.basic_auth.prom", "32 bytes")]),
    ("auth-padding", metrics(basic_auth={"prom": HASH + "="}), [("metrics.basic_auth.prom", "pbkdf2_sha256$")]),
    ("auth-b64-len", metrics(basic_auth={"prom": "pbkdf2_sha256$1000$a$" + "A" * 43}), [("metrics.basic_auth.prom", "base64")]),
    ("auth-md5", metrics(basic_auth={"prom": "md5$1000$a$b"}), [("metrics.basic_auth.prom", "pbkdf2_sha256$")]),
    ("auth-int", metrics(basic_auth={"prom": 5}), [("metrics.basic_auth.prom", "pbkdf2_sha256$")]),
    ("auth-colon-user", metrics(basic_auth={"a:b": HASH}), [("metrics.basic_auth.a:b", "without :")]),
    ("auth-empty-user", metrics(basic_auth={"": HASH}), [('metrics.basic_auth.""', "user name")]),
    ("auth-int-user", "metrics: {basic_auth: {5: '" + HASH + "'}}\n" + GOOD_Q, [("metrics.basic_auth.5", "user name")]),
    # --- queues ---
    ("queues-missing", cfg(log={"level": "info"}).replace("queues:", "x_queues:"), [("queues", "non-empty list"), ("x_queues", "unknown key")]),
    ("queues-empty", "queues: []\n", [("queues", "non-empty list")]),
    ("queues-string", "queues: tasks\n", [("queues", "non-empty list")]),
    ("queues-null", "queues:\n", [("queues", "non-empty list")]),
    ("queue-null", "queues: [null]\n", [("queues[0]", "must be a mapping")]),
    ("queue-int", "queues: [5]\n", [("queues[0]", "must be a mapping")]),
    ("queue-name-only-string", "queues: [tasks]\n", [("queues[0]", "must be a mapping")]),
    ("queue-second-null", cfg().rstrip() + "\n- null\n", [("queues[1]", "must be a mapping")]),
    ("name-missing", cfg({"handler": HANDLER}), [("queues[0].name", "is required")]),
    ("name-null", cfg(q(name=None)), [("queues[0].name", "is required")]),
    ("name-int", cfg(q(name=5)), [("queues[0].name", "queue name")]),
    ("name-empty", cfg(q(name="")), [("queues[0].name", "queue name")]),
    ("name-amq", cfg(q(name="amq.tasks")), [("queues[0].name", "amq.")]),
    ("name-space", cfg(q(name="my tasks")), [("queues[0].name", "queue name")]),
    ("name-newline", cfg(q(name="tasks\n")), [("queues[0].name", "control characters")]),
    ("name-escape", cfg(q(name="\x1b[31mred")), [("queues[0].name", "control characters")]),
    ("name-bidi", cfg(q(name="a\u202eb")), [("queues[0].name", "control characters")]),
    ("name-300-bytes", cfg(q(name="n" * 300)), [("queues[0].name", "250 bytes")]),
    ("name-251-bytes", cfg(q(name="n" * 251)), [("queues[0].name", "250 bytes")]),
    ("name-utf8-252", cfg(q(name="é" * 126)), [("queues[0].name", "250 bytes")]),
    ("name-duplicate", cfg(q()).rstrip() + "\n" + yaml.safe_dump([q()]), [("queues[1].name", "already used by queues[0]")]),
    ("name-side-dead", yaml.safe_dump({"queues": [q(), q(name="tasks.dead")]}), [("queues[1].name", "side queue of queues[0]")]),
    ("name-side-delay", yaml.safe_dump({"queues": [q(), q(name="tasks.delay.5s")]}), [("queues[1].name", "side queue of queues[0]")]),
    ("type-stream", cfg(q(type="stream")), [("queues[0].type", "quorum, classic")]),
    ("type-int", cfg(q(type=1)), [("queues[0].type", "quorum, classic")]),
    ("workers-0", cfg(q(workers=0)), [("queues[0].workers", ">= 1, got 0")]),
    ("workers-257", cfg(q(workers=257)), [("queues[0].workers", "at most 256")]),
    ("workers-str", cfg(q(workers="four")), [("queues[0].workers", 'whole number >= 1, got "four"')]),
    ("workers-float", cfg(q(workers=4.0)), [("queues[0].workers", "whole number")]),
    ("workers-bool", cfg(q(workers=True)), [("queues[0].workers", "whole number")]),
    ("workers-total", yaml.safe_dump({"queues": [q(workers=200), q(name="b", workers=200)]}), [("queues", "at most 256 workers in all")]),
    ("prefetch-65536", cfg(q(prefetch=65536)), [("queues[0].prefetch", "at most 65535")]),
    ("prefetch-neg", cfg(q(prefetch=-1)), [("queues[0].prefetch", ">= 0")]),
    ("prefetch-float", cfg(q(prefetch=1.5)), [("queues[0].prefetch", "whole number")]),
    ("timeout-0", cfg(q(timeout=0)), [("queues[0].timeout", ">= 0.1")]),
    ("timeout-small", cfg(q(timeout=0.05)), [("queues[0].timeout", ">= 0.1")]),
    ("timeout-neg", cfg(q(timeout=-5)), [("queues[0].timeout", ">= 0.1")]),
    ("timeout-inf", cfg(q(timeout=float("inf"))), [("queues[0].timeout", "finite")]),
    ("timeout-nan", cfg(q(timeout=float("nan"))), [("queues[0].timeout", "finite")]),
    ("timeout-str", cfg(q(timeout="600")), [("queues[0].timeout", "number of seconds")]),
    ("timeout-huge", cfg(q(timeout=1e12)), [("queues[0].timeout", "at most")]),
    ("retry-string", cfg(q(retry="3")), [("queues[0].retry", "must be a mapping")]),
    ("retry-unknown", retry(tries=3), [("queues[0].retry.tries", "unknown key")]),
    ("attempts-0", retry(attempts=0), [("queues[0].retry.attempts", ">= 1")]),
    ("attempts-101", retry(attempts=101), [("queues[0].retry.attempts", "at most 100")]),
    ("attempts-1e9", retry(attempts=10**9), [("queues[0].retry.attempts", "at most 100")]),
    ("attempts-float", retry(attempts=1e9), [("queues[0].retry.attempts", "whole number")]),
    ("attempts-str", retry(attempts="3"), [("queues[0].retry.attempts", "whole number")]),
    ("backoff-inf", retry(backoff=[float("inf")]), [("queues[0].retry.backoff", "finite")]),
    ("backoff-nan", retry(backoff=[5, float("nan")]), [("queues[0].retry.backoff", "[1] must be a finite")]),
    ("backoff-neg", retry(backoff=[-1]), [("queues[0].retry.backoff", ">= 0.001")]),
    ("backoff-tiny", retry(backoff=[0.0005]), [("queues[0].retry.backoff", ">= 0.001")]),
    ("backoff-str", retry(backoff=["x"]), [("queues[0].retry.backoff", "number of seconds")]),
    ("backoff-empty", retry(backoff=[]), [("queues[0].retry.backoff", "list of seconds")]),
    ("backoff-map", retry(backoff={"a": 1}), [("queues[0].retry.backoff.a", "unknown key"), ("queues[0].retry.backoff.initial", "is required")]),
    ("backoff-exp-no-initial", retry(backoff={"max": 60}), [("queues[0].retry.backoff.initial", "is required")]),
    ("backoff-exp-max-below", retry(backoff={"initial": 10, "max": 5}), [("queues[0].retry.backoff.max", "at least initial")]),
    ("backoff-exp-jitter-2", retry(backoff={"initial": 1, "jitter": 2}), [("queues[0].retry.backoff.jitter", "from 0 to 1")]),
    ("backoff-exp-jitter-nan", retry(backoff={"initial": 1, "jitter": float("nan")}), [("queues[0].retry.backoff.jitter", "from 0 to 1")]),
    ("backoff-exp-initial-0", retry(backoff={"initial": 0}), [("queues[0].retry.backoff.initial", ">= 0.001")]),
    ("backoff-century", retry(backoff=[5, 3162240001]), [("queues[0].retry.backoff", "[1] must be at most 3162240000 seconds")]),
    ("backoff-exp-max-century", retry(backoff={"initial": 1, "max": 4e9}), [("queues[0].retry.backoff.max", "at most 3162240000 seconds")]),
    ("backoff-single-inf", retry(backoff=float("inf")), [("queues[0].retry.backoff", "finite")]),
    ("backoff-101", retry(backoff=[1] * 101), [("queues[0].retry.backoff", "at most 100 values")]),
    ("redeliveries-0", cfg(q(max_redeliveries=0)), [("queues[0].max_redeliveries", ">= 1")]),
    ("redeliveries-big", cfg(q(max_redeliveries=1001)), [("queues[0].max_redeliveries", "at most 1000")]),
    ("tasks-neg", cfg(q(max_tasks_per_worker=-1)), [("queues[0].max_tasks_per_worker", ">= 0")]),
    ("tasks-big", cfg(q(max_tasks_per_worker=10**10)), [("queues[0].max_tasks_per_worker", "at most")]),
    ("memory-word", cfg(q(max_memory_per_worker="lots")), [("queues[0].max_memory_per_worker", "size such as")]),
    ("memory-big", cfg(q(max_memory_per_worker="2048GiB")), [("queues[0].max_memory_per_worker", "at most 1024GiB")]),
    ("memory-neg", cfg(q(max_memory_per_worker=-1)), [("queues[0].max_memory_per_worker", "size such as")]),
    ("memory-digits", cfg(q(max_memory_per_worker="9" * 30 + "GiB")), [("queues[0].max_memory_per_worker", "size such as")]),
    ("memory-arabic-digit", cfg(q(max_memory_per_worker="٣MiB")), [("queues[0].max_memory_per_worker", "size such as")]),
    ("body-0", cfg(q(max_body=0)), [("queues[0].max_body", "at least 1")]),
    ("body-1GiB", cfg(q(max_body="1GiB")), [("queues[0].max_body", "at most 512MiB")]),
    ("body-513MiB", cfg(q(max_body="513MiB")), [("queues[0].max_body", "at most 512MiB")]),
    ("body-float", cfg(q(max_body=1.5)), [("queues[0].max_body", "size such as")]),
    ("queue-unknown", cfg(q(wrokers=2)), [("queues[0].wrokers", "unknown key")]),
    ("handler-missing", cfg({"name": "tasks"}), [("queues[0].handler", "is required")]),
    ("handler-null", cfg(q(handler=None)), [("queues[0].handler", "is required")]),
    ("handler-string", cfg(q(handler="m:f")), [("queues[0].handler", "must be a mapping")]),
    ("handler-both", cfg(q(handler={"python": "m:f", "command": ["/bin/true"]})), [("queues[0].handler", "exactly one")]),
    ("handler-neither", cfg(q(handler={})), [("queues[0].handler", "exactly one")]),
    ("handler-unknown", cfg(q(handler={"python": "m:f", "shell": "x"})), [("queues[0].handler.shell", "unknown key")]),
    ("python-no-colon", cfg(q(handler={"python": "module"})), [("queues[0].handler.python", "package.module:function")]),
    ("python-dash", cfg(q(handler={"python": "my-mod:f"})), [("queues[0].handler.python", "package.module:function")]),
    ("python-empty-func", cfg(q(handler={"python": "m:"})), [("queues[0].handler.python", "package.module:function")]),
    ("python-double-dot", cfg(q(handler={"python": "a..b:f"})), [("queues[0].handler.python", "package.module:function")]),
    ("python-int", cfg(q(handler={"python": 5})), [("queues[0].handler.python", "package.module:function")]),
    ("command-string", cfg(q(handler={"command": "convert x"})), [("queues[0].handler.command", "list of strings")]),
    ("command-empty", cfg(q(handler={"command": []})), [("queues[0].handler.command", "list of strings")]),
    ("command-relative", cfg(q(handler={"command": ["convert"]})), [("queues[0].handler.command", "absolute path")]),
    ("command-int-arg", cfg(q(handler={"command": ["/bin/true", 5]})), [("queues[0].handler.command", "list of strings")]),
    ("command-nul", cfg(q(handler={"command": ["/bin/true", "a\0b"]})), [("queues[0].handler.command", "NUL")]),
    ("command-empty-arg", cfg(q(handler={"command": ["/bin/true", ""]})), [("queues[0].handler.command", "list of strings")]),
    # --- several problems at once: one line each ---
    ("many", yaml.safe_dump({"bogus": 1, "broker": {"url": "http://x", "heartbeat": -1},
                             "queues": [q(prefetch=70000, timeout=float("inf"))]}),
     [("bogus", "unknown key"), ("broker.url", "amqp://"), ("broker.heartbeat", ">= 0"),
      ("queues[0].prefetch", "65535"), ("queues[0].timeout", "finite")]),
]

GOOD: list[tuple[str, str]] = [
    ("minimal", GOOD_Q),
    ("defaults-null", "broker:\nmetrics:\nlog:\nqueues:\n  - name: tasks\n    handler: {python: 'm:f'}\n"
                      "    prefetch: ~\n    retry: ~\n"),
    ("urls-options", broker(urls=["amqp://h1:5672/%2F?heartbeat=10&frame_max=131072&channel_max=10",
                                  "amqps://h2:5671/prod?socket_timeout=2.5&locale=en_US&tcp_options={'TCP_KEEPIDLE':60}"])),
    ("ipv6", url("amqp://[::1]:5672/%2F")),
    ("vhost", url("amqp://h/my-vhost")),
    ("password-file", broker(url="amqp://app@h/", password_file="{tmp}/pw-ok")),
    ("tls", broker(url="amqps://h/", tls={"ca_file": "{tmp}/cert.pem", "cert_file": "{tmp}/cert.pem",
                                           "key_file": "{tmp}/key.pem"})),
    ("metrics-auth", metrics(listen="[::1]:9464", tls={"cert_file": "{tmp}/cert.pem", "key_file": "{tmp}/key.pem",
                                                      "client_ca_file": "{tmp}/cert.pem"}, basic_auth={"prom": HASH})),
    ("listen-localhost", metrics(listen="localhost:9464")),
    ("edges", cfg(q(prefetch=65535, workers=256, timeout=0.1, max_body="512MiB", max_redeliveries=1000,
                    retry={"attempts": 100, "backoff": [0, 0.001, 3162240000]}),
                  broker={"heartbeat": 65535}, shutdown_timeout=0)),
    ("unicode-name", cfg(q(name="café-Aufgaben"))),
    ("name-240-bytes", cfg(q(name="n" * 240))),
    ("backoff-number", retry(backoff=7)),
    # Retries wait in the shared delay levels: no queue per value, so no limit on how
    # many distinct values, how close they are, or a TTL's 2^32-1 ms.
    ("backoff-past-a-ttl", retry(attempts=4, backoff=[5000000, 9000000, 4294967.296])),
    ("backoff-close-values", retry(attempts=3, backoff=[1234.5671, 1234.5689])),
    ("backoff-exp-many-delays", retry(attempts=100, backoff={"initial": 0.001, "max": 4000000})),
    ("name-240-bytes-long-backoff", cfg(q(name="n" * 240, retry={"backoff": [4294967.295]}))),
    ("backoff-exponential", retry(attempts=8, backoff={"initial": 1, "max": 300, "jitter": 0.25})),
    ("backoff-exponential-plain", retry(attempts=100, backoff={"initial": 60, "max": 3600, "jitter": 0})),
    ("anchors-and-merge", "base: &base {handler: {python: 'm:f'}, workers: 2}\n".replace("base:", "x-base:")
     if False else "queues:\n  - &q {name: a, handler: &h {python: 'm:f'}, workers: 2}\n"
                   "  - {<<: *q, name: b}\n  - {name: c, handler: *h}\n"),
    ("command", cfg(q(handler={"command": ["/bin/cat", "--", "multi\nline"]}))),
]


def _aux_files(tmp: Path) -> None:
    os.mkfifo(tmp / "fifo")
    (tmp / "pw-ok").write_text(f"{PASSWORD}\n")
    os.chmod(tmp / "pw-ok", 0o640)
    (tmp / "pw-empty").write_text("\n  \n")
    (tmp / "pw-latin1").write_bytes(b"caf\xe9\n")
    (tmp / "pw-two-lines").write_text(f"{PASSWORD}\nother\n")
    (tmp / "pw-big").write_text("x" * (65 << 10))
    openssl = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "2", "-nodes", "-subj", "/CN=workqd-test"]
    subprocess.run([*openssl, "-keyout", tmp / "key.pem", "-out", tmp / "cert.pem"], check=True, capture_output=True)
    subprocess.run([*openssl, "-keyout", tmp / "other-key.pem", "-out", tmp / "other.pem"], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", tmp / "key.pem", "-aes256", "-passout", "pass:xx",
                    "-out", tmp / "key-enc.pem"], check=True, capture_output=True)


def _write_case(tmp: Path, name: str, content: object) -> Path:
    if isinstance(content, str) and content.startswith("special:"):
        kind = content.split(":", 1)[1]
        path = tmp / f"{name}.yaml"
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
        elif kind == "50MB":
            with open(path, "wb") as f:
                f.truncate(50_000_000)
        elif kind == "1MiB+1":
            path.write_text(GOOD_Q + "#" * (1 << 20))
        elif kind == "loop":
            os.symlink(path, path)
        elif kind == "missing":
            pass
        else:
            return Path(kind)
        return path
    path = tmp / f"{name}.yaml"
    data = content if isinstance(content, bytes) else content.replace("{tmp}", str(tmp)).encode()
    path.write_bytes(data)
    os.chmod(path, 0o640)
    return path


def _run(path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """The real CLI on ``path``, and the CPU seconds it used: its wall time on this shared
    machine says more about the other tenants than about workqd. A hang is killed at 60 s."""
    p = subprocess.Popen([sys.executable, "-m", "workqd.cli", "--check", "-c", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(60, p.kill)
    killer.start()
    try:
        out, err = p.stdout.read(), p.stderr.read()  # both are a few lines: no pipe fills up
        _, status, usage = os.wait4(p.pid, 0)
    finally:
        killer.cancel()
        p.stdout.close()
        p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), usage.ru_utime + usage.ru_stime


def _check_in_process(path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """What cli.main does for --check, as a CompletedProcess-alike."""
    start = time.monotonic()
    try:
        cfg = config.load(str(path))
        problems, _ = config.check_listen(cfg)
        code, out, err = (2, "", problems) if problems else (0, "OK", [])
    except config.ConfigError as e:
        code, out, err = 2, "", e.problems
    took = time.monotonic() - start
    return subprocess.CompletedProcess([], code, out, "".join(f"{line}\n" for line in err)), took


# The real command line for the special files, every eighth other case and a few good ones.
CLI_CASES = {name for i, (name, content, _) in enumerate(CASES)
             if i % 8 == 0 or isinstance(content, bytes) or str(content).startswith("special:")}
CLI_CASES |= {"alias-bomb", "deep-600-flow-list", "dup-timeout", "url-v6-open", "listen-sup",
              "listen-unresolvable", "queue-null", "name-newline", "many",
              "good-minimal", "good-metrics-auth", "good-urls-options", "good-anchors-and-merge"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """{case id: (path, completed process, seconds)} for every bad and good file, run in parallel."""
    tmp = tmp_path_factory.mktemp("corpus")
    _aux_files(tmp)
    paths = {name: _write_case(tmp, name, content) for name, content, _ in CASES}
    paths.update({f"good-{name}": _write_case(tmp, f"good-{name}", content) for name, content in GOOD})
    cli = [name for name in paths if name in CLI_CASES]
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2)) as pool:
        results = dict(zip(cli, pool.map(_run, [paths[name] for name in cli])))
    t1 = time.monotonic()
    in_process = {name: _check_in_process(paths[name]) for name in paths}
    print(f"corpus: {len(CASES)} bad and {len(GOOD)} good files; {len(cli)} through the CLI in "
          f"{t1 - t0:.1f}s (most CPU {max(took for _, took in results.values()):.2f}s), all "
          f"in-process in {time.monotonic() - t1:.1f}s (slowest "
          f"{max(took for _, took in in_process.values()):.2f}s)")
    return {name: (paths[name], results.get(name), *in_process[name]) for name in paths}


def test_corpus_is_large_enough():
    assert len(CASES) >= 150
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name, content, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_file_is_refused_with_one_line_per_problem(corpus, name, content, expected):
    path, cli, *in_process = corpus[name]
    for r, took in [in_process] + ([cli] if cli else []):
        _assert_refused(path, r, took, name, expected)


def _assert_refused(path, r, took, name, expected):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and PASSWORD not in r.stderr + r.stdout
    assert took < 5, f"{name} took {took:.1f}s"
    lines = r.stderr.splitlines()
    assert len(lines) == len(expected), r.stderr
    for key, fragment in expected:
        prefix = f"{path}: {key}: " if key else f"{path}: "
        assert any(line.startswith(prefix) and fragment in line for line in lines), (prefix, fragment, lines)
    assert all(line.isprintable() for line in lines)


@pytest.mark.parametrize("name", [name for name, _ in GOOD])
def test_good_file_passes(corpus, name):
    _, cli, *in_process = corpus[f"good-{name}"]
    for r, took in [in_process] + ([cli] if cli else []):
        assert r.returncode == 0 and "OK" in r.stdout, r
        assert "Traceback" not in r.stderr and PASSWORD not in r.stderr + r.stdout


def test_good_files_parse_to_what_they_say(corpus):
    cfg = config.load(str(corpus["good-edges"][0]))
    q = cfg.queues[0]
    assert (q.prefetch, q.workers, q.timeout, q.max_body, q.retry.attempts) == (65535, 256, 0.1, 512 << 20, 100)
    assert q.retry.backoff == (0.0, 0.001, 3162240000.0) and cfg.broker.heartbeat == 65535
    cfg = config.load(str(corpus["good-metrics-auth"][0]))
    assert cfg.metrics_listen == ("::1", 9464)
    assert cfg.metrics_tls.cert_file.endswith("cert.pem") and cfg.metrics_tls.client_ca_file
    assert cfg.metrics_basic_auth == (("prom", HASH),)
    assert webauth.verify_password(cfg.metrics_basic_auth[0][1], "pw")
    cfg = config.load(str(corpus["good-anchors-and-merge"][0]))
    assert [(q.name, q.workers, q.handler.python) for q in cfg.queues] == [
        ("a", 2, "m:f"), ("b", 2, "m:f"), ("c", 4, "m:f")]
    assert config.load(str(corpus["good-password-file"][0])).broker.password == PASSWORD
    assert config.load(str(corpus["good-defaults-null"][0])).queues[0].prefetch == 1
