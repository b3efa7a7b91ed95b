"""Journey mistakes a marketer makes, and where and how the compiler reports each one.

Every case is a small journey file (``journeys/welcome.yaml``) with one mistake, the 1-based line
(and column, where it matters) the compiler must point at, and words its message must contain.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from nurture.language import ir
from nurture.language.compiler import Settings, compile_text
from nurture.language.diagnostics import Diagnostic, DiagnosticSink
from nurture.language.templates import TemplateStore

JOURNEY_PATH = "journeys/welcome.yaml"

WELCOME_MJML = """\
---
subject: "Welcome, {{ user.first_name | default('friend') }}"
---
<mjml>
  <mj-body>
    <mj-section>
      <mj-column>
        <mj-text>Glad you are here.</mj-text>
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>
"""

NO_SUBJECT_MJML = """\
---
preheader: "A gift inside"
---
<mjml>
  <mj-body>
    <mj-section>
      <mj-column>
        <mj-text>Hello</mj-text>
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>
"""

TYPO_TAG_MJML = """\
---
subject: "Your cart"
---
<mjml>
  <mj-body>
    <mj-section>
      <mj-column>
        <mj-buton href="https://example.com/cart">Back to my cart</mj-buton>
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>
"""


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> TemplateStore:
    """email welcome / no_subject / typo_tag, sms coupon, wechat coupon."""
    root = tmp_path_factory.mktemp("templates")
    for channel in ("email", "sms", "wechat"):
        (root / channel).mkdir()
    (root / "email" / "welcome.mjml").write_text(WELCOME_MJML, encoding="utf-8")
    (root / "email" / "no_subject.mjml").write_text(NO_SUBJECT_MJML, encoding="utf-8")
    (root / "email" / "typo_tag.mjml").write_text(TYPO_TAG_MJML, encoding="utf-8")
    (root / "sms" / "coupon.txt").write_text("{{ user.first_name }}, 30% off: WELCOME30\n", encoding="utf-8")
    (root / "wechat" / "coupon.yaml").write_text(
        'template_id: tpl_coupon\ndata:\n  first: "{{ user.first_name }}, your gift is here"\n',
        encoding="utf-8",
    )
    return TemplateStore(root)


def compile_journey(text: str, templates: TemplateStore) -> tuple[ir.Journey | None, list[Diagnostic]]:
    sink = DiagnosticSink()
    journey = compile_text(textwrap.dedent(text), JOURNEY_PATH, templates, Settings(), sink)
    return journey, sink.items


BASE = """\
    journey: welcome
    trigger:
      event: Signed Up
    steps:
      - send: email
        template: welcome
      - wait: 1d
      - send: sms
        template: coupon
        fallback: [wechat]
