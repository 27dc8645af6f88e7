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
import http.client
import json
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any, TextIO
from urllib.parse import urlsplit

from sidecar.output import paint, rfc3339, use_colour

DEFAULT_ADMIN = "http://127.0.0.1:15000"
POLL_WAIT = 1.0
HTTP_TIMEOUT = 10.0
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
        self.port = parts.port or 15000
        self.prefix = parts.path.rstrip("/")
        self.seq: int | None = None
        self.dropped = 0

    def _get(self, query: str) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT)
        try:
            conn.request("GET", f"{self.prefix}/tap{query}")
            resp = conn.getresponse()
            body = resp.read(MAX_ANSWER_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            raise TapError(f"cannot reach the admin server at {self.host}:{self.port}: "
                           f"{exc}") from None
        finally:
            conn.close()
        if resp.status == 404:
            raise TapError("this sidecar does not serve /tap (upgrade it)")
        if resp.status != 200:
            raise TapError(f"/tap answered {resp.status}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def start(self) -> None:
        """Begin at the current end of the ring (no backlog: events from now on)."""
        self.seq = int(self._get("")["seq"])

    def poll(self, wait: float = POLL_WAIT) -> list[dict[str, Any]]:
        """The events since the last poll (waiting up to ``wait`` seconds for one)."""
        if self.seq is None:
            self.start()
        doc = self._get(f"?after={self.seq}&wait={wait}")
        self.seq = int(doc["seq"])
        self.dropped += int(doc.get("dropped", 0))
        events: list[dict[str, Any]] = doc.get("events", [])
        return events


def _matches(event: dict[str, Any], args: argparse.Namespace) -> bool:
    if args.caller and event.get("caller") != args.caller:
        return False
    if args.decision and event.get("decision") != args.decision.replace("-", "_"):
        return False
    if args.path:
        path = event.get("path") or ""
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
    p.add_argument("--duration", type=float, metavar="SECONDS",
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
        wait = POLL_WAIT if deadline is None else max(0.0, min(POLL_WAIT,
                                                               deadline - time.monotonic()))
        for event in client.poll(wait):
            if _matches(event, args):
                yield event
        yield None


def _tap_line(event: dict[str, Any], colour: bool) -> str:
    decision = str(event.get("decision"))
    meaning = {"allow": "ok", "deny": "fail", "dry_run": "warn"}.get(decision, "")
    mark = paint(f"{decision:<7}", meaning, colour)
    rule = event.get("rule") or "-"
    reason = event.get("reason") or ""
    return (f"{rfc3339(float(event.get('time') or 0))} {mark} {event.get('status')} "
            f"{event.get('direction', '')[:3]} {event.get('caller') or '-'} "
            f"{event.get('method') or '-'} {event.get('path') or '-'} "
            f"rule={rule}{' reason=' + reason if reason else ''} "
            f"{event.get('duration_ms')}ms id={event.get('request_id')}")


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
                out.write(json.dumps({**event, "time": rfc3339(float(event.get("time") or 0))})
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
                key = (str(event.get("caller") or ""), str(event.get("rule") or ""),
                       int(event.get("status") or 0), str(event.get("decision")))
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
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="redraw every SECONDS (default 2)")
    p.add_argument("--window", type=float, default=10.0, metavar="SECONDS",
                   help="rates over the last SECONDS (default 10)")
    p.add_argument("--iterations", type=int, metavar="N", help="stop after N tables")
    p.set_defaults(func=cmd_top)
