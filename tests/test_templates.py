"""Template store: rendering, locale choice, sandboxing, caching and check diagnostics."""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import mrml
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nurture.language import ir, templates
from nurture.language.compiler import Project
from nurture.language.templates import RenderedMessage, TemplateError, TemplateStore

WELCOME = """\
---
subject: "Welcome, {{ user.first_name | default('there') }}"
preheader: Your first order ships free
---
<mjml>
  <mj-body>
    <mj-section>
      <mj-column>
        <mj-text>Hi {{ user.first_name }} &amp; friends</mj-text>
        <mj-button href="https://shop.example.com/?u={{ user.id }}">Shop now</mj-button>
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>
"""

ORDER = """\
template_id: TPL-ORDER-1
data:
  first: "Thanks, {{ user.first_name }}"
  keyword1: "{{ event.properties.order_id }}"
url: "https://shop.example.com/o/{{ event.properties.order_id }}"
miniprogram:
  appid: wx123
  pagepath: "pages/order?id={{ event.properties.order_id }}"
"""

CONTEXT: dict[str, Any] = {
    "user": {"id": "u1", "first_name": "Li", "email": "li@example.com"},
    "event": {"name": "Order Completed", "properties": {"order_id": "O-9"}},
    "last_event": None,
    "journey": {"id": "welcome", "key": None},
}


