"""``workqd``: the daemon's command line, and ``workqd hash-password``."""

from __future__ import annotations

import argparse
import errno
import getpass
import logging
import os
import socket
import sys

from . import __version__, exitcodes, logsetup, webauth
from . import config as config_mod

log = logging.getLogger("workqd.master")
MAX_PASSWORD_BYTES = 4096


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="workqd", description="Run a supervised pool of RabbitMQ work-queue consumers "
        "(foreground; systemd supervises it).",
        epilog="workqd hash-password: print a hash line for metrics.basic_auth")
    p.add_argument("-c", "--config", default=config_mod.DEFAULT_PATH,
                   help=f"configuration file (default {config_mod.DEFAULT_PATH})")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration and exit 0 (valid) or 2 (invalid)")
    p.add_argument("--version", action="version", version=f"workqd {__version__}")
    return p.parse_args(argv)


def _fail(lines: list[str]) -> int:
    for line in lines:
        print(line, file=sys.stderr)
    return exitcodes.CONFIG


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash-password"]:
        return hash_password(argv[1:])
    args = parse_args(argv)  # argparse exits 2 on usage errors
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        return _fail(e.problems)
    except Exception as e:  # a bug in the checks must still end as one line and exit 2
        return _fail([config_mod.escape(f"{args.config}: cannot check the configuration "
                                        f"(a workqd bug, please report it): {type(e).__name__}: {e}")])
    problems, listen_warnings = config_mod.check_listen(cfg)
    if problems:
        return _fail(problems)
    if args.check:
        for warning in (*cfg.warnings, *listen_warnings):
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{args.config}: OK ({len(cfg.queues)} queue(s), "
              f"{sum(q.workers for q in cfg.queues)} workers"
              + (f", {len(cfg.schedules)} schedule(s))" if cfg.schedules else ")"))
        return exitcodes.OK
    logsetup.configure(cfg.log_level, f"master (pid {os.getpid()})", cfg.log_format)
    from .master import Master  # imports pika and prometheus_client: not needed for --check
    try:
        # Master.run handles whatever goes wrong once its loop runs (its last net
        # stops the workers in order); what arrives here failed before the loop.
        return Master(cfg).run()
    except OSError as e:
        host, port = cfg.metrics_listen
        if e.errno == errno.EADDRINUSE:
            log.error("metrics.listen %s:%d: address already in use (another workqd?)", host, port)
        elif e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
            # Not this host's address: the file is wrong, restarting cannot help.
            return _fail([config_mod.escape(f"{cfg.path}: metrics.listen: cannot listen on "
                                            f"{host}:{port}: {e.strerror or e}")])
        else:
            log.error("cannot start: %s", e)
        return exitcodes.POOL_FAILED
    except KeyboardInterrupt:  # only before the signal queue is installed
        return exitcodes.OK
    except Exception:
        log.exception("cannot start (a workqd bug, please report it)")
        return exitcodes.INTERNAL_ERROR


def _read_password() -> str:
    """From the terminal (asked twice), else the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise ValueError("the passwords differ")
        return first
    raw = sys.stdin.buffer.read(MAX_PASSWORD_BYTES + 1)  # bounded: < /dev/zero must end
    line, newline, _ = raw.partition(b"\n")
    if not newline and len(raw) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    try:
        return line.removesuffix(b"\r").decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the password is not UTF-8 text") from None


def hash_password(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="workqd hash-password",
        description="Read a password (from the terminal, asked twice, or the first line of "
        "standard input) and print its hash line for metrics.basic_auth.")
    p.parse_args(argv)
    try:
        password = _read_password()
        if not password:
            raise ValueError("the password is empty")
    except ValueError as e:
        print(f"workqd hash-password: {e}", file=sys.stderr)
        return exitcodes.CONFIG
    except (EOFError, KeyboardInterrupt):
        print("workqd hash-password: no password given", file=sys.stderr)
        return exitcodes.CONFIG
    print(webauth.hash_password(password))
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
