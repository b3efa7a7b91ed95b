"""SMS encoding and segment counts, and the compile-time warning for templates that are too long."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nurture.language.compiler import CompileResult, compile_project
from nurture.language.sms import GSM7_BASIC, SmsInfo, is_gsm7, minimum_info, minimum_text, non_gsm7, sms_info
from nurture.language.templates import _TEXT_ENV

# --- encoding and segments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", SmsInfo("GSM-7", 0, 1, 160)),
        ("a" * 160, SmsInfo("GSM-7", 160, 1, 160)),
        ("a" * 161, SmsInfo("GSM-7", 161, 2, 153)),
        ("a" * 306, SmsInfo("GSM-7", 306, 2, 153)),
        ("a" * 307, SmsInfo("GSM-7", 307, 3, 153)),
        ("中" * 70, SmsInfo("UCS-2", 70, 1, 70)),
        ("中" * 71, SmsInfo("UCS-2", 71, 2, 67)),
        ("中" * 134, SmsInfo("UCS-2", 134, 2, 67)),
        ("中" * 135, SmsInfo("UCS-2", 135, 3, 67)),
    ],
)
def test_segment_boundaries(text: str, expected: SmsInfo) -> None:
    assert sms_info(text) == expected


@pytest.mark.parametrize("char", list("^{}\\[~]|€\f"))
def test_extension_characters_take_two_septets(char: str) -> None:
    assert sms_info(char) == SmsInfo("GSM-7", 2, 1, 160)
    assert sms_info(char * 80) == SmsInfo("GSM-7", 160, 1, 160)
    assert sms_info(char * 81) == SmsInfo("GSM-7", 162, 2, 153)
    assert sms_info("a" * 159 + char).segments == 2


def test_an_escape_pair_is_never_split_between_segments() -> None:
    # 306 septets would fit two segments, but the '€' cannot straddle the first boundary.
    info = sms_info("a" * 152 + "€" + "a" * 152)
    assert (info.encoding, info.characters, info.segments) == ("GSM-7", 306, 3)
    assert sms_info("a" * 151 + "€" + "a" * 153).segments == 2


def test_emoji_counts_two_code_units_and_is_never_split() -> None:
    assert sms_info("😀" * 35) == SmsInfo("UCS-2", 70, 1, 70)
    assert sms_info("😀" * 36) == SmsInfo("UCS-2", 72, 2, 67)
    assert sms_info("Hi 👋").encoding == "UCS-2"
    assert sms_info("中" * 66 + "😀" + "中" * 66).segments == 3
    assert sms_info("中" * 65 + "😀" + "中" * 67).segments == 2


def test_one_character_outside_the_alphabet_makes_the_whole_text_ucs2() -> None:
    latin = "Your order has shipped, track it at https://example.com/t/123"
    assert sms_info(latin).encoding == "GSM-7"
    curly = latin.replace("at", "at’", 1)
    assert sms_info(curly) == SmsInfo("UCS-2", len(curly), 1, 70)
    assert non_gsm7(curly + "—’") == ["’", "—"]
    assert sms_info("a" * 100 + "ç").segments == 2  # lower-case ç is not in GSM-7; Ç is
    assert sms_info("a" * 100 + "Ç").segments == 1


def test_chinese_text_is_ucs2() -> None:
    text = "【Nurture学院】你的课程已开通，点击开始学习"
    info = sms_info(text)
    assert info == SmsInfo("UCS-2", len(text), 1, 70)
    assert not is_gsm7(text)


def test_the_basic_alphabet() -> None:
    assert len(GSM7_BASIC) == 127  # 128 code points, one of which is the escape
    assert is_gsm7("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà\r\n")
    assert not is_gsm7("`")  # the backtick has no GSM-7 code


def test_describe() -> None:
    assert sms_info("a" * 187).describe() == "GSM-7, 2 segments (187/306 characters)"
    assert sms_info("a" * 42).describe() == "GSM-7, 1 segment (42/160 characters)"
    assert sms_info("中" * 71).describe() == "UCS-2, 2 segments (71/134 characters)"


# --- the shortest rendering of a template ------------------------------------------------------


def shortest(source: str) -> str:
    return minimum_text(_TEXT_ENV.parse(source))


def test_expressions_count_as_empty_and_the_text_is_stripped() -> None:
    assert shortest("{{ user.first_name }}, your code is {{ event.properties.code }}.\n") == ", your code is ."
    assert shortest("  {{ user.first_name }}\n") == ""


def test_branches_and_loops_take_their_shortest_outcome() -> None:
    assert shortest("A{% if x %}long branch{% elif y %}mid{% else %}shortest{% endif %}B") == "AmidB"
    assert shortest("A{% if x %}only when x{% endif %}B") == "AB"
    assert shortest("A{% for i in x %}item{% endfor %}B") == "AB"
    assert shortest("A{% for i in x %}it{% else %}no items{% endfor %}B") == "AitB"
    assert shortest("A{% set y = 'long text' %}{{ y }}{# comment #}B") == "AB"
    assert shortest("A{% filter truncate(3) %}a long text{% endfilter %}B") == "AB"


def test_a_gsm7_branch_is_preferred_when_it_keeps_the_text_gsm7() -> None:
    # The Chinese branch is shorter in characters, but it would make the whole text UCS-2.
    source = "a" * 150 + "{% if zh %}中文{% else %}in English{% endif %}"
    assert minimum_info(_TEXT_ENV.parse(source)) == SmsInfo("GSM-7", 160, 1, 160)
    # With UCS-2 forced by the literal text, the fewest characters win.
    source = "中" * 60 + "{% if zh %}中文{% else %}in English{% endif %}"
    assert minimum_info(_TEXT_ENV.parse(source)) == SmsInfo("UCS-2", 62, 1, 70)


# --- the compile-time warning ------------------------------------------------------------------

JOURNEY = """\
journey: promo
trigger: {event: Signed Up}
steps:
  - send: sms
    template: promo
    fallback: [email]
  - send: email
    template: promo
