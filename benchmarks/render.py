"""Email renders per second: MJML compiled once per template against compiled for every recipient.

    .venv/bin/python benchmarks/render.py [--seconds 3] [--recipients 240]

Every row renders the project's own email templates (templates/email, every template in English
and Chinese) for the same varied recipients (names Latin, Chinese or missing; locales en, zh-CN
or none; events with and without optional properties), one template per recipient in turn, and
produces the same parts of a message: subject, preheader, HTML with the hidden preheader, and the
plain-text alternative. The rows:

- nurture, MJML cached: ``TemplateStore.render``, as the engine sends. MJML is compiled by mrml
  once per template file, with the Jinja code protected by placeholders; each recipient costs
  Jinja renders and nothing else.
- nurture, MJML per recipient: the same ``TemplateStore.render`` with the store's compiled-MJML
  and compiled-template caches emptied before every render (the store has no switch for this),
  so each recipient pays the protected path again: placeholders, mrml, the text alternative
  derived from the HTML, and the Jinja templates built from the compiled HTML, then the render.
  The file's content and its check results stay cached, as a real per-recipient compiler would
  not re-validate an unchanged file either.
- Jinja, then mrml: the usual way without a cache: the template's Jinja (built once) renders the
  MJML source for the recipient, and mrml compiles the result.
- Jinja, then mjml (pure Python): the same with the ``mjml`` package's ``mjml_to_html``. That
  package inlines ``<mj-style inline="inline">`` only with the optional ``css_inline`` module,
  which is not installed, so this row drops the attribute and leaves those styles in a
  ``<style>`` block: it does a little less work than the mrml rows.

Then both compilers alone on identical input (recipient-rendered MJML), and the ratios. Before
timing, every row's output is checked against the cached row's for every template and locale:
the same subject and preheader, the same words in the HTML's text and the same links.

docs/performance.md records results and explains them.
"""

from __future__ import annotations

import argparse
import html
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jinja2  # noqa: E402
import mrml  # noqa: E402
import yaml  # noqa: E402
from mjml import mjml_to_html  # noqa: E402

# The sandboxed environments and the front-matter split the store itself uses, so the rows that
# compile per recipient run exactly the Jinja a real render runs.
from nurture.language.templates import (  # noqa: E402
    _HTML_ENV,
    _TEXT_ENV,
    TemplateStore,
    _split_front_matter,
    html_to_text,
)

_BODY_TAG = re.compile(r"<body\b[^>]*>", re.I)
_PREHEADER = (
    '<div style="display:none;font-size:1px;color:#ffffff;line-height:1px;max-height:0px;'
    'max-width:0px;opacity:0;overflow:hidden;">{}</div>'
)
_LINKS = re.compile(r'(?:href|src)="([^"]*)"')

FIRST_NAMES = ["Anna", "李雷", "Mateo", "韩梅梅", None, "Zoë", "Priya", "王芳", "O'Brien", ""]
LOCALES = ["en", "zh-CN", None, "zh-CN", "en-GB", "zh"]
TOPICS = ["data analysis", "Python 入门", None, "UX design", "机器学习"]


@dataclass(frozen=True)
class Message:
    subject: str
    preheader: str | None
    html: str
    text: str


@dataclass(frozen=True)
class Job:
    """One recipient and the template they get."""

    template: str
    locale: str | None
    context: dict[str, Any]


def recipients(count: int, templates: list[str]) -> list[Job]:
    """Varied recipients, each sent the next template in turn."""
    jobs = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        items = 1 + i % 4
        properties: dict[str, Any] = {
            "cart_id": f"c_{1000 + i}",
            "top_item": topic,
            "item_count": items,
            "cart_total": None if i % 3 == 0 else 99 * items,
            "currency": "CNY" if i % 2 else "USD",
            "interest": topic,
            "course_name": topic,
            "chat_id": f"t_{i}",
            "agent_name": None if i % 4 == 0 else "Bo",
            "agent_phone": None if i % 2 else "+86 21 5555 0100",
            "topic": topic,
            "order_id": f"o_{i}",
            "carrier": "SF Express" if i % 2 else None,
            "tracking_number": f"SF{i:010d}" if i % 3 else None,
        }
        user = {"id": f"u_{i}", "first_name": FIRST_NAMES[i % len(FIRST_NAMES)], "email": f"u{i}@example.com"}
        context = {
            "user": user,
            "event": {"name": "Cart Updated", "properties": properties, "timestamp": "2024-06-01T08:00:00Z"},
            "last_event": {},
            "journey": {"id": "bench", "key": user["id"], "entered_at": "2024-06-01T08:00:00Z"},
        }
        jobs.append(Job(templates[i % len(templates)], LOCALES[i % len(LOCALES)], context))
    return jobs