def mjml(body: str, subject: str = "Hi") -> str:
    """An email template whose body is ``body`` inside one column; the body starts on line 8."""
    return (
        f"---\nsubject: {subject}\n---\n<mjml>\n<mj-body>\n<mj-section>\n<mj-column>\n"
        f"{body}\n</mj-column>\n</mj-section>\n</mj-body>\n</mjml>\n"
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "templates"


@pytest.fixture
def store(root: Path) -> TemplateStore:
    return TemplateStore(root)


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def user(**traits: Any) -> dict[str, Any]:
    return {**CONTEXT, "user": {"id": "u1", **traits}}


# Rendering


def test_email_renders_subject_preheader_html_and_text(root: Path, store: TemplateStore) -> None:
    write(root, "email/welcome.mjml", WELCOME)

    message = store.render("email", "welcome", CONTEXT)

    assert message.channel == "email"
    assert message.template == "welcome"
    assert message.locale is None
    assert message.subject == "Welcome, Li"
    assert message.preheader == "Your first order ships free"
    assert message.html is not None
    assert "Hi Li &amp; friends" in message.html
    assert 'href="https://shop.example.com/?u=u1"' in message.html
    assert "{{" not in message.html
    assert message.text == "Hi Li & friends\n\nShop now (https://shop.example.com/?u=u1)"


def test_email_preheader_is_hidden_inbox_text(root: Path, store: TemplateStore) -> None:
    write(root, "email/welcome.mjml", WELCOME)

    message = store.render("email", "welcome", CONTEXT)

    assert message.html is not None
    body_start = message.html.index("<body")
    hidden = message.html.index("Your first order ships free")
    assert hidden > body_start
    assert "display:none" in message.html[body_start:hidden]
    assert "ships free" not in (message.text or "")


def test_sms_renders_text_without_trailing_newline(root: Path, store: TemplateStore) -> None:
    write(
        root, "sms/shipped.txt", "Hi {{ user.first_name }}, order {{ event.properties.order_id }} shipped.\n"
    )

    message = store.render("sms", "shipped", CONTEXT)

    assert message == RenderedMessage(
        channel="sms", template="shipped", locale=None, text="Hi Li, order O-9 shipped."
    )


def test_wechat_renders_data_url_and_miniprogram(root: Path, store: TemplateStore) -> None:
    write(root, "wechat/order.yaml", ORDER)

    message = store.render("wechat", "order", CONTEXT)

    assert message.template_id == "TPL-ORDER-1"
    assert message.data == {"first": "Thanks, Li", "keyword1": "O-9"}
    assert message.url == "https://shop.example.com/o/O-9"
    assert message.miniprogram == {"appid": "wx123", "pagepath": "pages/order?id=O-9"}


@pytest.mark.parametrize(
    ("locale", "used", "text"),
    [
        ("zh-CN", "zh-CN", "简体"),
        ("zh_cn", "zh-CN", "简体"),
        ("ZH-cn", "zh-CN", "简体"),
        ("zh-TW", "zh", "中文"),
        ("zh", "zh", "中文"),
        ("fr-FR", None, "base"),
        (None, None, "base"),
        ("", None, "base"),
    ],
)
def test_locale_picks_exact_then_language_then_base(
    root: Path, store: TemplateStore, locale: str | None, used: str | None, text: str
) -> None:
    write(root, "sms/hello.txt", "base")
    write(root, "sms/hello.zh.txt", "中文")
    write(root, "sms/hello.zh-CN.txt", "简体")

    message = store.render("sms", "hello", CONTEXT, locale=locale)

    assert (message.locale, message.text) == (used, text)


def test_email_locale_variant(root: Path, store: TemplateStore) -> None:
    write(root, "email/welcome.mjml", WELCOME)
    write(root, "email/welcome.zh-CN.mjml", mjml("<mj-text>你好</mj-text>", subject="欢迎"))

    message = store.render("email", "welcome", CONTEXT, locale="zh-CN")

    assert (message.locale, message.subject, message.text) == ("zh-CN", "欢迎", "你好")


def test_html_is_escaped_but_text_channels_are_not(root: Path, store: TemplateStore) -> None:
    write(root, "email/welcome.mjml", WELCOME)
    write(root, "sms/hi.txt", "Hi {{ user.first_name }}")
    context = user(first_name="<script>alert(1)</script>")

    email = store.render("email", "welcome", context)
    sms = store.render("sms", "hi", context)

    assert email.html is not None
    assert "<script>" not in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert email.subject == "Welcome, <script>alert(1)</script>"
    assert sms.text == "Hi <script>alert(1)</script>"


@pytest.mark.parametrize(
    ("source", "traits", "expected"),
    [
        ("Hi {{ user.first_name }}!", {}, "Hi !"),
        ("Hi {{ user.first_name | default('there') }}!", {}, "Hi there!"),
        ("Hi {{ user.first_name | default('there') }}!", {"first_name": None}, "Hi there!"),
        ("Hi {{ user.first_name }}!", {"first_name": None}, "Hi !"),
        ("{{ user.address.city.name }}|", {}, "|"),
        ("{% if user.vip %}VIP{% else %}hi{% endif %}", {}, "hi"),
        ("{{ last_event.properties.total }}|", {}, "|"),
    ],
)
def test_missing_traits_render_empty(
    root: Path, store: TemplateStore, source: str, traits: dict[str, Any], expected: str
) -> None:
    write(root, "sms/t.txt", source)

    assert store.render("sms", "t", user(**traits)).text == expected


def test_property_named_like_a_dict_method_is_the_property(root: Path, store: TemplateStore) -> None:
    write(root, "sms/t.txt", "{{ event.properties.items | length }} items")
    context = {**CONTEXT, "event": {"properties": {"items": ["a", "b", "c"]}}}

    assert store.render("sms", "t", context).text == "3 items"


@pytest.mark.parametrize(
    "source",
    [
        "{{ user.__class__.__mro__ }}",
        "{{ user.missing.__class__ }}",
        "{{ user.first_name.__class__.__base__.__subclasses__() }}",
        "{{ user.update({'vip': true}) }}",
    ],
)
def test_sandbox_violation_raises(root: Path, store: TemplateStore, source: str) -> None:
    write(root, "sms/evil.txt", source)
    context = user(first_name="Li")

    with pytest.raises(TemplateError, match=r"sms/evil\.txt: not allowed in a template"):
        store.render("sms", "evil", context)

    assert "vip" not in context["user"]


def test_runtime_error_names_the_template(root: Path, store: TemplateStore) -> None:
    write(root, "sms/t.txt", "{{ event.properties.total / 0 }}")
    context = {**CONTEXT, "event": {"properties": {"total": 5}}}

    with pytest.raises(TemplateError, match=r"sms/t\.txt: could not render: division by zero"):
        store.render("sms", "t", context)


def test_render_of_broken_template_lists_its_errors(root: Path, store: TemplateStore) -> None:
    write(root, "sms/t.txt", "Hi {{ usr.first_name }}")

    with pytest.raises(TemplateError, match=r"1 error\(s\):\n.*t\.txt:1:7: unknown name 'usr'"):
        store.render("sms", "t", CONTEXT)


def test_render_of_missing_template_raises(store: TemplateStore) -> None:
    with pytest.raises(TemplateError, match=r"sms/nope\.txt: template file not found"):
        store.render("sms", "nope", CONTEXT)


def test_unknown_channel_suggests_a_name(store: TemplateStore) -> None:
    with pytest.raises(ValueError, match=r"unknown channel 'emial' \(did you mean 'email'\?\)"):
        store.names("emial")


def test_html_to_text() -> None:
    markup = (
        "<html><head><title>T</title><style>p {color: red}</style></head><body>"
        "<p>A&nbsp;&amp;   B</p><a href='https://x.example.com'><img src='a.png' alt='Logo'></a>"
        "<a href='https://y.example.com'><img src='b.png' /></a><br/>"
        "see <a href='https://z.example.com'>https://z.example.com</a>"
        "<table><tr><td>one</td><td>two</td></tr></table></body></html>"
    )

    assert templates.html_to_text(markup) == (
        "A & B\nLogo (https://x.example.com) https://y.example.com\nsee https://z.example.com\n\none two"
    )


# Caching


def test_mjml_is_compiled_once_per_content(
    root: Path, store: TemplateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = mrml.to_html

    def counting(source: str) -> Any:
        calls.append(source)
        return real(source)

    monkeypatch.setattr(mrml, "to_html", counting)
    path = write(root, "email/welcome.mjml", WELCOME)

    assert store.check("email", "welcome") == []
    for first_name in ("Li", "Wang", "Zhang"):
        assert store.render("email", "welcome", user(first_name=first_name)).subject == (
            f"Welcome, {first_name}"
        )
    assert len(calls) == 1

    path.write_text(WELCOME.replace("Welcome", "Hello"), encoding="utf-8")
    assert store.render("email", "welcome", CONTEXT).subject == "Hello, Li"
    assert store.render("email", "welcome", CONTEXT).subject == "Hello, Li"
    assert len(calls) == 2


def test_check_result_follows_file_content(root: Path, store: TemplateStore) -> None:
    path = write(root, "sms/t.txt", "Hi {{ usr }}")
    assert [d.message for d in store.check("sms", "t")] == ["unknown name 'usr' (did you mean 'user'?)"]

    path.write_text("Hi {{ user.first_name }}", encoding="utf-8")

    assert store.check("sms", "t") == []


def test_names_exists_locales_and_version(root: Path, store: TemplateStore) -> None:
    write(root, "email/welcome.mjml", WELCOME)
    write(root, "email/welcome.zh-CN.mjml", WELCOME)
    write(root, "email/receipt.mjml", WELCOME)
    write(root, "email/notes.txt", "not a template")

    assert store.names("email") == ["receipt", "welcome"]
    assert store.names("sms") == []
    assert store.exists("email", "welcome")
    assert not store.exists("email", "welcome.zh-CN")
    write(root, "secrets.mjml", WELCOME)
    assert not store.exists("email", "../secrets")
    assert store.check("email", "../secrets")[0].message == (
        "invalid template name '../secrets': use letters, digits, '-' and '_' only"
    )
    with pytest.raises(TemplateError, match=r"invalid template name '\.\./secrets'"):
        store.render("email", "../secrets", CONTEXT)
    assert not store.exists("sms", "welcome")
    assert store.locales("email", "welcome") == ["zh-CN"]
    assert store.locales("email", "receipt") == []
    assert store.path("email", "welcome", "zh-CN") == root / "email" / "welcome.zh-CN.mjml"

    before = store.version("email", "welcome")
    assert before == store.version("email", "welcome")
    assert len(before) == 12
    write(root, "email/welcome.zh-CN.mjml", WELCOME + "\n")
    assert store.version("email", "welcome") != before
    assert store.version("email", "receipt") != store.version("email", "welcome")


# RenderedMessage


def test_rendered_message_round_trips_through_json(root: Path, store: TemplateStore) -> None:
    write(root, "email/welcome.mjml", WELCOME)
    write(root, "wechat/order.yaml", ORDER)

    for message in (
        store.render("email", "welcome", CONTEXT),
        store.render("wechat", "order", CONTEXT),
    ):
        data = json.loads(json.dumps(message.to_dict()))
        assert RenderedMessage.from_dict(data) == message


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown RenderedMessage fields: body"):
        RenderedMessage.from_dict({"channel": "sms", "template": "t", "locale": None, "body": "x"})


def test_searchable_text_and_preview(root: Path, store: TemplateStore) -> None:
    write(root, "email/welcome.mjml", WELCOME)
    write(root, "wechat/order.yaml", ORDER)
    email = store.render("email", "welcome", CONTEXT)
    wechat = store.render("wechat", "order", CONTEXT)
    sms = RenderedMessage(channel="sms", template="t", locale=None, text="a\nb " + "x" * 100)

    assert email.searchable_text() == (
        "Welcome, Li\nYour first order ships free\n"
        "Hi Li & friends\n\nShop now (https://shop.example.com/?u=u1)"
    )
    assert wechat.searchable_text() == "Thanks, Li\nO-9\nhttps://shop.example.com/o/O-9"
    assert email.preview() == "Subject: Welcome, Li"
    assert wechat.preview() == "first: Thanks, Li, keyword1: O-9"
    assert sms.preview(width=10) == "a b xxxxx…"
    assert len(sms.preview()) == 80


# check: every diagnostic kind, with its line, column and message

CHECK_CASES: list[tuple[str, str, str, list[tuple[int, int, str]]]] = [
    (
        "email: no front matter",
        "email/t.mjml",
        "<mjml></mjml>\n",
        [(1, 1, "email template needs YAML front matter with a subject: start the file with")],
    ),
    (
        "email: front matter not closed",
        "email/t.mjml",
        "---\nsubject: Hi\n<mjml></mjml>\n",
        [(1, 1, "front matter is not closed: add a '---' line")],
    ),
    (
        "email: subject missing",
        "email/t.mjml",
        "---\npreheader: Hello\n---\n<mjml><mj-body></mj-body></mjml>\n",
        [(1, 1, "front matter needs a subject: add 'subject: …' between the '---' lines")],
    ),
    (
        "email: empty front matter",
        "email/t.mjml",
        "---\n---\n<mjml><mj-body></mj-body></mjml>\n",
        [(1, 1, "front matter needs a subject")],
    ),
    (
        "email: front matter not a mapping",
        "email/t.mjml",
        "---\n- subject\n---\n<mjml><mj-body></mj-body></mjml>\n",
        [(2, 1, "front matter must be keys like 'subject: …'")],
    ),
    (
        "email: unknown front-matter key",
        "email/t.mjml",
        "---\nsubject: Hi\npreheadr: Hello\n---\n<mjml><mj-body></mj-body></mjml>\n",
        [(3, 1, "unknown key 'preheadr' (did you mean 'preheader'?)")],
    ),
    (
        "email: unquoted Jinja in front matter",
        "email/t.mjml",
        "---\nsubject: {{ user.first_name }}, hi\n---\n<mjml><mj-body></mj-body></mjml>\n",
        [
            (
                2,
                31,
                "front matter is not valid YAML: expected <block end>, but found ','; "
                "a value that starts with {{ or contains ': ' must be quoted",
            )
        ],
    ),
    (
        "email: subject not text",
        "email/t.mjml",
        "---\nsubject: 2026\n---\n<mjml><mj-body></mj-body></mjml>\n",
        [(2, 10, "must be text; quote it")],
    ),
    (
        "email: Jinja syntax error in subject",
        "email/t.mjml",
        '---\nsubject: "Hi {{ user.name }"\n---\n<mjml><mj-body></mj-body></mjml>\n',
        [(2, 14, "Jinja syntax error: unexpected '}'")],
    ),
    (
        "email: unknown name in preheader",
        "email/t.mjml",
        "---\nsubject: Hi\npreheader: For {{ usr.first_name }}\n---\n<mjml><mj-body></mj-body></mjml>\n",
        [(3, 19, "unknown name 'usr' (did you mean 'user'?)")],
    ),
    (
        "email: Jinja syntax error in body",
        "email/t.mjml",
        mjml("<mj-text>a</mj-text>\n  <mj-text>{% if user.vip %}VIP</mj-text>"),
        [(9, 12, "Jinja syntax error: this {% if %} is never closed: add {% endif %} where it ends")],
    ),
    (
        "email: an unclosed block is reported where it opened, not at the end of the file",
        "email/t.mjml",
        mjml(
            "<mj-text>{% for c in user.courses %}{% if c %}{{ c }}{% endif %}{% endfor %}</mj-text>\n"
            "<mj-text>Hi {% if user.vip %}VIP {% for i in range(3) %}*{% endfor %}</mj-text>\n"
            + "<mj-text>more</mj-text>\n" * 20
        ),
        [(9, 13, "Jinja syntax error: this {% if %} is never closed: add {% endif %}")],
    ),
    (
        "email: unknown filter, did you mean",
        "email/t.mjml",
        mjml("<mj-text>Hi {{ user.first_name | defualt('there') }}</mj-text>"),
        [(8, 34, "unknown filter 'defualt' (did you mean 'default'?)")],
    ),
    (
        "email: unknown filter in the subject and unknown names after it",
        "email/t.mjml",
        mjml("<mj-text>{{ usr.first_name }}</mj-text>", subject='"{{ user.first_name|glitter }}!"'),
        [
            (2, 30, "unknown filter 'glitter'; filters: abs, attr, batch, capitalize"),
            (8, 13, "unknown name 'usr' (did you mean 'user'?)"),
        ],
    ),
    (
        "sms: unknown test and filter block",
        "sms/t.txt",
        "{% if user.vip is definedd %}VIP{% endif %}\n{% filter uper %}hi{% endfilter %}\n",
        [
            (1, 19, "unknown test 'definedd' (did you mean 'defined'?)"),
            (2, 11, "unknown filter 'uper' (did you mean 'upper'?)"),
        ],
    ),
    (
        "email: unknown name in body",
        "email/t.mjml",
        mjml("<mj-text>Hi user, {{ usr.first_name }}</mj-text>"),
        [(8, 22, "unknown name 'usr' (did you mean 'user'?)")],
    ),
    (
        "email: unknown name without a close match",
        "email/t.mjml",
        mjml("<mj-text>{{ profile.name }}</mj-text>"),
        [
            (
                8,
                13,
                "unknown name 'profile': templates can use only user, event, last_event, journey and unsubscribe_url",
            )
        ],
    ),
    (
        "email: unknown MJML tag",
        "email/t.mjml",
        mjml('<mj-text>Hi</mj-text>\n    <mj-buton href="https://x.example.com">Go</mj-buton>'),
        [(9, 5, "unknown MJML tag <mj-buton> (did you mean <mj-button>?)")],
    ),
    (
        "email: unknown self-closing MJML tag",
        "email/t.mjml",
        mjml('<mj-imag src="https://x.example.com/a.png" />'),
        [(8, 1, "unknown MJML tag <mj-imag> (did you mean <mj-image>?)")],
    ),
    (
        "email: MJML tag not closed",
        "email/t.mjml",
        mjml("<mj-text>Hi"),
        [(8, 1, "<mj-text> is not closed: add </mj-text> before </mj-column>")],
    ),
    (
        "email: MJML closing tag without opening",
        "email/t.mjml",
        mjml("  Hi</mj-text>"),
        [(8, 5, "</mj-text> closes nothing: no <mj-text> is open here")],
    ),
    (
        "email: invalid MJML without position",
        "email/t.mjml",
        mjml("<mj-text>a < b</mj-text>"),
        [(4, 1, "invalid MJML: unable to parse next template (write a literal '<' in text")],
    ),
    (
        "email: invalid MJML with position",
        "email/t.mjml",
        "---\nsubject: Hi\n---\n<mjml>\n  <mj-body>\n  </mj-body>\n  <mj-text>x</mj-text>\n</mjml>\n",
        [(7, 3, "invalid MJML: unexpected element")],
    ),
    (
        "email: invalid MJML position counts characters, not bytes",
        "email/t.mjml",
        "---\nsubject: Hi\n---\n<mjml>\n  <mj-body>\n  </mj-body>\n  你好<mj-text>x</mj-text>\n</mjml>\n",
        [(7, 3, "invalid MJML: unexpected token")],
    ),
    (
        "email: comments are ignored by the tag check",
        "email/t.mjml",
        mjml("<!-- <mj-buton> -->\n<mj-text>ok</mj-text>"),
        [],
    ),
    (
        "email: include is not available",
        "email/t.mjml",
        mjml("<mj-text>x</mj-text>\n{% include 'footer.html' %}"),
        [(9, 1, "{% include %} is not available in message templates")],
    ),
    (
        "sms: Jinja syntax error",
        "sms/t.txt",
        "Hi {{ user.first_name }}\nCode: {{ event.properties.code }\n",
        [(2, 7, "Jinja syntax error: unexpected '}'")],
    ),
    (
        "sms: unknown name",
        "sms/t.txt",
        "Hi {{ user.first_name }}\n{% if evnt.properties.code %}x{% endif %}\n",
        [(2, 7, "unknown name 'evnt' (did you mean 'event'?)")],
    ),
    (
        "sms: loop variables, set and globals are known",
        "sms/t.txt",
        "{% set n = 3 %}{% for i in range(n) %}{{ loop.index }}{{ i }}{% endfor %}",
        [],
    ),
    (
        "wechat: YAML syntax error",
        "wechat/t.yaml",
        "template_id: T1\ndata:\n  first: [unclosed\n",
        [(4, 1, "WeChat template is not valid YAML: expected ',' or ']'")],
    ),
    (
        "wechat: empty file",
        "wechat/t.yaml",
        "",
        [(1, 1, "WeChat template is empty: add template_id and data")],
    ),
    (
        "wechat: not a mapping",
        "wechat/t.yaml",
        "- T1\n",
        [(1, 1, "WeChat template must be keys: template_id, data")],
    ),
    (
        "wechat: required keys missing, unknown key",
        "wechat/t.yaml",
        "templat_id: T1\n",
        [
            (1, 1, "unknown key 'templat_id' (did you mean 'template_id'?)"),
            (1, 1, "'template_id' is required: add 'template_id: <id from the WeChat console>'"),
            (1, 1, "'data' is required: add 'data: …'"),
        ],
    ),
    (
        "wechat: data not a mapping",
        "wechat/t.yaml",
        "template_id: T1\ndata: hello\n",
        [(2, 7, "must map each template field to its text")],
    ),
    (
        "wechat: data value not text, duplicate field",
        "wechat/t.yaml",
        "template_id: T1\ndata:\n  amount: 99\n  amount: '99'\n",
        [(3, 11, "must be text; quote it"), (4, 3, "duplicate key 'amount': keep only one")],
    ),
    (
        "wechat: Jinja errors in data and url",
        "wechat/t.yaml",
        "template_id: T1\ndata:\n  first: 'Hi {{ user.name }'\n"
        "  second: '{{ usr.name }}'\nurl: 'https://x.example.com/{{ jurney.id }}'\n",
        [
            (3, 14, "Jinja syntax error: unexpected '}'"),
            (4, 15, "unknown name 'usr' (did you mean 'user'?)"),
            (5, 32, "unknown name 'jurney' (did you mean 'journey'?)"),
        ],
    ),
    (
        "wechat: miniprogram problems",
        "wechat/t.yaml",
        "template_id: T1\ndata: {first: hi}\nminiprogram:\n  appid: wx1\n  page: x\n  deep_link: y\n",
        [
            (4, 3, "needs pagepath"),
            (5, 3, "unknown key 'page' (did you mean 'pagepath'?)"),
            (6, 3, "unknown key 'deep_link': use appid, pagepath"),
        ],
    ),
]


def test_a_jinja_syntax_error_is_not_reported_again_as_invalid_mjml(root: Path, store: TemplateStore) -> None:
    welcome = (Path(__file__).resolve().parents[1] / "templates" / "email" / "welcome.mjml").read_text()
    broken = welcome.replace('uid={{ user.id }}">Start', 'uid={{ user.id }">Start')
    assert broken != welcome
    write(root, "email/welcome.mjml", broken)
    line = broken[: broken.index('{{ user.id }">')].count("\n") + 1

    found = [(d.line, d.message) for d in store.check("email", "welcome")]

    assert found == [(line, "Jinja syntax error: unexpected '}'")]


@pytest.mark.parametrize(
    ("relative", "source", "expected"),
    [case[1:] for case in CHECK_CASES],
    ids=[case[0] for case in CHECK_CASES],
)
def test_check_reports_location_and_message(
    root: Path,
    store: TemplateStore,
    relative: str,
    source: str,
    expected: list[tuple[int, int, str]],
) -> None:
    path = write(root, relative, source)
    channel = relative.split("/")[0]

    found = store.check(channel, "t")

    assert [(d.line, d.column) for d in found] == [(line, col) for line, col, _ in expected]
    for diagnostic, (_, _, message) in zip(found, expected, strict=True):
        assert diagnostic.path == str(path)
        assert diagnostic.message.startswith(message), diagnostic.message


def test_check_covers_locale_variants(root: Path, store: TemplateStore) -> None:
    write(root, "sms/t.txt", "Hi {{ user.first_name }}")
    write(root, "sms/t.zh-CN.txt", "你好 {{ usr.first_name }}")

    found = store.check("sms", "t")

    assert [(d.path, d.line, d.column) for d in found] == [(str(root / "sms" / "t.zh-CN.txt"), 1, 7)]


def test_check_missing_file(root: Path, store: TemplateStore) -> None:
    found = store.check("email", "nope")

    assert [(d.path, d.line, d.column) for d in found] == [(str(root / "email" / "nope.mjml"), 0, 0)]
    assert found[0].message.startswith("template file not found")


def test_check_key_paths(root: Path, store: TemplateStore) -> None:
    write(root, "wechat/t.yaml", "template_id: T1\ndata:\n  amount: 99\n")

    [diagnostic] = store.check("wechat", "t")

    assert diagnostic.headline() == f"{root / 'wechat' / 't.yaml'}:3:11: data.amount: must be text; quote it"


def test_well_formed_templates_check_clean(root: Path, store: TemplateStore) -> None:
    write(root, "email/welcome.mjml", WELCOME)
    write(root, "wechat/order.yaml", ORDER)
    write(root, "sms/t.txt", "Hi {{ user.first_name | default('there') }}")

    assert store.check("email", "welcome") == []
    assert store.check("wechat", "order") == []
    assert store.check("sms", "t") == []


# Reading files: a stat check per render, a read only when the file changed

SETTLED = 1_700_000_000  # a modification time long past: the store may cache such a file


def settle(path: Path, seconds: int = SETTLED) -> None:
    os.utime(path, (seconds, seconds))


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    real = templates._read

    def counting(path: Path) -> Any:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(templates, "_read", counting)
    return reads


def test_an_unchanged_file_is_read_once(root: Path, store: TemplateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = count_reads(monkeypatch)
    settle(write(root, "sms/t.txt", "Hi {{ user.first_name }}"))

    for _ in range(3):
        assert store.render("sms", "t", CONTEXT).text == "Hi Li"

    assert len(reads) == 1


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda path: (path.write_text("Yo {{ user.first_name }}", encoding="utf-8"), settle(path, SETTLED + 1)), "mtime"),
        (lambda path: (path.write_text("Hi {{ user.first_name }}!!", encoding="utf-8"), settle(path)), "size"),
        (lambda path: _replace(path, "Yo {{ user.first_name }}"), "inode"),
    ],
)
def test_an_edit_takes_effect_at_the_next_render(
    root: Path, store: TemplateStore, edit: Any, why: str
) -> None:
    path = write(root, "sms/t.txt", "Hi {{ user.first_name }}")
    settle(path)
    before = store.render("sms", "t", CONTEXT).text

    edit(path)

    assert store.render("sms", "t", CONTEXT).text != before, why