"""

EMAIL = """\
---
subject: Hello
---
<mjml><mj-body><mj-section><mj-column><mj-text>{{ "a" * 1000 }}</mj-text></mj-column></mj-section></mj-body></mjml>
"""


def make_project(root: Path, sms: dict[str, str], settings: str | None) -> CompileResult:
    (root / "journeys").mkdir()
    (root / "journeys" / "promo.yaml").write_text(JOURNEY, encoding="utf-8")
    for channel in ("sms", "email"):
        (root / "templates" / channel).mkdir(parents=True)
    (root / "templates" / "email" / "promo.mjml").write_text(EMAIL, encoding="utf-8")
    for filename, text in sms.items():
        (root / "templates" / "sms" / filename).write_text(text, encoding="utf-8")
    if settings is not None:
        (root / "nurture.yaml").write_text(textwrap.dedent(settings), encoding="utf-8")
    return compile_project(root / "journeys", root / "templates")


def test_each_locale_variant_over_the_limit_gets_a_warning(tmp_path: Path) -> None:
    result = make_project(
        tmp_path,
        {
            "promo.txt": "{{ user.first_name }}, " + "x" * 310 + " {{ event.properties.url }}",
            "promo.zh-CN.txt": "中" * 150,
            "promo.ja.txt": "短い",
        },
        "sms_max_segments: 2\n",
    )
    assert result.errors == []
    assert result.project is not None and result.project.settings.sms_max_segments == 2
    sms = tmp_path / "templates" / "sms"
    assert [d.headline() for d in result.diagnostics] == [
        f"{sms / 'promo.txt'}:1:1: warning: at least 3 SMS segments (GSM-7, 312 characters); "
        "the project allows 2 (sms_max_segments in nurture.yaml)",
        f"{sms / 'promo.zh-CN.txt'}:1:1: warning: at least 3 SMS segments (UCS-2, 150 characters); "
        "the project allows 2 (sms_max_segments in nurture.yaml)",
    ]
    assert all(d.severity == "warning" for d in result.diagnostics)
    assert result.project.warnings == result.diagnostics


def test_the_default_limit_is_three_segments(tmp_path: Path) -> None:
    result = make_project(tmp_path, {"promo.txt": "中" * 201, "promo.fr.txt": "中" * 202}, None)
    assert result.project is not None and result.project.settings.sms_max_segments == 3
    assert [Path(d.path).name for d in result.diagnostics] == ["promo.fr.txt"]
    assert "at least 4 SMS segments (UCS-2, 202 characters); the project allows 3" in result.diagnostics[0].message


def test_expressions_never_trigger_the_warning(tmp_path: Path) -> None:
    source = "Hi {{ user.first_name }}! {% if event.properties.vip %}" + "x" * 400 + "{% endif %}"
    result = make_project(tmp_path, {"promo.txt": source}, "sms_max_segments: 1\n")
    assert result.diagnostics == []


def test_a_stray_character_that_forces_ucs2_is_named(tmp_path: Path) -> None:
    result = make_project(tmp_path, {"promo.txt": "Don’t miss out: " + "x" * 60}, "sms_max_segments: 1\n")
    (warning,) = result.diagnostics
    assert warning.message == (
        "at least 2 SMS segments (UCS-2, 76 characters); the project allows 1 "
        "(sms_max_segments in nurture.yaml); only '’' keeps it from GSM-7"
    )


def test_a_template_with_errors_gets_no_segment_warning(tmp_path: Path) -> None:
    result = make_project(tmp_path, {"promo.txt": "{{ user.first_name " + "x" * 400}, "sms_max_segments: 1\n")
    assert [d.severity for d in result.diagnostics] == ["error"]
    assert result.project is None


@pytest.mark.parametrize(("value", "message"), [("0", "must be at least 1, got 0"), ("two", "expected a whole number")])
def test_the_limit_must_be_a_positive_whole_number(tmp_path: Path, value: str, message: str) -> None:
    result = make_project(tmp_path, {"promo.txt": "Hi"}, f"sms_max_segments: {value}\n")
    assert len(result.errors) == 1
    assert result.errors[0].path == str(tmp_path / "nurture.yaml")
    assert message in result.errors[0].message
