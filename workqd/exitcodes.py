"""Exit statuses: part of the interface, so each is named and explained once."""

# workqd (the master)
OK = 0             # clean stop on TERM/INT
POOL_FAILED = 1    # a pool could not stay up (boot error, crash loop, refused credentials)
CONFIG = 2         # bad command line or configuration; nothing was started

# workers, read by the master to decide between "respawn" and "give up"
WORKER_OK = 0              # graceful stop
WORKER_BOOT_ERROR = 3      # handler could not be loaded: respawning cannot help
WORKER_BROKER_REFUSED = 4  # credentials or vhost refused by the broker: respawning cannot help
WORKER_QUEUE_MISMATCH = 5  # queue exists with other arguments: respawning cannot help
WORKER_RECYCLE = 6         # planned exit after max_tasks_per_worker / max_memory_per_worker
WORKER_TIMEOUT = 7         # a Python handler overran its timeout; the thread cannot be killed
WORKER_CRASH = 70          # unexpected exception in the worker itself

# Worker exits after which respawning is pointless.
FATAL_WORKER_EXITS = {
    WORKER_BOOT_ERROR: "handler could not be loaded",
    WORKER_BROKER_REFUSED: "broker refused the credentials or vhost",
    WORKER_QUEUE_MISMATCH: "queue exists on the broker with other arguments",
}

# workq-submit
SUBMIT_OK = 0            # every task confirmed by the broker
SUBMIT_NOT_CONFIRMED = 1  # some task nacked or unroutable (each named on stderr); with --wait: a task failed
SUBMIT_USAGE = 2         # bad arguments or config
SUBMIT_UNREACHABLE = 3   # broker unreachable or refused the connection
SUBMIT_WAIT_TIMEOUT = 4  # --wait gave up before every outcome arrived
