"""One small error hierarchy.

Two families, in the h11 manner:

* ``RequestRefused`` and its subclasses: something about one request or connection is
  refused. Each carries the HTTP status the client gets and a *generic* body; the
  ``reason`` (a short machine code) and ``detail`` go to logs and audit records only.
* ``ConfigError``: a file a person edits (sidecar config, mesh policy) is wrong. It carries
  every problem found, each with file, line and key path, so that one run reports them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

_GENERIC_BODY: dict[int, str] = {
    400: "bad request",
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    408: "request timeout",
    413: "payload too large",
    421: "misdirected request",
    429: "too many requests",
    431: "request header fields too large",
    500: "internal error",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}


def printable(text: str) -> str:
    """``text`` with every character that is not printable (C0 and C1 controls, DEL, bidi
    overrides, line separators) written as its escape: a key or value from a file goes into
    messages on a terminal and in CI logs, where ``\\x1b]0;...`` or U+202E would act.
    Already printable text (an escape written before included) is returned unchanged."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def generic_body(status: int) -> str:
    """The only text a client ever sees for an error status."""
    return _GENERIC_BODY.get(status, "error")


def reason_phrase(status: int) -> str:
    """The canonical reason phrase of the status line (``403 Forbidden``, ``429 Too Many
    Requests``), as RFC 9110 and every HTTP library spell it; empty for an unknown code
    (RFC 9112 allows an empty phrase)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class RequestRefused(SidecarError):
    """A request or connection is refused; ``status`` is what the client gets."""

    status = 400

    def __init__(self, reason: str, detail: str = "", *, status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        if status is not None:
            self.status = status


class BadRequest(RequestRefused):
    """Malformed request (400)."""

    status = 400


class Unauthorized(RequestRefused):
    """Credentials missing or invalid (401)."""

    status = 401


class Forbidden(RequestRefused):
    """Authenticated but not allowed (403)."""

    status = 403


class PayloadTooLarge(RequestRefused):
    """The request body is over the size limit (413)."""

    status = 413


class TooManyRequests(RequestRefused):
    """Over a rate limit (429)."""

    status = 429


class HeadersTooLarge(RequestRefused):
    """The request head is over the size limits (431)."""

    status = 431


class BadGateway(RequestRefused):
    """The upstream (app or peer sidecar) failed or is not who it must be."""

    status = 502


class Unavailable(RequestRefused):
    """The sidecar sheds load or cannot record decisions right now."""

    status = 503


class GatewayTimeout(RequestRefused):
    """The upstream did not answer in time (504)."""

    status = 504


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a user-edited file."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        # Every part as printable text: the file's name comes from a directory listing (a
        # policy set) and the message may quote a value; either may hold a terminal escape.
        file = printable(self.file)
        where = f"{file}:{self.line}" if self.line else file
        key = f" {printable(self.key)}:" if self.key else ""
        return f"{where}:{key} {printable(self.message)}"


class ConfigError(SidecarError):
    """A config or policy file is invalid; ``problems`` lists every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
