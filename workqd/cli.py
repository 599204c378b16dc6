"""``workqd``: the daemon's command line."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from . import __version__, exitcodes, logsetup
from . import config as config_mod

log = logging.getLogger("workqd.master")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="workqd", description="Run a supervised pool of RabbitMQ work-queue consumers "
        "(foreground; systemd supervises it).")
    p.add_argument("-c", "--config", default=config_mod.DEFAULT_PATH,
                   help=f"configuration file (default {config_mod.DEFAULT_PATH})")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration and exit 0 (valid) or 2 (invalid)")
    p.add_argument("--version", action="version", version=f"workqd {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # argparse exits 2 on usage errors
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return exitcodes.CONFIG
    if args.check:
        for warning in cfg.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{args.config}: OK ({len(cfg.queues)} queue(s), "
              f"{sum(q.workers for q in cfg.queues)} workers)")
        return exitcodes.OK
    logsetup.configure(cfg.log_level, f"master (pid {__import__('os').getpid()})")
    from .master import Master  # imports pika and prometheus_client: not needed for --check
    master = Master(cfg)
    try:
        return master.run()
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            log.error("metrics.listen %s:%d: address already in use (another workqd?)",
                      *cfg.metrics_listen)
        else:
            log.error("cannot start: %s", e)
        return exitcodes.POOL_FAILED
    except KeyboardInterrupt:  # only before the signal queue is installed
        return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
