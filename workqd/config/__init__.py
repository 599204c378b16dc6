"""The configuration file, turned into frozen, validated objects.

Every value goes through a small converter that raises ``Invalid`` with what it
expected; ``load`` collects those with their key paths so the operator sees one
line per problem (``workqd.yaml: queues[0].workers: must be ...``) instead of a
traceback. Whatever the file holds (a FIFO, an alias bomb, 600 levels of
nesting, a key written twice, ``.inf``), ``load`` raises nothing but
``ConfigError``.

The package, one owner per module:
  limits    fixed numbers: default paths, shared ranges, size limits
  errors    Invalid, ConfigError, and values shown escaped with passwords hidden
  model     the frozen dataclasses every other module imports
  convert   value converters (numbers, seconds, sizes, names, addresses)
  urls      broker URLs as pika will take them
  files     regular files only: the password file, TLS files, virtualenvs
  yamlsafe  PyYAML's safe loader under node, depth and alias limits
  schema    every key declared once: type, default, limits, reload, one line of docs
  reader    walks mappings, reads the schema's simple keys, collects problems
  sections, handler, queues, schedules   the readers of what needs code
  load      load, parse, check_listen (imported on first use: they bring in PyYAML)
  docgen    writes the key reference of workqd.yaml(5) and etc/workqd/workqd.yaml
"""

from .convert import (choice, fraction, host_name, listen_address, path_text, python_ref,
                      queue_name, seconds, size, sizes, text, whole)
from .errors import ConfigError, Invalid, escape, redact
from .files import read_password, virtualenv_site_packages
from .limits import (BROKER_CONSUMER_TIMEOUT, DEFAULT_JITTER, DEFAULT_PATH, DEFAULT_URL,
                     HIDDEN_VARIABLES, JITTER_STEPS, MAX_ATTEMPTS, MAX_BACKOFF, MAX_BODY,
                     MAX_CONFIG_BYTES, MAX_DEFERRALS, MAX_DEPTH, MAX_MEMORY,
                     MAX_NAME_BYTES, MAX_NODES, MAX_NUMBER_CHARS, MAX_REDELIVERIES, MAX_SECONDS,
                     MAX_SECRET_BYTES, MAX_SOCKET_PATH, MAX_TASKS_PER_WORKER, MAX_TOTAL_WORKERS,
                     MAX_VALUES, OWNED_ARGUMENTS, U16)
from .model import (TLS, Autoscale, Binding, Broker, Config, Handler, Limits, MetricsTLS, Queue,
                    Retry, jitter_step)
from .urls import URL_OPTIONS, URL_OPTIONS_OVERRIDDEN, amqp_url, url_warnings

__all__ = [
    "TLS", "Autoscale", "BROKER_CONSUMER_TIMEOUT", "Binding", "Broker", "Config", "ConfigError",
    "DEFAULT_JITTER", "DEFAULT_PATH", "DEFAULT_URL", "HIDDEN_VARIABLES", "Handler", "Invalid",
    "JITTER_STEPS", "Limits", "MAX_ATTEMPTS", "MAX_BACKOFF", "MAX_BODY", "MAX_CONFIG_BYTES",
    "MAX_DEFERRALS", "MAX_DEPTH", "MAX_MEMORY", "MAX_NAME_BYTES",
    "MAX_NODES", "MAX_NUMBER_CHARS", "MAX_REDELIVERIES", "MAX_SECONDS", "MAX_SECRET_BYTES",
    "MAX_SOCKET_PATH", "MAX_TASKS_PER_WORKER", "MAX_TOTAL_WORKERS", "MAX_VALUES", "MetricsTLS",
    "OWNED_ARGUMENTS", "Queue", "Retry", "U16", "URL_OPTIONS", "URL_OPTIONS_OVERRIDDEN",
    "amqp_url", "check_listen", "choice", "escape", "fraction", "host_name", "jitter_step",
    "listen_address", "load", "parse", "path_text", "python_ref", "queue_name", "read_password",
    "redact", "seconds", "size", "sizes", "text", "url_warnings", "virtualenv_site_packages",
    "whole",
]

# Reading a file (load, parse, check_listen) brings in PyYAML and every section's reader;
# a command that only publishes to a URL (workq-submit --url) never needs them, and its
# start-up is part of what it costs per run. They are imported on first use.
_READING = ("check_listen", "load", "parse")


def __getattr__(name: str):
    if name not in _READING:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module
    reading = import_module(".load", __name__)
    # Importing the submodule set this package's ``load`` to the module: the function wins.
    for each in _READING:
        globals()[each] = getattr(reading, each)
    return globals()[name]
