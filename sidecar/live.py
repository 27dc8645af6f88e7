"""``sidecar tap`` and ``sidecar top``: a live view of a running sidecar's decisions.

Theory of operation
-------------------
Both read the admin server's ``GET /tap`` (see ``sidecar.tap``): the first call registers
the watcher and returns the current sequence number; each next call long-polls for the
events after the last number seen. ``tap`` prints each event that passes the filters as it
arrives (``--caller``, ``--path`` prefix or glob, ``--decision``); ``top`` folds them into
counts per (caller, rule, status) over a sliding window and redraws a table every
``--interval`` seconds -- in place on a terminal, as successive tables (or JSON lines with
``-o json``) otherwise. Both stop after ``--count`` events / ``--duration`` seconds, or on
Ctrl-C (exit 0). Colour only on a terminal and never with ``NO_COLOR``.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import math
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any, TextIO
from urllib.parse import urlsplit

import trio

from sidecar.cli import seconds
from sidecar.ctlhttp.client import ClientError, parse_url, request
from sidecar.output import paint, rfc3339, safe, use_colour

DEFAULT_ADMIN = "http://127.0.0.1:15000"
POLL_WAIT = 1.0
HTTP_TIMEOUT = 10.0
DURATION_SLACK = 0.5  # seconds past --duration a last poll's answer may take
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class TapError(Exception):
    """The admin server cannot be reached or does not serve /tap."""


class TapClient:
    """Reads a running sidecar's ``/tap`` on its admin port, from where it was when started;
    counts the events the ring dropped before they were read."""

    def __init__(self, admin: str) -> None:
        parts = urlsplit(admin)
        if parts.scheme != "http" or not parts.hostname:
            raise TapError(f"--admin {admin!r}: expected http://HOST:PORT")
        self.host = parts.hostname
        try:
            self.port = parts.port or 15000
        except ValueError:
            raise TapError(f"--admin {admin!r}: expected http://HOST:PORT") from None
        host = self.host
        self.authority = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.prefix = parts.path.rstrip("/")
        self.seq: int | None = None
        self.dropped = 0

    def _get(self, query: str, timeout: float = HTTP_TIMEOUT) -> dict[str, Any]:
        """One ``GET /tap`` through the control-plane client (``sidecar.ctlhttp.client``):
        deadlines, head and body caps, at most 8 1xx answers, a status of 100-599 and no
        control characters in the head; then a JSON object with an integer ``seq``, a list
        of event objects and an integer ``dropped``. Anything else -- a server that is not
        a sidecar's admin port, or a hostile one -- is a ``TapError``, never a traceback
        (found by a hostile review: an answer that was not JSON, nested too deep, or a JSON
        list, ended in one; ``http.client`` also took any status and any 1xx count)."""
        where = f"{self.host}:{self.port}"
        try:
            target = parse_url(f"http://{self.authority}{self.prefix}/tap{query}",
                               schemes=("http",))
            answer = trio.run(functools.partial(
                request, target, connect_timeout=min(HTTP_TIMEOUT, timeout),
                read_timeout=min(HTTP_TIMEOUT, timeout), max_body_bytes=MAX_ANSWER_BYTES))
        except ClientError as exc:
            raise TapError(f"cannot reach the admin server at {where}: {exc}") from None
        if answer.status == 404:
            raise TapError("this sidecar does not serve /tap (upgrade it)")
        if answer.status != 200:
            raise TapError(f"/tap answered {answer.status}")
        try:
            # NaN and Infinity are no JSON (RFC 8259), though Python's reader takes them: read
            # as null, so ``-o json`` never writes them back (found by a hostile review).
            doc = json.loads(answer.body, parse_constant=lambda _constant: None)
        except (ValueError, RecursionError):
            raise TapError(f"{where} answered /tap with something that is not JSON") from None
        if not _tap_document(doc):
            raise TapError(f"{where} answered /tap with a document that is not a tap's")
        return dict(doc)

    def start(self) -> None:
        """Begin at the current end of the ring (no backlog: events from now on)."""
        self.seq = int(self._get("")["seq"])

    def poll(self, wait: float = POLL_WAIT,
             timeout: float = HTTP_TIMEOUT) -> list[dict[str, Any]]:
        """The events since the last poll (waiting up to ``wait`` seconds for one; the whole
        exchange bounded by ``timeout``)."""
        if self.seq is None:
            self.start()
        doc = self._get(f"?after={self.seq}&wait={wait}", timeout)
        self.seq = int(doc["seq"])
        self.dropped += int(doc.get("dropped", 0))
        events: list[dict[str, Any]] = doc.get("events", [])
        return events


def _is_int(value: object) -> bool:
    return type(value) is int and value >= 0


def _tap_document(doc: object) -> bool:
    """``doc`` is what ``GET /tap`` answers: ``seq`` and ``dropped`` counts, ``events`` a
    list of objects (each printed with ``_field`` / ``_when``, whatever its members hold)."""
    return (isinstance(doc, dict) and _is_int(doc.get("seq"))
            and _is_int(doc.get("dropped", 0))
            and isinstance(doc.get("events", []), list)
            and all(isinstance(event, dict) for event in doc.get("events", [])))


# An event's fields come from requests: shown through the one output-side escaper.
_text = safe


def _field(event: dict[str, Any], name: str) -> str:
    """A member of an event as ``_text`` (``-`` when absent or empty)."""
    value = event.get(name)
    return "-" if value is None or value == "" else _text(value)


def _when(event: dict[str, Any]) -> float:
    """An event's ``time`` as Unix seconds (0 when it is not a usable number)."""
    value = event.get("time")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    seconds = float(value)
    return seconds if math.isfinite(seconds) and 0 <= seconds < 253402300800 else 0.0


