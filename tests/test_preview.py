"""``nurture preview`` on the project's own templates: what a recipient would get, per channel."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nurture.cli.main import main
from nurture.cli.preview import find_browser, screenshot
from nurture.delivery.links import UnsubscribeLinks
from nurture.language.sms import sms_info

ROOT = Path(__file__).resolve().parents[1]

LI = """\
id: u_1024
first_name: 李雷
email: li@example.com
phone: "+8613800138000"
wechat_openid: oUpF8uMuAJO_M2pxb1Q9zNjWeS6o
locale: zh-CN
timezone: Asia/Shanghai
"""

ANNA = """\
id: u_2048
first_name: Anna
email: anna@example.com
phone: "+447700900123"
"""

CART = """\
name: Cart Updated
properties:
  cart_id: c_77
  top_item: Python for Data Analysis
  interest: data analysis
  course_name: Machine Learning
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name, text in (("li.yaml", LI), ("anna.yaml", ANNA), ("cart.yaml", CART)):
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def preview(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    project = ["--templates", str(ROOT / "templates"), "--journeys", str(ROOT / "journeys")]
    return CliRunner().invoke(main, ["preview", *map(str, args), *project], env=env)


def test_email_for_a_chinese_user_uses_the_chinese_variant(files: Path) -> None:
    html = files / "welcome.html"
    result = preview(
        "email/welcome", "--user", files / "li.yaml", "--event", files / "cart.yaml", "--html", html
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        "To:        li@example.com",
        "Subject:   李雷，欢迎加入 Nurture 学院！",
        "Preheader: 你的第一节免费课已经准备好了，10 分钟就能开始学习。",
        f"Locale:    zh-CN ({ROOT / 'templates' / 'email' / 'welcome.zh-CN.mjml'})",
    ]
    # Then the plain-text alternative, with the event's property and the user's links.
    assert "你说对data analysis感兴趣" in result.stdout
    assert "https://academy.example.com/zh/start?uid=u_1024" in result.stdout
    written = html.read_text(encoding="utf-8")
    assert written.lstrip().lower().startswith("<!doctype html>")
    assert "李雷，欢迎加入 Nurture 学院！" in written


def test_locale_option_wins_over_the_users_locale(files: Path) -> None:
    result = preview("welcome", "--user", files / "li.yaml", "--locale", "en")
    assert result.exit_code == 0, result.output
    assert "Subject:   Welcome to Nurture Academy, 李雷!" in result.stdout
    assert "base file, no 'en' variant" in result.stdout
    # Without an event, the template's no-interest wording is used.
    assert "Your dashboard already has a free starter lesson waiting for you." in result.stdout


def test_sms_in_chinese_is_ucs2(files: Path) -> None:
    result = preview("sms/cart_last_call", "--user", files / "li.yaml", "--event", files / "cart.yaml")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "To:      +8613800138000"
    text = lines[3]
    assert text.startswith("【Nurture学院】李雷，你购物车里的《Python for Data Analysis》")
    info = sms_info(text)
    assert info.encoding == "UCS-2"
    assert lines[5] == info.describe()
    assert "warning" not in result.output


def test_sms_in_english_is_gsm7_and_warns_past_the_projects_limit(files: Path) -> None:
    config = files / "nurture.yaml"
    config.write_text("sms_max_segments: 1\n", encoding="utf-8")
    result = preview(
        "sms/cart_last_call",
        "--user",
        files / "anna.yaml",
        "--event",
        files / "cart.yaml",
        "--config",
        config,
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[3].startswith("Nurture Academy: Anna, Python for Data Analysis is still in your cart.")
    assert len(lines[3]) == 190  # plain Latin text: one septet per character
    assert lines[5] == "GSM-7, 2 segments (190/306 characters)" == sms_info(lines[3]).describe()
    assert (
        lines[6]
        == "warning: 2 segments is more than the project allows (1, sms_max_segments in nurture.yaml)"
    )


def test_wechat_prints_the_provider_request_body(files: Path) -> None:
    result = preview("wechat/vip_thank_you", "--user", files / "li.yaml", "--event", files / "cart.yaml")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["touser"] == "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
    assert body["template_id"] == "JZ716wZn0DDf5uiesp3n7VcbKYYtyUmZNon3RBSaObk"
    assert body["url"] == "https://academy.example.com/zh/vip/mentor?uid=u_1024"
    assert body["miniprogram"] == {"appid": "wx8f3c2a91d5b7e604", "pagepath": "pages/vip/mentor"}
    assert body["data"]["first"] == {"value": "李雷，感谢你一路相伴！"}
    assert body["data"]["keyword1"] == {"value": "《Machine Learning》导师1对1辅导一次"}
    assert all(set(field) == {"value"} for field in body["data"].values())
    assert "zh-CN" in result.stderr


def test_a_name_in_two_channels_must_be_qualified(files: Path) -> None:
    result = preview("cart_last_call", "--user", files / "li.yaml")
    assert result.exit_code == 1
    assert (
        "'cart_last_call' is a template in 2 channels; name one: sms/cart_last_call, wechat/cart_last_call"
        in result.output
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("welcom", "no template 'welcom' in"),
        ("welcom", "(did you mean 'email/welcome'?)"),
        ("cart_last_cal", "(did you mean 'sms/cart_last_call' or 'wechat/cart_last_call'?)"),
        ("emial/welcome", "unknown channel 'emial' (did you mean 'email'?)"),
        ("sms/welcome", "no sms template 'welcome' (did you mean 'welcome_coupon'?)"),
    ],
)
def test_unknown_templates_suggest_a_name(files: Path, spec: str, message: str) -> None:
    result = preview(spec, "--user", files / "li.yaml")
    assert result.exit_code == 1
    assert message in result.output


def test_template_errors_exit_1_with_the_message(files: Path) -> None:
    templates = files / "templates"
    (templates / "sms").mkdir(parents=True)
    (templates / "sms" / "broken.txt").write_text("Hi {{ user.first_name\n", encoding="utf-8")
    (templates / "sms" / "divide.txt").write_text("{{ 10 // event.properties.n }} left\n", encoding="utf-8")
    (files / "zero.yaml").write_text("name: Count\nproperties: {n: 0}\n", encoding="utf-8")
    runner = CliRunner()
    broken = runner.invoke(
        main, ["preview", "broken", "--user", str(files / "anna.yaml"), "--templates", str(templates)]
    )
    assert broken.exit_code == 1
    assert f"{templates / 'sms' / 'broken.txt'}:1:" in broken.output
    assert "Jinja syntax error" in broken.output
    data = runner.invoke(
        main,
        [
            "preview",
            "divide",
            "--user",
            str(files / "anna.yaml"),
            "--event",
            str(files / "zero.yaml"),
            "--templates",
            str(templates),
        ],
    )
    assert data.exit_code == 1
    assert "could not render: integer division or modulo by zero" in data.output


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("user.yaml", "first_name: Li\n", "the user needs an id"),
        ("user.yaml", "- id: u1\n", "must be a mapping"),
        (
            "event.yaml",
            "name: Cart Updated\nprops: {a: 1}\n",
            "unknown key 'props' (did you mean 'properties'?)",
        ),
        ("event.yaml", "properties: {a: 1}\n", "the event needs a name"),
        ("event.yaml", "name: X\ntimestamp: yesterday\n", "timestamp 'yesterday' is not ISO-8601"),
    ],
)
def test_bad_user_and_event_files_are_explained(files: Path, name: str, text: str, message: str) -> None:
    (files / name).write_text(text, encoding="utf-8")
    user = files / (name if name == "user.yaml" else "anna.yaml")
    extra = ["--event", files / name] if name == "event.yaml" else []
    result = preview("email/welcome", "--user", user, *extra)
    assert result.exit_code == 1
    assert message in result.output


