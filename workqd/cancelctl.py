"""``workqctl cancel ID...``: append each id to the vhost's cancel log, over AMQP.

The daemon is not involved (as with ``workqctl dead``): workqctl publishes to the
config's broker through workqd.client, each cancel confirmed. Every daemon that
reads the log (cancels.py) then dead-letters the task as ``cancelled``: unrun if
it is still waiting (in its queue or a delay level), stopped if it runs. An id
not seen yet is accepted: the task may be published later, within the log's
retention.
"""

from __future__ import annotations

import argparse
import sys

from . import cancels
from . import config as config_mod
from . import cliargs, deadctl, exitcodes

MAX_ID_BYTES = 255   # a message id is an AMQP short string


def add_parser(sub) -> None:
    c = sub.add_parser("cancel", help="cancel tasks by message id (over AMQP): never run, "
                                      "or stopped if running; dead-lettered as cancelled")
    c.add_argument("ids", nargs="+", metavar="ID", help="a task's message id")


def check_id(mid: str) -> str | None:
    """Why ``mid`` cannot be a message id, None when it can."""
    if not mid:
        return "an empty message id"
    if len(mid.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"a message id is at most {MAX_ID_BYTES} bytes of UTF-8"
    return None


def run(args: argparse.Namespace) -> int:
    for mid in args.ids:
        problem = check_id(mid)
        if problem:
            print(config_mod.escape(f"workqctl: {mid!r}: {problem}"), file=sys.stderr)
            return exitcodes.CTL_USAGE
    try:
        cliargs.load_config(args.config)   # a usage error before any connection
    except deadctl.USAGE_ERRORS as e:
        return deadctl.usage_error(e)
    from .client import Client, SubmitError
    code = exitcodes.CTL_OK
    with Client(config=args.config, name="workqctl cancel") as client:
        for mid in args.ids:
            try:
                client.cancel(mid)
            except SubmitError as e:
                print(config_mod.escape(f"workqctl: {e}"), file=sys.stderr)
                if str(e).startswith("cannot connect"):
                    return exitcodes.CTL_UNREACHABLE   # the rest would fail alike
                code = exitcodes.CTL_REFUSED
                continue
            print(config_mod.escape(f"{mid}: cancelled (in {cancels.STREAM}; dead-lettered "
                                    f"as cancelled, stopped if running)"))
    return code