def _matches(event: dict[str, Any], args: argparse.Namespace) -> bool:
    if args.caller and event.get("caller") != args.caller:
        return False
    if args.decision and event.get("decision") != args.decision.replace("-", "_"):
        return False
    if args.path:
        path = event.get("path")
        if not isinstance(path, str):
            path = ""
        pattern = args.path
        if any(c in pattern for c in "*?["):
            return fnmatch.fnmatchcase(path, pattern)
        return path == pattern or path.startswith(pattern.rstrip("/") + "/")
    return True


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin", default=DEFAULT_ADMIN, metavar="URL",
                   help=f"the sidecar's admin server (default {DEFAULT_ADMIN})")
    p.add_argument("--caller", metavar="ID", help="only requests from this caller "
                                                  "(SPIFFE ID, or address when none)")
    p.add_argument("--path", metavar="P", help="only this path and below, or a glob "
                                               "(e.g. '/orders/*')")
    p.add_argument("--decision", choices=("allow", "deny", "dry-run"))
    p.add_argument("--duration", type=seconds, metavar="SECONDS",
                   help="stop after this long (default: until Ctrl-C)")
    p.add_argument("-o", "--output", dest="output_format", choices=("table", "json"),
                   default="table", help="table (default) or json (one JSON object per line)")


def _events(client: TapClient, args: argparse.Namespace, err: TextIO) -> Iterator[
        dict[str, Any] | None]:
    """Matching events as they come; None after each poll (a chance to redraw)."""
    client.start()
    print(f"watching {args.admin} (Ctrl-C to stop)", file=err, flush=True)
    deadline = time.monotonic() + args.duration if args.duration else None
    while deadline is None or time.monotonic() < deadline:
        left = math.inf if deadline is None else max(0.0, deadline - time.monotonic())
        wait = min(POLL_WAIT, left)
        try:
            # (bounded by what is left of --duration, plus a moment for the answer: a server
            # holding each poll made `--duration 1` run 9 s; found by a hostile review)
            events = client.poll(wait, min(HTTP_TIMEOUT, left + DURATION_SLACK))
        except TapError:
            if deadline is not None and time.monotonic() >= deadline:
                return  # the poll was cut at --duration: done, not a failure
            raise
        for event in events:
            if _matches(event, args):
                yield event
        yield None


def _tap_line(event: dict[str, Any], colour: bool) -> str:
    decision = _text(event.get("decision"))
    meaning = {"allow": "ok", "deny": "fail", "dry_run": "warn"}.get(decision, "")
    mark = paint(f"{decision:<7}", meaning, colour)
    rule = _field(event, "rule")
    reason = _text(event.get("reason") or "")
    return (f"{rfc3339(_when(event))} {mark} {_text(event.get('status'))} "
            f"{_text(event.get('direction') or '')[:3]} {_field(event, 'caller')} "
            f"{_field(event, 'method')} {_field(event, 'path')} "
            f"rule={rule}{' reason=' + reason if reason else ''} "
            f"{_text(event.get('duration_ms'))}ms id={_text(event.get('request_id'))}")


