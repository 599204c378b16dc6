"""What went wrong with a broker connection, in one line, for every tool that connects.

pika wraps the cause of a failed connection in layers (an AMQPConnectionError
around a workflow failure around one connector's error); the operator wants the
innermost cause in plain words. ``describe`` is workq-submit's and workqctl's line;
``tls_error`` tells a worker whether a failure is TLS configuration, which no
reconnect can fix.
"""

from __future__ import annotations

import re
import socket
import ssl

import pika.exceptions
from pika.adapters.utils import connection_workflow as workflow

# Checked on the error as raised, before unwrapping: pika says these best itself.
_AS_RAISED = (
    (pika.exceptions.ProbableAuthenticationError, "login refused (check user and password)"),
    (pika.exceptions.ProbableAccessDeniedError, "access refused (check the vhost and permissions)"),
    (pika.exceptions.ConnectionBlockedTimeout, "the broker kept blocking publishers (alarm)"),
)
_UNWRAP_DEPTH = 5
_SSL_TEXT = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")


def describe(error, connect_timeout: float) -> str:
    """One line for anything pika or ssl raised, without the exception class soup."""
    for kind, line in _AS_RAISED:
        if isinstance(error, kind):
            return line
    error = innermost(error)
    line = _describe_tls(error) or _describe_socket(error, connect_timeout) \
        or _describe_amqp(error)
    if line:
        return line
    text = str(error) or ", ".join(map(str, getattr(error, "args", ()))) or type(error).__name__
    return " ".join(text.split())


def innermost(error):
    """The cause inside pika's connection workflow:
    AMQPConnectionError(WorkflowFailed(..., Connector(exc))) -> exc."""
    for _ in range(_UNWRAP_DEPTH):
        if isinstance(error, pika.exceptions.AMQPConnectionError) and error.args and \
                isinstance(error.args[0], BaseException):
            error = error.args[0]
        elif isinstance(error, workflow.AMQPConnectionWorkflowFailed) and error.exceptions:
            error = error.exceptions[-1]
        elif isinstance(error, workflow.AMQPConnectorPhaseErrorBase) and error.exception:
            error = error.exception
        else:
            break
    return error


def _describe_tls(error) -> str | None:
    if isinstance(error, (ssl.SSLCertVerificationError, ssl.CertificateError)):
        return f"TLS handshake failed: {getattr(error, 'verify_message', '') or error}"
    if isinstance(error, ssl.SSLError):
        text = error.args[1] if len(error.args) > 1 and isinstance(error.args[1], str) else ""
        return "TLS handshake failed: " + (re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)
                                           or error.reason or type(error).__name__)
    return None


def _describe_socket(error, connect_timeout: float) -> str | None:
    if isinstance(error, workflow.AMQPConnectorStackTimeout):
        return f"no answer within {connect_timeout:g}s"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host: {error.strerror}"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror if not error.filename else f"{error.filename}: {error.strerror}"
    return None


def _describe_amqp(error) -> str | None:
    if isinstance(error, pika.exceptions.ConnectionClosed):
        return f"closed by the broker ({error.reply_code} {error.reply_text})" \
            if error.reply_code not in (0, 200) or error.reply_text else "closed"
    if isinstance(error, pika.exceptions.ChannelClosed):
        return f"{error.reply_code} {error.reply_text}"
    if isinstance(error, pika.exceptions.StreamLostError):
        return "connection reset"
    return None


def tls_error(error) -> str | None:
    """The TLS failure behind a pika connection error, in one line, or None."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if isinstance(e, str):
            # TLS 1.3 refuses a missing client certificate after the handshake; pika
            # then reports it only as text inside a protocol error.
            m = _SSL_TEXT.search(e)
            if m:
                return m.group(1).replace("_", " ").lower()
            continue
        if id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"the broker's certificate was refused: {e.verify_message}"
        if isinstance(e, ssl.SSLError):
            return f"{e.reason or e}".replace("_", " ").lower()
        # pika wraps the cause: .exceptions (a workflow), .exception (one phase), args.
        todo += [*getattr(e, "exceptions", ()), getattr(e, "exception", None), *e.args,
                 e.__cause__, e.__context__]
    return None
