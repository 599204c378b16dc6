"""Exit statuses: part of the interface, so each is named and explained once."""

# workqd (the master)
OK = 0             # clean stop on TERM/INT
POOL_FAILED = 1    # a pool could not stay up (boot error, crash loop, refused credentials)
CONFIG = 2         # bad command line or configuration; nothing was started
INTERNAL_ERROR = 1  # a bug in the master's loop: logged with its traceback, workers stopped in order

# workers, read by the master to decide between "respawn" and "give up"
WORKER_OK = 0              # graceful stop
WORKER_BOOT_ERROR = 3      # handler could not be loaded: respawning cannot help
WORKER_BROKER_REFUSED = 4  # login, vhost or permissions refused by the broker: respawning cannot help
WORKER_QUEUE_MISMATCH = 5  # queue exists with other arguments: respawning cannot help
WORKER_RECYCLE = 6         # planned exit after max_tasks_per_worker / max_memory_per_worker
WORKER_TIMEOUT = 7         # a Python handler overran its timeout; the thread cannot be killed
WORKER_BAD_SETTINGS = 8    # the broker URL or TLS files cannot be used: respawning cannot help
WORKER_CONSUMER_TIMEOUT = 9  # the broker's consumer_timeout took the running task back
WORKER_QUEUE_MISSING = 10  # a queue (declare: false) or an exchange (bindings) is not there
WORKER_CANCELLED = 11      # planned exit: a cancelled Python task cannot be stopped in its thread
WORKER_CRASH = 70          # unexpected exception in the worker itself

# Worker exits after which respawning is pointless.
FATAL_WORKER_EXITS = {
    WORKER_BOOT_ERROR: "handler could not be loaded",
    WORKER_BROKER_REFUSED: "broker refused the login, vhost or permissions",
    WORKER_QUEUE_MISMATCH: "queue exists on the broker with other arguments",
    WORKER_BAD_SETTINGS: "the broker URL or TLS settings cannot be used",
    WORKER_QUEUE_MISSING: "a queue or exchange the config uses does not exist on the broker",
}

# workq-submit
SUBMIT_OK = 0            # every task confirmed by the broker
SUBMIT_NOT_CONFIRMED = 1  # some task nacked or unroutable (each named on stderr); with --wait: a task failed
SUBMIT_USAGE = 2         # bad arguments or config
SUBMIT_UNREACHABLE = 3   # broker unreachable or refused the connection
SUBMIT_WAIT_TIMEOUT = 4  # --wait gave up before every outcome arrived

# workqctl
CTL_OK = 0            # done
CTL_REFUSED = 1       # the daemon answered with an error (unknown queue, bad value, stopping)
CTL_USAGE = 2         # bad arguments or config
CTL_UNREACHABLE = 3   # no daemon on the socket (missing, refused, no answer in time), or the broker
CTL_DENIED = 4        # the socket (or its directory) is not open to this user