def _replace(path: Path, text: str) -> None:
    """An editor's save: a new file of the same size and mtime renamed over the old one."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text, encoding="utf-8")
    settle(fresh)
    os.replace(fresh, path)


def test_a_file_changed_just_now_is_read_every_time(
    root: Path, store: TemplateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A same-size edit within the file system's timestamp granularity leaves the stat as it was,
    so a file modified in the last two seconds is not trusted to the cache."""
    reads = count_reads(monkeypatch)
    path = write(root, "sms/t.txt", "Hi {{ user.first_name }}")
    assert store.render("sms", "t", CONTEXT).text == "Hi Li"
    stat = path.stat()

    path.write_text("Yo {{ user.first_name }}", encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert store.render("sms", "t", CONTEXT).text == "Yo Li"
    assert len(reads) == 2


def test_a_new_locale_variant_is_found(root: Path, store: TemplateStore) -> None:
    write(root, "sms/hello.txt", "base")
    settle(root / "sms")
    assert store.render("sms", "hello", CONTEXT, locale="zh-CN").locale is None

    write(root, "sms/hello.zh-CN.txt", "简体")

    message = store.render("sms", "hello", CONTEXT, locale="zh-CN")
    assert (message.locale, message.text) == ("zh-CN", "简体")


def test_a_deleted_template_fails_to_render(root: Path, store: TemplateStore) -> None:
    path = write(root, "sms/t.txt", "Hi")
    settle(path)
    store.render("sms", "t", CONTEXT)

    path.unlink()

    with pytest.raises(TemplateError, match="template file not found"):
        store.render("sms", "t", CONTEXT)


def test_prepare_checks_without_rendering(root: Path, store: TemplateStore) -> None:
    write(root, "sms/hello.txt", "Hi {{ event.properties.total / 0 }}")
    write(root, "sms/hello.zh.txt", "你好")
    write(root, "sms/broken.txt", "Hi {{ usr }}")

    assert store.prepare("sms", "hello") is None
    assert store.prepare("sms", "hello", locale="zh-CN") == "zh"
    with pytest.raises(TemplateError, match="1 error"):
        store.prepare("sms", "broken")
    with pytest.raises(TemplateError, match="template file not found"):
        store.prepare("sms", "missing")


@given(st.lists(st.sampled_from(["a", " ", "\t", "\n", "\r\n", "\r", "\x0b", "\x1f", "\x85", "\u2028", "\u3000", "\xa0"]), max_size=40).map("".join))
def test_tidy_is_the_plain_definition(text: str) -> None:
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert templates._tidy(text) == re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# Jinja inside MJML: protected from mrml, which would otherwise rewrite it

INLINE_CSS = '<mj-head><mj-style inline="inline">.x { color: red; }</mj-style></mj-head>'


def email(body: str, head: str = INLINE_CSS) -> str:
    """An email template; ``body`` is inside one column and starts on line 6."""
    return (
        f"---\nsubject: Hi\n---\n<mjml>\n{head}<mj-body><mj-section><mj-column>\n"
        f"{body}\n</mj-column></mj-section></mj-body>\n</mjml>\n"
    )


def test_comparison_after_markup_survives_inlined_css(root: Path, store: TemplateStore) -> None:
    """With inlined CSS mrml re-serialises text and writes `>` as `&gt;` inside `{% if n > 1 %}`."""
    source = "<mj-text><strong>{{ user.first_name }}</strong>{% if user.n > 1 %} and {{ user.n - 1 }} more{% endif %}</mj-text>"
    write(root, "email/t.mjml", email(source))

    assert store.check("email", "t") == []
    assert store.render("email", "t", user(first_name="Li", n=3)).text == "Li and 2 more"
    assert store.render("email", "t", user(first_name="Li", n=1)).text == "Li"


@pytest.mark.parametrize(
    ("body", "traits", "text"),
    [
        ('<mj-button href="https://x.example.com/{% if user.n > 1 %}many{% else %}one{% endif %}">Go</mj-button>', {"n": 2}, "Go (https://x.example.com/many)"),
        ('<mj-button href="https://x.example.com/{{ user.page | default("home") }}">Go</mj-button>', {}, "Go (https://x.example.com/home)"),
        ('<mj-text><a href="https://x.example.com/?q={{ user.q }}&amp;n={{ user.n }}">link</a></mj-text>', {"q": "a", "n": 1}, "link (https://x.example.com/?q=a&n=1)"),
        ('<mj-text>{{ "Tom & Jerry" if user.n > 0 else "<nobody>" }}</mj-text>', {"n": 1}, "Tom & Jerry"),
        ('<mj-text>{{ "Tom & Jerry" if user.n > 0 else "<nobody>" }}</mj-text>', {"n": 0}, "<nobody>"),
        ("<mj-text>a{# n > 1 and <b> #}b</mj-text>", {}, "ab"),
        ('<mj-text>{{ "}}" }}</mj-text>', {}, "}}"),
    ],
    ids=["statement-in-attribute", "quotes-in-attribute", "expressions-in-inner-link", "markup-in-strings", "markup-in-strings-else", "comment", "closing-braces-in-a-string"],
)
def test_jinja_in_text_and_attributes_compiles_as_written(
    root: Path, store: TemplateStore, body: str, traits: dict[str, Any], text: str
) -> None:
    write(root, "email/t.mjml", email(body))

    assert store.check("email", "t") == []
    assert store.render("email", "t", user(**traits)).text == text


def test_jinja_in_a_title_is_kept_in_every_copy(root: Path, store: TemplateStore) -> None:
    head = "<mj-head><mj-title>{% if user.vip %}VIP {% endif %}{{ user.first_name }}</mj-title></mj-head>"
    write(root, "email/t.mjml", email("<mj-text>x</mj-text>", head=head))

    assert store.check("email", "t") == []
    html_ = store.render("email", "t", user(first_name="Li", vip=True)).html or ""
    assert "<title>VIP Li</title>" in html_
    assert 'aria-label="VIP Li"' in html_


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            email('<mj-image src="https://x.example.com/a.png" width="{{ user.width }}" />'),
            (6, 52, "MJML compilation drops this Jinja code ({{ user.width }})"),
        ),
        (
            email("<mj-text>x{% endif %}</mj-text>", head="<mj-head><mj-title>{% if user.vip %}VIP</mj-title></mj-head>"),
            (5, 20, "MJML repeats this Jinja code elsewhere in the HTML"),
        ),
        (
            "---\nsubject: Hi\n---\n<mjml>\n  <mj-body>\n  <mj-section><mj-column><mj-text>{{ user.first_name | default('someone with a long name') }}</mj-text></mj-column></mj-section>\n  </mj-body>\n  <mj-text>x</mj-text>\n</mjml>\n",
            (8, 3, "invalid MJML: unexpected element"),
        ),
        (
            "---\nsubject: Hi\n---\n<mjml>\n  <mj-body>\n  </mj-body>\n  {{ user.id }}<mj-text>x</mj-text>\n</mjml>\n",
            (7, 3, "invalid MJML: unexpected token"),
        ),
    ],
    ids=["dropped-attribute", "copied-half-block", "mrml-error-after-jinja", "mrml-error-at-jinja"],
)
def test_jinja_that_mjml_cannot_keep_is_reported_at_its_line(
    root: Path, store: TemplateStore, source: str, expected: tuple[int, int, str]
) -> None:
    write(root, "email/t.mjml", source)

    [diagnostic] = store.check("email", "t")

    assert (diagnostic.line, diagnostic.column) == expected[:2]
    assert diagnostic.message.startswith(expected[2]), diagnostic.message