def test_png_and_html_are_for_email_only(files: Path) -> None:
    result = preview("sms/cart_last_call", "--user", files / "li.yaml", "--png", files / "x.png")
    assert result.exit_code == 1
    assert "--png and --html apply to email templates" in result.output


def test_a_missing_browser_says_how_to_install_one(files: Path) -> None:
    png = files / "welcome.png"
    result = preview(
        "email/welcome",
        "--user",
        files / "li.yaml",
        "--png",
        png,
        env={"NURTURE_CHROMIUM": str(files / "no-such-browser")},
    )
    assert result.exit_code == 1
    assert "NURTURE_CHROMIUM" in result.output
    assert "apt-get install chromium" in result.output
    assert "Subject:" not in result.output  # it fails before rendering anything
    assert not png.exists()

    empty = files / "empty-bin"
    empty.mkdir()
    result = preview(
        "email/welcome",
        "--user",
        files / "li.yaml",
        "--png",
        png,
        env={"NURTURE_CHROMIUM": "", "PATH": str(empty)},
    )
    assert result.exit_code == 1
    assert "none was found (chromium, chromium-browser, google-chrome on PATH)" in result.output
    assert "apt-get install chromium" in result.output


def test_png_screenshot_with_headless_chromium(files: Path) -> None:
    png = files / "welcome.png"
    result = preview(
        "email/welcome", "--user", files / "anna.yaml", "--event", files / "cart.yaml", "--png", png
    )
    assert result.exit_code == 0, result.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width == 700
    # As tall as the email (about 680 px here), not a fixed window.
    assert 400 < height < 2000
    assert len(data) > 10_000
    assert f"screenshot written to {png}" in result.stderr


