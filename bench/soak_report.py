"""Turns a soak run into bench/results/soak.md: answers by kind, every server error, memory."""

from __future__ import annotations

import datetime
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bench import tables
from bench.huge_bodies import HugePhase
from bench.measure import Target
from bench.rss import MB, RssSamples
from bench.soak_mix import QUEUE_FULL, Answer, Outcome

RSS_GROWTH_GOAL_PCT = 5.0
HUGE_BODY_GOAL_MB = 100.0
# In a stream or a socket the status is already 200 (or 101): these error types are the 5xx there.
SERVER_ERROR_TYPES = ("server_error", "timeout_error")
DOCUMENTED_5XX = (501,)  # a task the model cannot do (README, Errors)
SHOWN_LOG_LINES = 20
# uvicorn re-raises SIGTERM once its graceful shutdown is done; a server killed after the grace is -9.
GRACEFUL_EXIT = -15


@dataclass(frozen=True)
class SoakResults:
    outcomes: list[Outcome]
    idle_rss: int
    warm_rss: int
    soak_rss: RssSamples
    end_rss: int
    huge: HugePhase
    serves_after: str
    phases: dict[str, datetime.datetime]  # when each began, to place the server log's lines


@dataclass(frozen=True)
class ServerRun:
    exit_code: int
    exceptions: list[str]  # the last line of each traceback in the server log
    error_lines: list[str]


def server_side(answer: Answer) -> bool:
    """A 5xx, or an error event of a server error type inside a stream or a socket."""
    if answer.status is not None and answer.status >= 500:
        return True
    return answer.status in (None, 200) and answer.error is not None and answer.error.get("type") in SERVER_ERROR_TYPES


def _internal(answer: Answer) -> bool:
    """A 500 or its equivalent in a stream or socket: the failures nobody documented."""
    return answer.status == 500 or (answer.status in (None, 200) and answer.error is not None
                                     and answer.error.get("type") == "server_error")


def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / MB:.0f}"


def _answers(outcomes: Sequence[Outcome]) -> str:
    counts = Counter(outcome.answer.label for outcome in outcomes)
    return ", ".join(f"{label} × {count}" for label, count in counts.most_common())


def checks(results: SoakResults, server: ServerRun) -> list[str]:
    answers = [outcome.answer for outcome in results.outcomes]
    too_many = [answer for answer in answers if answer.status == 429]
    errors = [answer for answer in answers if answer.error is not None or (answer.status or 0) >= 400]
    other_5xx = [a for a in answers if server_side(a) and not _internal(a) and a.status not in DOCUMENTED_5XX]
    refused_streams = [a for a in answers if a.status == 200 and a.error and a.error.get("code") == QUEUE_FULL]
    rows = [
        ("answers 500 (or a server_error event in a stream or socket)", sum(map(_internal, answers)), "0"),
        ("other 5xx answers, not documented (501 is)", len(other_5xx), "0"),
        (f"429 answers without Retry-After (of {len(too_many)})",
         sum(answer.retry_after is None for answer in too_many), "0"),
        ("SSE streams refused for a full queue by an error event, not a 429 with Retry-After",
         len(refused_streams), "0"),
        (f"error answers without the full OpenAI envelope (of {len(errors)})",
         sum(not answer.envelope_complete for answer in errors), "0"),
        ("answers their kind does not expect (below)", sum(not outcome.expected for outcome in results.outcomes), "0"),
        ("tracebacks in the server log (below)", len(server.exceptions), "0"),
        ("server exit status on SIGTERM", server.exit_code, str(GRACEFUL_EXIT)),
    ]
    lines = ["| check | found | goal |", "|---|---|---|"]
    lines += [f"| {name} | {'**' + str(found) + '**' if str(found) != goal else found} | {goal} |"
              for name, found, goal in rows]
    lines.append(f"| a plain generation after everything | {results.serves_after} | yes |")
    return lines


def by_kind(outcomes: Sequence[Outcome]) -> list[str]:
    lines = ["| kind | requests | answers | median s | slowest s | not expected |", "|---|---|---|---|---|---|"]
    kinds = dict.fromkeys(outcome.kind for outcome in outcomes)
    for kind in sorted(kinds, key=lambda kind: (kind.bad, kind.name)):
        mine = [outcome for outcome in outcomes if outcome.kind == kind]
        seconds = [outcome.seconds for outcome in mine]
        unexpected = [outcome for outcome in mine if not outcome.expected]
        lines.append(f"| {kind.name} | {len(mine)} | {_answers(mine)} | {statistics.median(seconds):.2f} | "
                     f"{max(seconds):.2f} | {_answers(unexpected) or '–'} |")
    return lines


