"""Streams of everyday traffic through the event API, against a plain insert of the same calls
(``python benchmarks/ingest.py --streams``; see that script's docstring for the stack).

Real traffic is mostly calls that start nothing: page views and track events no journey listens
for. Three streams, each ``--stream-events`` calls with ``--concurrency`` in flight, from a fixed
random seed:

- **quiet**: only calls that trigger nothing: ``page`` calls (half of them from anonymous
  visitors) and ``track`` of ``Product Viewed``;
- **mixed**: 80% such calls, 15% ``identify`` (a trait change, every third with an email), 5%
  ``Order Completed`` triggers of ``post_purchase``;
- **merge**: identity at work: an anonymous visitor's ``page``, then their ``identify`` with the
  ``anonymousId``, a known user's ``userId`` and email (two people merge), and an ``alias``.

The floor is the same **mixed** calls, at the same paths, to a FastAPI app served by uvicorn like
the API, that parses each JSON body and inserts it as one row of the ``events`` table of the same
database (``python benchmarks/_stack.py floor``): what any web service storing these events pays.
The goal: the API ingests the mixed stream at 80% or more of the floor's rate, and a call of the
quiet stream costs the API under 2 ms of CPU. The worker is stopped (SIGSTOP) while the calls are
made, so the numbers are ingestion alone, and after each stream it runs until it is idle (the
runs the stream started, started): stopped inside a transaction, it would hold row locks the next
stream's calls need. A failed call is reported with its status or the client's exception.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from _stack import WRITE_KEY, CommandCpu, Service, Stack, bounded, busy_seconds, cpu_seconds, percentile

FLOOR_GOAL = 0.80
QUIET_CPU_GOAL_MS = 2.0
IDLE = 1.0
"""After a stream that stopped the worker, it runs until it used under :data:`IDLE_SHARE` of a core
for this many seconds: done with what the stream gave it, so in no transaction when stopped again
(a fixed 2 s was too short after the mixed stream, which leaves it hundreds of runs to start)."""
IDLE_SHARE = 0.05
IDLE_LIMIT = 600.0
"""Seconds after which the benchmark stops waiting for the worker to be idle, and says so."""
KNOWN = 2000
"""Known users seeded before the streams (each with a phone), so identifies and triggers find them."""

Call = tuple[str, dict[str, Any]]
"""A path (``/v1/page``) and its JSON body."""


def _base(rng: random.Random, *, anonymous: bool, known: int) -> dict[str, Any]:
    body: dict[str, Any] = {"messageId": str(uuid.uuid4()), "timestamp": datetime.now(UTC).isoformat()}
    if anonymous:
        body["anonymousId"] = f"visitor-{rng.randrange(10**9):09d}"
    else:
        body["userId"] = f"known-{rng.randrange(known):05d}"
    return body


def quiet_call(rng: random.Random, known: int) -> Call:
    body = _base(rng, anonymous=rng.random() < 0.5, known=known)
    if rng.random() < 0.5:
        body.update(name="Pricing", properties={"path": "/pricing", "url": "https://example.com/pricing"})
        return "/v1/page", body
    body.update(event="Product Viewed", properties={"product_id": f"p{rng.randrange(500)}", "price": 19.9})
    return "/v1/track", body


def mixed_call(rng: random.Random, known: int) -> Call:
    roll = rng.random()
    if roll < 0.80:
        return quiet_call(rng, known)
    body = _base(rng, anonymous=False, known=known)
    if roll < 0.95:
        traits: dict[str, Any] = {"plan": rng.choice(["free", "pro", "team"]), "visits": rng.randrange(100)}
        if rng.random() < 1 / 3:
            traits["email"] = f"{body['userId']}@example.com"
        body["traits"] = traits
        return "/v1/identify", body
    key = f"order-{uuid.uuid4().hex[:12]}"
    body.update(
        event="Order Completed", properties={"order_id": key, "course_name": "Durable Python", "total": 199}
    )
    return "/v1/track", body


def merge_calls(rng: random.Random, known: int, count: int) -> list[Call]:
    """Visitors who sign in: a page view, then an identify joining their anonymousId to a known
    user (with the user's email), and every fourth visitor an alias of the visitor id as well."""
    calls: list[Call] = []
    while len(calls) < count:
        visitor = f"visitor-{uuid.uuid4().hex[:16]}"
        user = f"known-{rng.randrange(known):05d}"
        now = datetime.now(UTC).isoformat()
        calls.append(
            (
                "/v1/page",
                {"anonymousId": visitor, "name": "Home", "messageId": str(uuid.uuid4()), "timestamp": now},
            )
        )
        traits = {"email": f"{user}@example.com", "plan": "pro"}
        identify = {
            "anonymousId": visitor,
            "userId": user,
            "traits": traits,
            "messageId": str(uuid.uuid4()),
            "timestamp": now,
        }
        calls.append(("/v1/identify", identify))
        if len(calls) % 4 == 0:
            calls.append(
                (
                    "/v1/alias",
                    {"previousId": visitor, "userId": user, "messageId": str(uuid.uuid4()), "timestamp": now},
                )
            )
    return calls[:count]


@dataclass
class StreamRun:
    stream: str
    target: str
    calls: int
    seconds: float
    answer_ms: list[float]
    cpu_ms: dict[str, float]
    failed: int
    reasons: list[str]
    """Why calls failed: the status and the answer's start, or the client's exception, with the
    seconds the call took (the first few)."""

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


async def run_stream(
    http: httpx.AsyncClient,
    stream: str,
    target: str,
    calls: list[Call],
    concurrency: int,
    meters: dict[str, Callable[[], float]],
    pause: int | None,
) -> StreamRun:
    """Send ``calls``; CPU per call by process from the meters (the worker stopped meanwhile)."""
    answers: list[float] = []
    failed = 0
    reasons: list[str] = []

    async def one(index: int) -> float:
        nonlocal failed
        path, body = calls[index]
        started = time.perf_counter()
        reason = None
        try:
            response = await http.post(path, json=body)
            if response.status_code != 200:
                reason = f"{path} answered {response.status_code}: {response.text[:120]}"
        except httpx.HTTPError as exc:
            reason = f"{path}: {type(exc).__name__} {exc}"
        answered = time.perf_counter()
        if reason is not None:
            failed += 1
            if len(reasons) < 3:
                reasons.append(f"{reason} (after {answered - started:.1f} s)")
        answers.append((answered - started) * 1000)
        return answered

    before = {name: meter() for name, meter in meters.items()}
    if pause is not None:
        os.kill(pause, signal.SIGSTOP)
    try:
        start = time.perf_counter()
        await bounded(len(calls), concurrency, one)
        seconds = time.perf_counter() - start
    finally:
        if pause is not None:
            os.kill(pause, signal.SIGCONT)
    used = {name: (meter() - before[name]) * 1000 / len(calls) for name, meter in meters.items()}
    used["other"] = max(0.0, used.pop("machine") - sum(used.values()))
    if pause is not None:
        # The worker may have been stopped inside a transaction, holding row locks (a profile's)
        # that the next stream's calls need: it finishes that, and the rest of its backlog, before
        # it is stopped again, or those calls would wait for it until the client gives up.
        await until_idle(pause)
    return StreamRun(stream, target, len(calls), seconds, answers, used, failed, reasons)


async def until_idle(pid: int) -> float:
    """Wait until process ``pid`` used under :data:`IDLE_SHARE` of a core over :data:`IDLE`
    seconds (at most :data:`IDLE_LIMIT`); the seconds waited."""
    began = time.perf_counter()
    used = cpu_seconds(pid)
    while True:
        await asyncio.sleep(IDLE)
        now = cpu_seconds(pid)
        if now - used < IDLE_SHARE * IDLE:
            return time.perf_counter() - began
        used = now
        if time.perf_counter() - began > IDLE_LIMIT:
            print(f"the worker was still busy {IDLE_LIMIT:.0f} s after a stream; going on", flush=True)
            return time.perf_counter() - began


async def seed_known(http: httpx.AsyncClient, known: int) -> None:
    """Known users with a phone, through the API (one batch per 100), before anything is timed."""
    for start in range(0, known, 100):
        batch = [
            {
                "type": "identify",
                "userId": f"known-{i:05d}",
                "traits": {"phone": f"+8613{i:09d}", "first_name": f"K{i}"},
                "messageId": f"seed-{i}",
            }
            for i in range(start, min(known, start + 100))
        ]
        response = await http.post("/v1/batch", json={"batch": batch})
        response.raise_for_status()


async def measure_streams(
    stack: Stack,
    api: Service,
    floor: Service,
    pids: dict[str, int],
    worker: int,
    *,
    events: int,
    concurrency: int,
    rounds: int,
    postgres: bool,
) -> list[StreamRun]:
    rng = random.Random(11)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {WRITE_KEY}"}
    runs: list[StreamRun] = []
    async with (
        httpx.AsyncClient(base_url=api.address, headers=headers, limits=limits, timeout=60) as to_api,
        httpx.AsyncClient(base_url=floor.address, headers=headers, limits=limits, timeout=60) as to_floor,
    ):
        await seed_known(to_api, KNOWN)
        for http in (to_api, to_floor):  # warm-up: connections and caches (each its own calls)
            warm = [mixed_call(rng, KNOWN) for _ in range(200)]
            await bounded(
                len(warm), concurrency, lambda i, http=http, warm=warm: http.post(warm[i][0], json=warm[i][1])
            )

        def meters(process: str) -> dict[str, Callable[[], float]]:
            chosen: dict[str, Callable[[], float]] = {
                process: functools.partial(cpu_seconds, pids[process]),
                "temporal": functools.partial(cpu_seconds, pids["temporal"]),
                "client": functools.partial(cpu_seconds, pids["client"]),
            }
            if postgres:
                chosen["postgres"] = CommandCpu("postgres")
            chosen["machine"] = busy_seconds
            return chosen

        for index in range(rounds):
            quiet = [quiet_call(rng, KNOWN) for _ in range(events)]
            mixed = [mixed_call(rng, KNOWN) for _ in range(events)]
            merge = merge_calls(rng, KNOWN, events)
            floor_mixed = [(path, {**body, "messageId": str(uuid.uuid4())}) for path, body in mixed]
            order = [
                ("mixed", "floor", to_floor, floor_mixed, "floor"),
                ("mixed", "api", to_api, mixed, "api"),
            ]
            if index % 2:
                order.reverse()
            order += [("quiet", "api", to_api, quiet, "api"), ("merge", "api", to_api, merge, "api")]
            for stream, target, http, calls, process in order:
                runs.append(
                    await run_stream(http, stream, target, calls, concurrency, meters(process), worker)
                )
    return runs


def report_streams(runs: list[StreamRun]) -> None:
    print()
    print(
        f"{'stream':<8}{'to':<7}{'calls':>7}{'calls/s':>9}{'answer ms p50/p99':>19}{'failed':>8}  CPU ms per call"
    )
    for run in runs:
        cpu = ", ".join(f"{name} {value:.2f}" for name, value in run.cpu_ms.items())
        p50, p99 = percentile(run.answer_ms, 0.5), percentile(run.answer_ms, 0.99)
        print(
            f"{run.stream:<8}{run.target:<7}{run.calls:>7}{run.rate:>9.1f}{f'{p50:.0f}/{p99:.0f}':>19}{run.failed:>8}  {cpu}"
        )

    def total(stream: str, target: str) -> tuple[float, float]:
        chosen = [r for r in runs if r.stream == stream and r.target == target]
        rate = sum(r.calls for r in chosen) / sum(r.seconds for r in chosen)
        cpu = sum(r.cpu_ms.get(target if target == "floor" else "api", 0.0) * r.calls for r in chosen)
        return rate, cpu / sum(r.calls for r in chosen)

    print()
    api_rate, api_cpu = total("mixed", "api")
    floor_rate, floor_cpu = total("mixed", "floor")
    share = api_rate / floor_rate
    print(
        f"mixed stream: api {api_rate:.1f} calls/s ({api_cpu:.2f} CPU ms per call), floor {floor_rate:.1f} calls/s "
        f"({floor_cpu:.2f} CPU ms per call): api = {share * 100:.1f}% of the floor "
        f"(goal >= {FLOOR_GOAL * 100:.0f}%: {'met' if share >= FLOOR_GOAL else 'NOT met'})"
    )
    quiet_rate, quiet_cpu = total("quiet", "api")
    print(
        f"quiet stream (calls that trigger nothing): api {quiet_rate:.1f} calls/s, {quiet_cpu:.2f} CPU ms per call "
        f"(goal < {QUIET_CPU_GOAL_MS:.0f} ms: {'met' if quiet_cpu < QUIET_CPU_GOAL_MS else 'NOT met'})"
    )
    merge_rate, merge_cpu = total("merge", "api")
    print(f"merge stream: api {merge_rate:.1f} calls/s, {merge_cpu:.2f} CPU ms per call")
    failed = sum(r.failed for r in runs)
    if failed:
        print(f"WARNING: {failed} calls failed (not 200)")
        for run in runs:
            for reason in run.reasons:
                print(f"  {run.stream} to {run.target}: {reason}")