# Han characters and CJK punctuation; in the tofu copy each becomes U+0378, which no font has.
CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
NO_FONTS = """<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "fonts.dtd">
<fontconfig><cachedir>{cache}</cachedir></fontconfig>
"""


def pixels(png: Path) -> bytes:
    """The image data of a PNG (its IDAT chunks, inflated): equal for equal pixels."""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, b""
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        if kind == b"IDAT":
            chunks += data[at + 8 : at + 8 + length]
        at += 12 + length
    return zlib.decompress(chunks)


def renders_like_tofu(html: Path, folder: Path) -> bool:
    """Whether the page's Chinese looks exactly like characters no font has (empty boxes)."""
    source = html.read_text(encoding="utf-8")
    tofu = CJK.sub("\u0378", source)
    assert tofu != source
    browser = find_browser()
    screenshot(source, folder / "chinese.png", browser)
    screenshot(tofu, folder / "tofu.png", browser)
    return pixels(folder / "chinese.png") == pixels(folder / "tofu.png")


def test_a_chinese_email_png_shows_chinese_glyphs(files: Path) -> None:
    png, html = files / "welcome.png", files / "welcome.html"
    result = preview("email/welcome", "--user", files / "li.yaml", "--png", png, "--html", html)

    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    assert "Locale:    zh-CN" in result.stdout
    assert struct.unpack(">I", png.read_bytes()[16:20]) == (700,)
    assert not renders_like_tofu(html, files)


def test_without_a_cjk_font_the_png_is_tofu_and_preview_says_which_package_to_install(
    files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = files / "fonts.conf"
    config.write_text(NO_FONTS.format(cache=files / "fontconfig-cache"), encoding="utf-8")
    monkeypatch.setenv("FONTCONFIG_FILE", str(config))
    png, html = files / "welcome.png", files / "welcome.html"

    chinese = preview("email/welcome", "--user", files / "li.yaml", "--png", png, "--html", html)
    english = preview("email/welcome", "--user", files / "anna.yaml", "--png", files / "en.png")

    assert chinese.exit_code == 0, chinese.output
    assert "warning: no installed font covers the email's Chinese text" in chinese.stderr
    assert "apt-get install fonts-noto-cjk" in chinese.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert renders_like_tofu(html, files)  # what the warning is about, and what the check above detects
    assert english.exit_code == 0, english.output
    assert "warning" not in english.stderr


def test_the_unsubscribe_link_is_shown_signed_when_links_are_configured(files: Path) -> None:
    html = files / "welcome.html"
    plain = preview(
        "email/welcome",
        "--user",
        files / "li.yaml",
        "--html",
        html,
        env={"NURTURE_PUBLIC_URL": "", "NURTURE_SECRET": ""},
    )
    assert plain.exit_code == 0, plain.output
    assert 'href="https://nurture.example/u/preview"' in html.read_text(encoding="utf-8")

    env = {"NURTURE_PUBLIC_URL": "https://n.example", "NURTURE_SECRET": "s" * 32}
    signed = preview("email/welcome", "--user", files / "li.yaml", "--html", html, env=env)
    assert signed.exit_code == 0, signed.output
    token = html.read_text(encoding="utf-8").split('href="https://n.example/u/')[1].split('"')[0]
    target = UnsubscribeLinks(secret="s" * 32, public_url="https://n.example").verify(token)
    assert (target.user_id, target.channel) == ("u_1024", "email")