def server_errors(outcomes: Sequence[Outcome]) -> list[str]:
    """Every 5xx, grouped by what the client saw; a 500 is in bold."""
    seen: Counter[tuple[str, str, str, str]] = Counter()
    request_ids: dict[tuple[str, str, str, str], str] = {}
    for outcome in outcomes:
        answer = outcome.answer
        if server_side(answer):
            error = answer.error or {}
            key = (outcome.kind.name, answer.label, str(error.get("code")), str(error.get("message", "")).strip())
            seen[key] += 1
            request_ids.setdefault(key, str(error.get("request_id")))
    if not seen:
        return ["None."]
    lines = ["| kind | answer | code | message | first request id | count |", "|---|---|---|---|---|---|"]
    for (kind, label, code, message), count in seen.most_common():
        shown = f"**{label}**" if label == "500" or "server_error" in label else label
        lines.append(f"| {kind} | {shown} | {code} | {message[:160]} | {request_ids[kind, label, code, message]} | "
                     f"{count} |")
    return lines


def memory(results: SoakResults) -> tuple[list[str], Target]:
    growth = (results.end_rss - results.warm_rss) / results.warm_rss * 100
    samples = results.soak_rss.samples
    lines = [
        "| point | RSS MB |", "|---|---|",
        f"| idle, model loaded | {_mb(results.idle_rss)} |",
        f"| after the warm-up | {_mb(results.warm_rss)} |",
        f"| during the soak, lowest / highest ({len(samples)} samples, 1 s apart) | "
        f"{_mb(min(samples))} / {_mb(max(samples))} |",
        f"| end: after the last answer and a 3 s pause | {_mb(results.end_rss)} |",
    ]
    target = Target("server RSS growth, after warm-up → end of the soak", growth,
                    f"< {RSS_GROWTH_GOAL_PCT:g} %", growth < RSS_GROWTH_GOAL_PCT, unit=" %")
    return lines, target


def huge_bodies(huge: HugePhase) -> tuple[list[str], Target]:
    above = (huge.rss.peak - huge.idle_rss) / MB
    lines = [
        f"Idle before: {_mb(huge.idle_rss)} MB; peak while sending: {_mb(huge.rss.peak)} MB "
        f"({len(huge.rss.samples)} samples, 50 ms apart); 3 s after the last answer: {_mb(huge.settled_rss)} MB."
        + (" **The soak stopped the clients: the server's RSS passed its cap.**" if huge.stopped_at_cap else ""),
        "",
        "| client | sent before the answer | answer | seconds |", "|---|---|---|---|",
    ]
    lines += [f"| {result.body.label} | {result.sent_bytes / 1e6:.0f} MB | {result.answer} | {result.seconds:.1f} |"
              for result in huge.results]
    target = Target(f"server RSS above idle while 4 clients send {huge.size / 1e9:g} GB bodies (peak)", above,
                    f"< {HUGE_BODY_GOAL_MB:g} MB", above < HUGE_BODY_GOAL_MB, unit=" MB")
    return lines, target


def _log_excerpt(title: str, lines: Sequence[str]) -> list[str]:
    if not lines:
        return []
    shown = [f"    {line[:200]}" for line in lines[:SHOWN_LOG_LINES]]
    more = [f"    ... and {len(lines) - SHOWN_LOG_LINES} more"] if len(lines) > SHOWN_LOG_LINES else []
    return [f"{title.capitalize()} (first {SHOWN_LOG_LINES}):", "", *shown, *more, ""]


def markdown(results: SoakResults, server: ServerRun, notes: Sequence[str]) -> str:
    memory_lines, growth = memory(results)
    huge_lines, huge_peak = huge_bodies(results.huge)
    answers = Counter(outcome.answer.label for outcome in results.outcomes)
    lines = [
        "# Soak: every kind of request at once, then huge bodies",
        "",
        "Written by `make soak` (`bench/soak.py`): clients send a random mix of generations, multipart",
        "edits, SSE streams, WebSocket sessions (some clients leave mid-stream) and bad inputs to a real",
        "`diffuser-api serve` process on 127.0.0.1; a small queue makes 429s part of the mix. A client",
        "waits up to 0.2 s between requests, or the Retry-After of a 429 (at most 1 s).",
        "",
        "## Targets",
        "",
        *tables.targets([growth, huge_peak]),
        "",
        "## Checks",
        "",
        *checks(results, server),
        "",
        f"## Requests by kind ({len(results.outcomes)} in all)",
        "",
        *by_kind(results.outcomes),
        "",
        "| answer | count |", "|---|---|",
        *(f"| {label} | {count} |" for label, count in answers.most_common()),
        "",
        "## Every 5xx",
        "",
        *server_errors(results.outcomes),
        "",
        "## Server memory (VmRSS of the server process)",
        "",
        *memory_lines,
        "",
        "## Huge bodies",
        "",
        "Four clients at once, each streaming one body generated on the fly: a generation whose prompt",
        "is the body, and an edit whose image part is; chunked, and with the size declared in",
        "Content-Length.",
        "",
        *huge_lines,
        "",
        f"## Server log: {len(server.error_lines)} ERROR lines, {len(server.exceptions)} tracebacks",
        "",
        *_log_excerpt("ERROR lines", server.error_lines),
        *_log_excerpt("exceptions the tracebacks end with", server.exceptions),
        "",
        "## Notes",
        "",
        *(f"- {note}" for note in notes),
        "- Phases began at (the server log's clock): "
        + ", ".join(f"{name} {began:%H:%M:%S}" for name, began in results.phases.items()),
    ]
    return "\n".join(lines) + "\n"
