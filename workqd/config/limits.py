"""Fixed numbers of the configuration: default paths, ranges and size limits.

Ranges of single keys are declared in ``schema``; these are the limits shared by
several keys, or checked across keys, or guarding the file itself.
"""

from ..delays import MAX_DELAY

DEFAULT_PATH = "/etc/workqd/workqd.yaml"
DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
# RabbitMQ's default consumer_timeout (3.10): a delivery unacked for longer is
# closed by the broker, so a task timeout at or above it cannot work.
BROKER_CONSUMER_TIMEOUT = 1800
MAX_TOTAL_WORKERS = 256

# Files: read only regular files, and only this much of them.
MAX_CONFIG_BYTES = 1 << 20
MAX_SECRET_BYTES = 64 << 10
# YAML: a workqd config has a few hundred values; these stop alias bombs and
# deep nesting long before they cost memory, CPU or Python's recursion limit.
MAX_DEPTH = 64
MAX_NODES = 20_000        # values written in the file
MAX_VALUES = 50_000       # values after expanding aliases
MAX_NUMBER_CHARS = 64     # int("9" * 5000) raises; "1:2:3:..." is quadratic
# Numbers the broker, pika or Python's clocks would refuse.
U16 = 65535               # AMQP "short": prefetch_count, heartbeat, port
MAX_SECONDS = 365 * 86400  # task timeout, shutdown_timeout (threading waits overflow far above)
# A retry waits in the shared delay levels, which count up to a century (several
# passes when longer than one pass holds): any backoff up to that works.
MAX_BACKOFF = float(MAX_DELAY)
MAX_ATTEMPTS = 100
MAX_DEFERRALS = 1000
DEFAULT_JITTER = 0.5       # backoff: {initial, max}: up to half of each delay is random
JITTER_STEPS = 4           # jitter takes this many values per step
MAX_REDELIVERIES = 1000
MAX_TASKS_PER_WORKER = 10**9
MAX_MEMORY = 1 << 40
MAX_BODY = 512 << 20      # RabbitMQ's hard limit for max_message_size
MAX_NAME_BYTES = 255      # queue names and vhosts are AMQP short strings
# sun_path is 108 bytes on Linux, with its terminating NUL.
MAX_SOCKET_PATH = 107

# Handlers get the daemon's environment minus these (runner.handler_environment):
# systemd's notify socket, watchdog and socket-activation variables belong to the
# master, and WORKQ_PASSWORD is workq-submit's broker password.
HIDDEN_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                    "LISTEN_PID", "LISTEN_FDNAMES", "WORKQ_PASSWORD")
# Queue arguments workqd sets itself (broker.queue_arguments): a second source for them
# would make the dead-lettering, retries and poison limit silently different.
OWNED_ARGUMENTS = ("x-queue-type", "x-dead-letter-exchange", "x-dead-letter-routing-key",
                   "x-dead-letter-strategy", "x-delivery-limit", "x-message-ttl")