def test_jinja_in_a_dropped_comment_is_not_an_error(root: Path, store: TemplateStore) -> None:
    head = "<mj-head><!-- for {{ user.id }} --><mj-title>T</mj-title></mj-head>"
    write(root, "email/t.mjml", email("<mj-text>x</mj-text>", head=head))

    assert store.check("email", "t") == []


def test_text_alternative_keeps_the_break_after_a_block_tag() -> None:
    store = TemplateStore(Path(__file__).resolve().parents[1] / "templates")
    context = {
        "user": {"first_name": "Li", "id": "u1"},
        "event": {"properties": {"top_item": "Python", "item_count": 2, "cart_total": 99, "currency": "USD"}},
        "last_event": {},
        "journey": {},
    }
    message = store.render("email", "cart_reminder", context)
    assert "waiting for you.\nCart total: USD 99." in (message.text or "")


# The project's own marketing emails


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href") or ""
        if tag == "a" and href.startswith(("http://", "https://")):
            self.hrefs.append(href)


def _marketing_emails(project: Project) -> list[tuple[str, str | None]]:
    """(template, locale) of every email a marketing send of the project may render."""
    found: set[tuple[str, str | None]] = set()
    for journey in project.journeys.values():
        for step in ir.walk(journey.steps):
            if not isinstance(step, ir.Send) or step.category != "marketing":
                continue
            if "email" in (step.channels or journey.policy.channel_order):
                for locale in [None, *project.templates.locales("email", step.template)]:
                    found.add((step.template, locale))
    return sorted(found, key=lambda item: (item[0], item[1] or ""))


