"""``workqctl``: see and steer a running workqd through its control socket (control.py)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from . import config as config_mod
from . import cancels, control, exitcodes

TIMEOUT = 10.0   # seconds for the whole exchange; the master answers within a loop turn


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"workqctl: {message}", file=sys.stderr)
        sys.exit(exitcodes.CTL_USAGE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="workqctl", description="See and steer a running workqd.")
    p.add_argument("-c", "--config", default=config_mod.DEFAULT_PATH,
                   help=f"the daemon's configuration, to find its socket and broker "
                        f"(default {config_mod.DEFAULT_PATH})")
    p.add_argument("--socket", metavar="PATH", help="the control socket (default: from the config)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("status", help="queues and workers")
    s.add_argument("queue", nargs="?")
    s.add_argument("--json", action="store_true", help="the daemon's answer as JSON")
    s = sub.add_parser("schedules", help="periodic tasks: next and last firing, who leads")
    s.add_argument("--json", action="store_true", help="the daemon's answer as JSON")
    s = sub.add_parser("pause", help="cancel a queue's consumers; running tasks finish")
    s.add_argument("queue")
    s = sub.add_parser("resume", help="consume again (one queue, or every queue after quiet)")
    s.add_argument("queue", nargs="?")
    sub.add_parser("quiet", help="pause every queue (before a deploy)")
    s = sub.add_parser("scale", help="resize a pool until the next reload")
    s.add_argument("queue")
    s.add_argument("workers", type=int)
    from .deadctl import add_parser as add_dead
    add_dead(sub)
    from .cancelctl import add_parser as add_cancel
    add_cancel(sub)
    return p.parse_args(argv)


def load_config(path: str, needed: bool) -> config_mod.Config | None:
    """The config, or None when only the socket's default path was wanted from it."""
    try:
        return config_mod.load(path)
    except config_mod.ConfigError:
        if needed:
            raise
        return None


def socket_path(args: argparse.Namespace, cfg: config_mod.Config | None) -> str:
    if args.socket:
        return args.socket
    paths = control.client_paths(cfg.control_socket if cfg else None, args.config)
    return next((p for p in paths if os.path.exists(p)), paths[0])