def cmd_tap(args: argparse.Namespace) -> int:
    """``sidecar tap``: print each decision as it happens; exit 1 when unreachable."""
    out, err = sys.stdout, sys.stderr
    colour = use_colour(out)
    seen = 0
    client: TapClient | None = None
    try:
        client = TapClient(args.admin)
        for event in _events(client, args, err):
            if event is None:
                continue
            if args.output_format == "json":
                out.write(json.dumps({**event, "time": rfc3339(_when(event))})
                          + "\n")
            else:
                out.write(_tap_line(event, colour) + "\n")
            out.flush()
            seen += 1
            if args.count and seen >= args.count:
                break
    except TapError as exc:
        print(f"sidecar tap: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        return 0
    if client is not None and client.dropped:
        print(f"sidecar tap: {client.dropped} event(s) dropped (the terminal fell behind)",
              file=err)
    return 0


def top_rows(window: deque[tuple[float, tuple[str, str, int, str]]], now: float,
             seconds: float) -> list[dict[str, Any]]:
    """Counts and rates per (caller, rule, status, decision) over the last ``seconds``."""
    while window and window[0][0] < now - seconds:
        window.popleft()
    counts = Counter(key for _, key in window)
    return [{"caller": c, "rule": r, "status": s, "decision": d, "count": n,
             "rate": round(n / seconds, 2)}
            for (c, r, s, d), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _top_table(rows: list[dict[str, Any]], seconds: float, colour: bool) -> str:
    header = ("CALLER", "RULE", "STATUS", "DECISION", "RATE/s", "COUNT")
    cells = [(r["caller"] or "-", r["rule"] or "-", str(r["status"]), r["decision"],
              f"{r['rate']:.2f}", str(r["count"])) for r in rows]
    widths = [max(len(x[i]) for x in [header, *cells]) for i in range(len(header))]
    lines = [f"requests in the last {seconds:g}s, by caller, rule and status",
             "  ".join(h.ljust(widths[i]) for i, h in enumerate(header)).rstrip()]
    for row in cells:
        meaning = {"allow": "ok", "deny": "fail", "dry_run": "warn"}.get(row[3], "")
        text = "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()
        lines.append(paint(text, meaning, colour))
    if not cells:
        lines.append("(no requests)")
    return "\n".join(lines)


def cmd_top(args: argparse.Namespace) -> int:
    """``sidecar top``: request counts and rates per caller, rule and status, redrawn."""
    out, err = sys.stdout, sys.stderr
    colour = use_colour(out)
    in_place = bool(out.isatty()) and args.output_format == "table"
    args.interval = min(max(args.interval, 0.1), 3600.0)
    args.window = min(max(args.window, 1.0), 3600.0)
    window: deque[tuple[float, tuple[str, str, int, str]]] = deque(maxlen=1_000_000)
    next_draw = time.monotonic() + args.interval
    drawn = 0

    def draw() -> None:
        rows = top_rows(window, time.time(), args.window)
        if args.output_format == "json":
            out.write(json.dumps({"kind": "Top", "time": rfc3339(time.time()),
                                  "window_seconds": args.window, "rows": rows}) + "\n")
        else:
            text = _top_table(rows, args.window, colour)
            out.write(("\x1b[H\x1b[2J" if in_place else "") + text + ("\n" if in_place
                                                                      else "\n\n"))
        out.flush()

    try:
        client = TapClient(args.admin)
        for event in _events(client, args, err):
            if event is not None:
                status = event.get("status")
                key = (_text(event.get("caller") or ""), _text(event.get("rule") or ""),
                       status if type(status) is int else 0, _text(event.get("decision")))
                window.append((time.time(), key))
            if time.monotonic() >= next_draw:
                draw()
                drawn += 1
                next_draw = time.monotonic() + args.interval
                if args.iterations and drawn >= args.iterations:
                    return 0
        draw()
    except TapError as exc:
        print(f"sidecar top: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        return 0
    return 0


def add_live_parsers(subparsers: Any) -> None:
    """Register ``tap`` and ``top`` under an argparse subparsers object."""
    p = subparsers.add_parser("tap", help="print a running sidecar's decisions as they happen")
    _add_common(p)
    p.add_argument("-n", "--count", type=int, metavar="N", help="stop after N events")
    p.set_defaults(func=cmd_tap)

    p = subparsers.add_parser("top", help="request rates by caller, rule and status, live")
    _add_common(p)
    p.add_argument("--interval", type=seconds, default=2.0, metavar="SECONDS",
                   help="redraw every SECONDS (default 2)")
    p.add_argument("--window", type=seconds, default=10.0, metavar="SECONDS",
                   help="rates over the last SECONDS (default 10)")
    p.add_argument("--iterations", type=int, metavar="N", help="stop after N tables")
    p.set_defaults(func=cmd_top)