def test_the_text_part_of_every_marketing_email_carries_every_link(project: Project) -> None:
    unsubscribe = "https://n.example/u/tok-u1-email"
    context = {
        **CONTEXT,
        "user": {"id": "u1", "first_name": "Li", "email": "li@example.com"},
        "event": {"name": "Order Completed", "properties": {"order_id": "O-9", "course_id": "c-1"}},
        "unsubscribe_url": unsubscribe,
    }
    emails = _marketing_emails(project)
    assert len(emails) >= 8
    for name, locale in emails:
        message = project.templates.render("email", name, context, locale=locale)
        assert message.locale == locale
        parser = _Links()
        parser.feed(message.html or "")
        assert unsubscribe in parser.hrefs, f"{name} ({locale}): no unsubscribe link in the HTML"
        for href in parser.hrefs:
            assert href in (message.text or ""), f"{name} ({locale}): the text part lacks {href}"


def test_a_link_whose_address_is_jinja_follows_the_link_rule_once_rendered(root: Path, store: TemplateStore) -> None:
    write(
        root,
        "email/t.mjml",
        mjml(
            '<mj-text><a href="{{ unsubscribe_url }}">Unsubscribe</a> '
            '<a href="{{ unsubscribe_url }}">{{ unsubscribe_url }}</a> '
            '<a href="{{ user.site }}">Site</a></mj-text>'
        ),
    )

    def text(**values: Any) -> str:
        return store.render("email", "t", {**CONTEXT, **values}).text or ""

    url = "https://n.example/u/tok"
    assert text(unsubscribe_url=url, user={"site": "mailto:a@example.com"}) == f"Unsubscribe ({url}) {url} Site"
    assert text(unsubscribe_url="", user={}) == "Unsubscribe Site"