@dataclass(frozen=True)
class Source:
    """One template file with its Jinja built once, for the rows that compile per recipient."""

    subject: jinja2.Template
    preheader: jinja2.Template | None
    body: jinja2.Template
    python_body: jinja2.Template
    """The body without ``inline="inline"`` on mj-style, for the mjml package."""


def load_sources(store: TemplateStore, jobs: list[Job]) -> dict[tuple[str, str | None], Source]:
    """The file each job's template and locale resolve to, the way the store resolves it."""
    sources = {}
    for job in jobs:
        key = (job.template, job.locale)
        if key in sources:
            continue
        used = store.prepare("email", job.template, locale=job.locale)
        parts = _split_front_matter(store.path("email", job.template, used).read_text(encoding="utf-8"))
        assert not isinstance(parts, str), parts
        front = yaml.safe_load(parts.front)
        sources[key] = Source(
            subject=_TEXT_ENV.from_string(front["subject"]),
            preheader=_TEXT_ENV.from_string(front["preheader"]) if front.get("preheader") else None,
            body=_HTML_ENV.from_string(parts.body),
            python_body=_HTML_ENV.from_string(re.sub(r'\s+inline="inline"', "", parts.body)),
        )
    return sources


def finish(source: Source, context: dict[str, Any], compiled: str) -> Message:
    """Subject, preheader and text around compiled HTML, as ``TemplateStore.render`` builds them."""
    subject = " ".join(source.subject.render(context).split())
    preheader = " ".join(source.preheader.render(context).split()) if source.preheader else None
    text = html_to_text(compiled)
    if preheader:
        match = _BODY_TAG.search(compiled)
        at = match.end() if match else 0
        compiled = compiled[:at] + _PREHEADER.format(html.escape(preheader)) + compiled[at:]
    return Message(subject, preheader, compiled, text)


Row = Callable[[Job], Message]


def rows(store: TemplateStore, sources: dict[tuple[str, str | None], Source]) -> list[tuple[str, Row]]:
    def cached(job: Job) -> Message:
        m = store.render("email", job.template, job.context, locale=job.locale)
        return Message(m.subject or "", m.preheader, m.html or "", m.text or "")

    def uncached(job: Job) -> Message:
        store._mjml.clear()
        store._compiled.clear()
        return cached(job)

    def jinja_then_mrml(job: Job) -> Message:
        source = sources[(job.template, job.locale)]
        return finish(source, job.context, mrml.to_html(source.body.render(job.context)).content)

    def jinja_then_mjml(job: Job) -> Message:
        source = sources[(job.template, job.locale)]
        return finish(source, job.context, mjml_to_html(source.python_body.render(job.context)).html)

    return [
        ("nurture, MJML cached", cached),
        ("nurture, MJML per recipient", uncached),
        ("Jinja, then mrml", jinja_then_mrml),
        ("Jinja, then mjml (pure Python)", jinja_then_mjml),
    ]


def check_comparable(store: TemplateStore, named: list[tuple[str, Row]], jobs: list[Job]) -> int:
    """Every row says what the cached row says, for every template file; returns files checked."""
    seen: set[str] = set()
    for job in jobs:
        used = store.prepare("email", job.template, locale=job.locale)
        label = str(store.path("email", job.template, used))
        if label in seen:
            continue
        seen.add(label)
        want = named[0][1](job)
        for name, row in named[1:]:
            got = row(job)
            problems = []
            if (got.subject, got.preheader) != (want.subject, want.preheader):
                problems.append(f"subject/preheader {got.subject!r}/{got.preheader!r}")
            if html_to_text(got.html).split() != html_to_text(want.html).split():
                problems.append("the HTML's text differs")
            if sorted(set(_LINKS.findall(got.html))) != sorted(set(_LINKS.findall(want.html))):
                problems.append("the links differ")
            if problems:
                raise SystemExit(f"{name} is not comparable on {label}: {'; '.join(problems)}")
    return len(seen)