"""


def test_base_journey_compiles(templates: TemplateStore) -> None:
    journey, diagnostics = compile_journey(BASE, templates)
    assert diagnostics == []
    assert journey is not None
    assert [step.kind for step in journey.steps] == ["send", "wait", "send"]


@dataclass(frozen=True)
class Case:
    id: str
    source: str
    line: int
    column: int | None
    message: str
    key: str | None = None
    file: str | None = None
    """Where the diagnostic must be, when it is not the journey file (a template)."""


CASES = [
    # --- YAML ----------------------------------------------------------------------------------
    Case(
        "yaml-bad-indentation",
        """\
        journey: welcome
        trigger:
          event: Signed Up
         steps:
          - wait: 1d
        """,
        4,
        2,
        "indentation does not match",
    ),
    Case(
        "yaml-tab-indentation",
        """\
        journey: welcome
        trigger:
        \tevent: Signed Up
        steps:
          - wait: 1d
        """,
        3,
        1,
        "indent with spaces, not tabs",
    ),
    Case(
        "yaml-duplicate-key",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait: 1d
        steps:
          - wait: 2d
        """,
        6,
        1,
        "duplicate key 'steps'",
    ),
    Case(
        "file-is-a-list-not-a-mapping",
        """\
        - wait: 1d
        - wait: 2d
        """,
        1,
        1,
        "a journey file is a mapping",
    ),
    # --- top level -----------------------------------------------------------------------------
    Case(
        "unknown-top-level-key-did-you-mean",
        """\
        journey: welcome
        trigers:
          event: Signed Up
        steps:
          - wait: 1d
        """,
        2,
        1,
        "unknown key 'trigers' (did you mean 'trigger'?)",
    ),
    Case(
        "holdout-is-project-wide",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        holdout: {percent: 5, salt: "2026-q1"}
        steps:
          - wait: 1d
        """,
        4,
        1,
        "'holdout' is project-wide: set it in nurture.yaml, not in a journey",
        key="holdout",
    ),
    Case(
        "topics-are-project-wide",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait: 1d
        topics: [promotions]
        """,
        6,
        1,
        "'topics' is project-wide: set it in nurture.yaml, not in a journey",
    ),
    Case(
        "missing-trigger",
        """\
        journey: welcome
        steps:
          - wait: 1d
        """,
        1,
        1,
        "'trigger' is required",
    ),
    Case(
        "trigger-is-text-not-a-mapping",
        """\
        journey: welcome
        trigger: Signed Up
        steps:
          - wait: 1d
        """,
        2,
        10,
        "expected a mapping",
        key="trigger",
    ),
    Case(
        "missing-steps",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        """,
        1,
        1,
        "'steps' is required",
    ),
    Case(
        "empty-steps",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps: []
        """,
        4,
        8,
        "must not be empty",
        key="steps",
    ),
    Case(
        "bad-journey-id",
        """\
        journey: Welcome-Series
        trigger:
          event: Signed Up
        steps:
          - wait: 1d
        """,
        1,
        10,
        "'Welcome-Series' is not a valid id",
    ),
    Case(
        "journey-id-differs-from-file-name",
        """\
        journey: welcome_series
        trigger:
          event: Signed Up
        steps:
          - wait: 1d
        """,
        1,
        10,
        "must equal the file name 'welcome'",
    ),
    Case(
        "bad-re-entry-did-you-mean",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        re_entry: restrat
        steps:
          - wait: 1d
        """,
        4,
        11,
        "(did you mean 'restart'?)",
    ),
    Case(
        "bad-time-zone-did-you-mean",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        timezone: Asia/Shanghia
        steps:
          - wait: 1d
        """,
        4,
        11,
        "unknown time zone 'Asia/Shanghia' (did you mean 'Asia/Shanghai'?)",
    ),
    Case(
        "channel-quiet-hours-start-equals-end",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        quiet_hours:
          start: "21:00"
          end: "08:00"
          sms: {start: "9:00", end: "09:00"}
        steps:
          - wait: 1d
        """,
        7,
        8,
        "start and end are equal",
        key="quiet_hours.sms",
    ),
    Case(
        "bad-quiet-hours-time",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        quiet_hours: {start: "21:00", end: "8am"}
        steps:
          - wait: 1d
        """,
        4,
        36,
        "'8am' is not a time of day",
        key="quiet_hours.end",
    ),
    Case(
        "quiet-hours-start-equals-end",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        quiet_hours: {start: "21:00", end: "21:00"}
        steps:
          - wait: 1d
        """,
        4,
        14,
        "start and end are equal",
    ),
    Case(
        "goal-within-bad-duration",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        goal:
          event: Order Completed
          within: 7days
        steps:
          - wait: 1d
        """,
        6,
        11,
        "'7days' is not a duration",
        key="goal.within",
    ),
    Case(
        "exit-on-item-without-event",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        exit_on:
          - if: "user.unsubscribed"
        steps:
          - wait: 1d
        """,
        5,
        5,
        "'event' is required",
        key="exit_on[0]",
    ),
    # --- durations and times ---------------------------------------------------------------------
    Case(
        "wait-unknown-unit",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait: 1x
        """,
        5,
        11,
        "'1x' is not a duration",
        key="steps[0].wait",
    ),
    Case(
        "wait-zero",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait: 0s
        """,
        5,
        11,
        "at least 1s",
    ),
    Case(
        "wait-given-a-number",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait: 5
        """,
        5,
        11,
        "expected text, got 5 (a number); quote it",
    ),
    Case(
        "wait-until-hour-25",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait_until: "25:00"
        """,
        5,
        17,
        "'25:00' is not a time of day",
    ),
    Case(
        "wait-until-bad-weekday-did-you-mean",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait_until: "10:00"
            days: [mnday, tue]
        """,
        6,
        12,
        "(did you mean 'mon'?)",
        key="steps[0].days[0]",
    ),
    # --- step shape -----------------------------------------------------------------------------
    Case(
        "wait-for-without-timeout",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait_for: Order Completed
        """,
        5,
        5,
        "'timeout' is required",
        key="steps[0]",
    ),
    Case(
        "step-unknown-key-did-you-mean",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait_for: Order Completed
            timout: 1d
        """,
        6,
        5,
        "unknown key 'timout' (did you mean 'timeout'?)",
    ),
    Case(
        "send-unknown-key-did-you-mean",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: email
            template: welcome
            catgory: transactional
        """,
        7,
        5,
        "unknown key 'catgory' (did you mean 'category'?)",
    ),
    Case(
        "step-with-two-kind-keys",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait: 1d
            exit: done
        """,
        5,
        5,
        "exactly one kind key, found wait and exit",
    ),
    Case(
        "unknown-step-kind-did-you-mean",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wiat: 1d
        """,
        5,
        5,
        "unknown step kind 'wiat' (did you mean 'wait'?)",
    ),
    Case(
        "step-is-not-a-mapping",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait 1d
        """,
        5,
        5,
        "a step is a mapping like '- wait: 1h'",
    ),
    # --- sends ----------------------------------------------------------------------------------
    Case(
        "unknown-channel-did-you-mean",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: emial
            template: welcome
        """,
        5,
        11,
        "unknown channel 'emial' (did you mean 'email'?)",
    ),
    Case(
        "unknown-fallback-channel",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: sms
            template: coupon
            fallback: [fax]
        """,
        7,
        16,
        "unknown channel 'fax'",
        key="steps[0].fallback[0]",
    ),
    Case(
        "missing-template-did-you-mean",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: email
            template: welcom
        """,
        6,
        15,
        "no email template 'welcom' (did you mean 'welcome'?)",
    ),
    Case(
        "missing-template-for-fallback-channel",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: email
            template: welcome
            fallback: [sms]
        """,
        7,
        16,
        "needed for the sms fallback",
    ),
    Case(
        "template-written-as-a-file-path",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: email
            template: email/welcome.mjml
        """,
        6,
        15,
        "'email/welcome.mjml' is not a template name: write 'template: welcome'",
        key="steps[0].template",
    ),
    Case(
        "template-written-as-a-locale-file",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: sms
            template: templates/sms/coupon.zh-CN.txt
            fallback: [wechat]
        """,
        6,
        15,
        "is not a template name: write 'template: coupon'",
    ),
    Case(
        "fallback-repeats-a-channel",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: sms
            template: coupon
            fallback: [wechat, sms]
        """,
        7,
        24,
        "channel 'sms' is listed twice",
    ),
    Case(
        "bad-category-did-you-mean",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: sms
            template: coupon
            category: marketting
        """,
        7,
        15,
        "(did you mean 'marketing'?)",
    ),
    # --- expressions ----------------------------------------------------------------------------
    Case(
        "expression-syntax-error",
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: "event.properties.total >"
        steps:
          - wait: 1d
        """,
        4,
        None,
        "expression syntax error",
        key="trigger.if",
    ),
    Case(
        "expression-unknown-name-did-you-mean",
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: "usr.vip"
        steps:
          - wait: 1d
        """,
        4,
        None,
        "unknown name 'usr' (did you mean 'user'?)",
    ),
    Case(
        "expression-function-call",
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: "user.vip and range(10)"
        steps:
          - wait: 1d
        """,
        4,
        None,
        "function calls are not allowed",
    ),
    Case(
        "expression-private-attribute",
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: "user.__class__"
        steps:
          - wait: 1d
        """,
        4,
        None,
        "'__class__' cannot be read",
    ),
    Case(
        "expression-unknown-filter",
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: "user.name | shout"
        steps:
          - wait: 1d
        """,
        4,
        None,
        "unknown filter 'shout'",
    ),
    Case(
        "condition-wrapped-in-braces",
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: "{{ user.vip }}"
        steps:
          - wait: 1d
        """,
        4,
        None,
        "write the condition without {{ }}",
    ),
    Case(
        "key-expression-syntax-error",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        key: "event.properties.cart_id +"
        steps:
          - wait: 1d
        """,
        4,
        None,
        "expression syntax error",
        key="key",
    ),
    Case(
        "expression-and-written-as-ampersands",
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: "user.age >= 18 && user.vip"
        steps:
          - wait: 1d
        """,
        4,
        23,
        "'&&' is not an operator in expressions: use 'and'",
        key="trigger.if",
    ),
    Case(
        "expression-or-written-as-bars-unquoted",
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: user.vip || user.age > 60
        steps:
          - wait: 1d
        """,
        4,
        16,
        "'||' is not an operator in expressions: use 'or'",
    ),
    Case(
        "expression-not-written-as-bang",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - branch:
              - if: "!user.vip"
                then: [{wait: 1d}]
        """,
        6,
        14,
        "'!' is not an operator in expressions: use 'not' ('!=' is fine)",
    ),
    Case(
        "expression-triple-equals",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        goal:
          event: Order Completed
          if: 'event.properties.total === 0'
        steps:
          - wait: 1d
        """,
        6,
        31,
        "'===' is not an operator in expressions: use '=='",
    ),
    Case(
        "expression-null-instead-of-none",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        exit_on:
          - {event: Cart Emptied, if: "user.cart_id == null"}
        steps:
          - wait: 1d
        """,
        5,
        48,
        "'null' is not a value in expressions: use 'none'",
    ),
    Case(
        "expression-unexpected-character-column",
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: "user.plan == $pro"
        steps:
          - wait: 1d
        """,
        4,
        21,
        "expression syntax error: unexpected char '$'",
    ),
    Case(
        "update-value-with-ampersands",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - update:
              adult: "{{ user.age >= 18 && user.verified }}"
        """,
        6,
        33,
        "'&&' is not an operator in expressions: use 'and'",
    ),
    Case(
        "expression-unknown-name-column",
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: "user.vip and usr.age > 18"
        steps:
          - wait: 1d
        """,
        4,
        21,
        "unknown name 'usr' (did you mean 'user'?)",
    ),
    # --- step ids and flow ----------------------------------------------------------------------
    Case(
        "duplicate-step-id",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - id: hello
            wait: 1d
          - id: hello
            wait: 2d
        """,
        7,
        9,
        "duplicate step id 'hello' (first used on line 5)",
    ),
    Case(
        "step-after-exit",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - exit: done
          - wait: 1d
        """,
        6,
        5,
        "this step can never run",
        key="steps[1]",
    ),
    Case(
        "else-arm-not-last",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - branch:
              - else:
                  - wait: 1d
              - if: "user.vip"
                then:
                  - wait: 2d
        """,
        6,
        9,
        "the else arm must be the last arm",
    ),
    Case(
        "split-weights-add-up-to-zero",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - split: subject_test
            variants:
              a: {weight: 0}
              b: {weight: 0}
        """,
        7,
        7,
        "variant weights add up to 0",
    ),
    Case(
        "split-negative-weight",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - split: subject_test
            variants:
              a: {weight: 50}
              b: {weight: -5}
        """,
        8,
        19,
        "must be at least 0, got -5",
        key="steps[0].variants.b.weight",
    ),
    # --- update ---------------------------------------------------------------------------------
    Case(
        "update-id",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - update: {id: "u2"}
        """,
        5,
        14,
        "'id' is the user's identity and cannot be updated",
    ),
    Case(
        "update-with-block-tag",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - update:
              vip: "{% if user.spent %}yes{% endif %}"
        """,
        6,
        12,
        "not {% %} blocks",
    ),
    # --- nested steps ---------------------------------------------------------------------------
    Case(
        "nested-then-unknown-channel",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait: 1h
          - wait_for: Order Completed
            timeout: 1d
            then:
              - send: emial
                template: welcome
        """,
        9,
        15,
        "unknown channel 'emial'",
        key="steps[1].then[0].send",
    ),
    Case(
        "nested-else-unknown-step-kind",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait: 1h
          - wait_for: Order Completed
            timeout: 1d
            else:
              - wiat: 2d
        """,
        9,
        9,
        "unknown step kind 'wiat'",
        key="steps[1].else[0]",
    ),
    Case(
        "nested-branch-arm-bad-duration",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - branch:
              - if: "user.vip"
                then:
                  - wait: 1x
              - else:
                  - wait: 1d
        """,
        8,
        19,
        "'1x' is not a duration",
        key="steps[0].branch[0].then[0].wait",
    ),
    Case(
        "nested-branch-else-missing-template",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - branch:
              - if: "user.vip"
                then:
                  - wait: 1d
              - else:
                  - send: sms
                    template: cupon
        """,
        11,
        23,
        "no sms template 'cupon' (did you mean 'coupon'?)",
        key="steps[0].branch[1].else[0].template",
    ),
    Case(
        "nested-split-variant-bad-duration",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - split: subject_test
            variants:
              a:
                weight: 50
                steps:
                  - wait: forever
              b:
                weight: 50
        """,
        10,
        19,
        "'forever' is not a duration",
        key="steps[0].variants.a.steps[0].wait",
    ),
    Case(
        "nested-step-after-exit-in-arm",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - branch:
              - if: "user.vip"
                then:
                  - exit: vip
                  - wait: 1d
        """,
        9,
        13,
        "this step can never run",
        key="steps[0].branch[0].then[1]",
    ),
    # --- templates, reported in the template file -----------------------------------------------
    Case(
        "email-front-matter-without-subject",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: email
            template: no_subject
        """,
        1,
        None,
        "front matter needs a subject",
        file="email/no_subject.mjml",
    ),
    Case(
        "email-unknown-mjml-tag",
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: email
            template: typo_tag
        """,
        8,
        9,
        "unknown MJML tag <mj-buton> (did you mean <mj-button>?)",
        file="email/typo_tag.mjml",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_mistake_is_reported_at_its_place(case: Case, templates: TemplateStore) -> None:
    journey, diagnostics = compile_journey(case.source, templates)
    headlines = "\n".join(d.headline() for d in diagnostics)

    assert journey is None
    matching = [d for d in diagnostics if case.message in d.message]
    assert matching, f"no diagnostic mentions {case.message!r}; got:\n{headlines}"
    found = matching[0]
    assert found.severity == "error"
    if case.file is None:
        assert found.path == JOURNEY_PATH
    else:
        assert Path(found.path).as_posix().endswith(case.file), headlines
    assert found.line == case.line, headlines
    if case.column is not None:
        assert found.column == case.column, headlines
    if case.key is not None:
        assert found.key == case.key, headlines


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 34


def test_template_name_that_looks_like_a_path_is_a_diagnostic_not_a_crash(
    templates: TemplateStore,
) -> None:
    journey, diagnostics = compile_journey(
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: email
            template: ../welcome
        """,
        templates,
    )
    assert journey is None
    assert (6, "steps[0].template") in [(d.line, d.key) for d in diagnostics]


def test_every_mistake_in_a_file_is_reported_in_one_run(templates: TemplateStore) -> None:
    journey, diagnostics = compile_journey(
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: "usr.vip"
        re_entry: sometimes
        steps:
          - wait: 1x
          - send: emial
            template: welcome
          - wait_for: Order Completed
          - id: done
            exit: done
          - wait: 1d
        """,
        templates,
    )
    assert journey is None
    assert [(d.line, d.key) for d in diagnostics] == [
        (4, "trigger.if"),
        (5, "re_entry"),
        (7, "steps[0].wait"),
        (8, "steps[1].send"),
        (10, "steps[2]"),
        (13, "steps[4]"),
    ]
    assert all(d.severity == "error" for d in diagnostics)


def test_errors_in_different_parts_of_a_file_and_its_templates_come_together(
    templates: TemplateStore,
) -> None:
    journey, diagnostics = compile_journey(
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - send: email
            template: typo_tag
          - wait: 0s
        """,
        templates,
    )
    assert journey is None
    assert sorted((Path(d.path).name, d.line) for d in diagnostics) == [
        ("typo_tag.mjml", 8),
        ("welcome.yaml", 7),
    ]


def test_headline_is_path_line_column_key_message(templates: TemplateStore) -> None:
    _, diagnostics = compile_journey(
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait: 1x
        """,
        templates,
    )
    (diagnostic,) = diagnostics
    assert diagnostic.headline() == (
        "journeys/welcome.yaml:5:11: steps[0].wait: '1x' is not a duration: "
        "use a number and a unit (s, m, h, d, w), combinable, e.g. 30m, 1d12h"
    )
    assert diagnostic.headline() == (
        f"{diagnostic.path}:{diagnostic.line}:{diagnostic.column}: {diagnostic.key}: {diagnostic.message}"
    )


def test_render_shows_numbered_snippet_with_caret_under_the_column(templates: TemplateStore) -> None:
    source = textwrap.dedent(
        """\
        journey: welcome
        trigger:
          event: Signed Up
        steps:
          - wait: 1x
        """
    )
    sink = DiagnosticSink()
    compile_text(source, JOURNEY_PATH, templates, Settings(), sink)
    (diagnostic,) = sink.items

    lines = diagnostic.render(source).splitlines()

    assert lines[0] == diagnostic.headline()
    assert lines[1] == "  4 | steps:"
    assert lines[2] == "  5 |   - wait: 1x"
    assert lines[3] == "    |           ^"
    assert lines[3].index("^") == lines[2].index("1x")
    assert len(lines) == 4
    assert diagnostic.render(None) == diagnostic.headline()