class Unreachable(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code


def request(path: str, req: dict, timeout: float = TIMEOUT) -> dict:
    """One request, one answer; Unreachable with the exit code for what went wrong."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except PermissionError:
            raise Unreachable(exitcodes.CTL_DENIED, f"{path}: permission denied (root and "
                              f"members of group {control.SOCKET_GROUP} may control workqd)")
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise Unreachable(exitcodes.CTL_UNREACHABLE, f"{path}: no workqd listening "
                              f"({e.strerror}); is it running? (--socket or -c to pick another)")
        except OSError as e:
            raise Unreachable(exitcodes.CTL_UNREACHABLE, f"{path}: {e.strerror or e}")
        buf = bytearray()
        try:
            sock.sendall(json.dumps({"v": control.VERSION, **req}).encode() + b"\n")
            while b"\n" not in buf:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(65536)
                if not data:
                    raise Unreachable(exitcodes.CTL_UNREACHABLE,
                                      f"{path}: the daemon closed the connection unanswered")
                buf += data
        except socket.timeout:
            raise Unreachable(exitcodes.CTL_UNREACHABLE, f"{path}: no answer within {timeout:g}s")
        except OSError as e:
            raise Unreachable(exitcodes.CTL_UNREACHABLE, f"{path}: {e.strerror or e}")
    finally:
        sock.close()
    try:
        answer = json.loads(buf[:buf.index(b"\n")])
    except ValueError:
        raise Unreachable(exitcodes.CTL_UNREACHABLE, f"{path}: the answer is not JSON")
    if not isinstance(answer, dict):
        raise Unreachable(exitcodes.CTL_UNREACHABLE, f"{path}: the answer is not an object")
    return answer


# --- showing status ---------------------------------------------------------

def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.1f} MiB"


def _dash(v) -> str:
    return "-" if v is None else str(v)


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{sec:02d}s"


def render_status(st: dict) -> str:
    lines = [f"workqd {st['version']} (pid {st['pid']}): {st['phase']}"
             f"{'' if st['ready'] else '; not ready: ' + st['readiness']}"
             f"{'' if st['broker_connected'] else ', broker not reachable from the master'}"]
    rows = [("QUEUE", "STATE", "WORKERS", "CONSUMING", "IN FLIGHT", "READY", "CONSUMERS",
             "DEAD")]
    for q in st["queues"]:
        if q["min"] != q["max"]:
            size = f"{q['size']} ({q['min']}-{q['max']})"
        else:
            size = f"{q['size']}" + (f" (config {q['configured']})"
                                     if q["size"] != q["configured"] else "")
        state = q["state"] + ("" if q["pool_state"] == "running" else f" ({q['pool_state']})")
        rows.append((q["name"], state, size, str(q["consuming"]), str(q["in_flight"]),
                     _dash(q["ready"]), _dash(q["consumers"]), _dash(q["dead_letters"])))
    lines += _table(rows)
    if st.get("delayed") is not None:
        lines.append(f"delayed tasks (every queue of the vhost, in the delay levels): "
                     f"{st['delayed']}")
    if st.get("cancels") is not None:
        lines.append(f"cancels held: {st['cancels']} (workqctl cancel; the log keeps them "
                     f"{cancels.RETENTION / 86400:g} days)")
    for q in st["queues"]:
        lines.append("")
        lines.append(f"{q['name']}:")
        lines += _limit_lines(q.get("limits"))
        wrows = [("  WORKER", "PID", "STATE", "MESSAGE", "RUNNING FOR", "DONE", "RSS")]
        for w in q["workers"]:
            wrows.append((f"  #{w['number']}", str(w["pid"]), w["state"],
                          w["message_id"] or "-", _duration(w["running_for"]),
                          str(w["tasks_done"]), _mib(w["rss"])))
        lines += _table(wrows) if q["workers"] else ["  no workers"]
    # Names, message ids and readiness text come from queues and publishers: a
    # control character in them (C0 or C1, such as CSI) must not steer the terminal.
    return "\n".join(config_mod.escape(line) for line in lines)


def _limit_lines(lim: dict | None) -> list[str]:
    """A capped or rated queue's limits, as this host takes part in them."""
    if not lim:
        return []
    out = []
    c = lim.get("concurrency")
    if c:
        in_use = "" if c.get("in_use") is None else f"{c['in_use']} in use on all hosts, "
        out.append(f"  concurrency cap {c['cap']} (all hosts): {in_use}{c['held_here']} slot(s) "
                   f"held here, {c['workers_waiting']} worker(s) waiting for a slot")
    r = lim.get("rate")
    if r:
        gen = "; this host generates the tokens" if r["generator_here"] else ""
        out.append(f"  rate {r['rate']}, burst {r['burst']} (all hosts): "
                   f"{r['tasks_waiting']} task(s) waiting for a token{gen}")
    return out


def _when(t) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def render_schedules(answer: dict) -> str:
    rows = [("SCHEDULE", "QUEUE", "NEXT", "LAST FIRED", "LEADER", "FIRED HERE")]
    for s in answer["schedules"]:
        leader = "this host" if s["leading"] else (s["leader"] or "unknown")
        rows.append((s["name"], s["queue"], _when(s["next"]), _when(s["last_fired"]), leader,
                     str(s["fired"])))
    lines = _table(rows) if answer["schedules"] else ["no schedules in this daemon's config"]
    if not answer.get("broker_connected", True):
        lines.append("broker not reachable from the master: this is what it last read")
    return "\n".join(config_mod.escape(line) for line in lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    rows = [tuple(config_mod.escape(c) for c in r) for r in rows]   # widths as shown
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


# --- main ---------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cmd == "dead":
        from .deadctl import run as run_dead
        return run_dead(args)
    if args.cmd == "cancel":
        from .cancelctl import run as run_cancel
        return run_cancel(args)
    cfg = None if args.socket else load_config(args.config, needed=False)
    path = socket_path(args, cfg)
    req: dict = {"cmd": args.cmd}
    if getattr(args, "queue", None) is not None:
        req["queue"] = args.queue
    if args.cmd == "scale":
        req["workers"] = args.workers
    try:
        answer = request(path, req)
    except Unreachable as e:
        print(f"workqctl: {e}", file=sys.stderr)
        return e.code
    if not answer.get("ok"):
        print(config_mod.escape(f"workqctl: {answer.get('error', 'refused')}"), file=sys.stderr)
        return exitcodes.CTL_REFUSED
    if args.cmd == "status":
        print(json.dumps(answer, indent=2) if args.json else render_status(answer))
    elif args.cmd == "schedules":
        print(json.dumps(answer, indent=2) if args.json else render_schedules(answer))
    elif args.cmd == "scale":
        print(config_mod.escape(f"queue {answer['queue']}: {answer['was']} -> "
                                f"{answer['workers']} workers (until the next reload)"))
    else:
        what = {"pause": "paused", "resume": "resumed", "quiet": "paused"}[args.cmd]
        print(config_mod.escape(f"{what}: {', '.join(answer['queues']) or 'no queue'}"))
    return exitcodes.CTL_OK


if __name__ == "__main__":
    sys.exit(main())