def measure(row: Row, jobs: list[Job], seconds: float) -> tuple[int, float, float]:
    """Renders done in about ``seconds`` of CPU time, with the wall and CPU time they took."""
    done = 0
    start, cpu = time.perf_counter(), time.process_time()
    while True:
        for job in jobs:
            row(job)
            done += 1
            used = time.process_time() - cpu
            if used >= seconds:
                return done, time.perf_counter() - start, used


def measure_compilers(
    jobs: list[Job], sources: dict[tuple[str, str | None], Source], seconds: float
) -> list[tuple[str, float]]:
    """Compiles per second of each compiler alone, on the same recipient-rendered MJML."""
    documents = []
    for job in jobs:
        source = sources[(job.template, job.locale)]
        documents.append((source.body.render(job.context), source.python_body.render(job.context)))
    compilers: list[tuple[str, Callable[[str, str], object]]] = [
        ("mrml.to_html", lambda mjml, _: mrml.to_html(mjml)),
        ("mjml.mjml_to_html (pure Python)", lambda _, python: mjml_to_html(python)),
    ]
    out = []
    for name, compile_ in compilers:
        done, cpu = 0, time.process_time()
        while time.process_time() - cpu < seconds:
            mjml, python = documents[done % len(documents)]
            compile_(mjml, python)
            done += 1
        out.append((name, done / (time.process_time() - cpu)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="CPU seconds to run each row")
    parser.add_argument("--recipients", type=int, default=240, help="distinct recipients, cycled")
    args = parser.parse_args()

    store = TemplateStore(ROOT / "templates")
    names = store.names("email")
    jobs = recipients(args.recipients, names)
    sources = load_sources(store, jobs)
    named = rows(store, sources)
    files = check_comparable(store, named, jobs)
    print(
        f"{len(names)} email templates, {files} files (every locale variant), {len(jobs)} recipients; "
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "checked first: every row gives the cached row's subject, preheader, HTML text and links, for every file"
    )
    print()

    rates: dict[str, float] = {}
    print(f"{'row':<34}{'renders':>9}{'wall s':>8}{'cpu s':>7}{'renders/s':>11}{'µs/render':>11}")
    for name, row in named:
        for job in jobs[: len(names) * 2]:  # warm up: caches, imports, Jinja's own lexer caches
            row(job)
        done, elapsed, cpu = measure(row, jobs, args.seconds)
        rates[name] = done / cpu
        print(f"{name:<34}{done:>9}{elapsed:>8.2f}{cpu:>7.2f}{rates[name]:>11.1f}{1e6 / rates[name]:>11.0f}")
    print("(renders/s and µs/render per CPU second of this process: other work on the machine slows the")
    print(" wall clock, not the CPU time a render takes; wall s is shown to tell how busy the machine was)")

    print()
    compilers = measure_compilers(jobs, sources, args.seconds)
    print(f"{'compiler alone, same MJML':<34}{'compiles/s':>11}{'µs/compile':>11}")
    for name, rate in compilers:
        print(f"{name:<34}{rate:>11.1f}{1e6 / rate:>11.0f}")

    cached, uncached, mrml_row, python_row = (rates[name] for name, _ in named)
    print()
    for label, ratio in (
        ("cache vs recompile (nurture cached / nurture per recipient)", cached / uncached),
        ("cache vs Jinja-then-mrml", cached / mrml_row),
        ("cache vs pure Python (nurture cached / Jinja-then-mjml)", cached / python_row),
        ("mrml vs pure Python, whole render (Jinja-then-mrml / Jinja-then-mjml)", mrml_row / python_row),
        ("mrml vs pure Python, compiler alone", compilers[0][1] / compilers[1][1]),
    ):
        print(f"{label:<72}{ratio:>8.1f}x")


if __name__ == "__main__":
    main()
