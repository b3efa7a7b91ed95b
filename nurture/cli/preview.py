"""``nurture preview``: one template rendered for one user, as a journey would send it.

    nurture preview email/welcome --user li.yaml --event signed_up.yaml --png welcome.png
    nurture preview sms/cart_last_call --user li.yaml --event cart.yaml
    nurture preview vip_thank_you --user li.yaml        # a bare name found in one channel only

USER.yaml holds the user's traits (``id`` is required; ``locale`` picks the variant unless
``--locale`` is given); EVENT.yaml holds ``name``, ``properties`` and optionally ``timestamp``, and
templates see it as ``event`` and ``last_event``. The context and the rendering are
:mod:`nurture.service.preview`'s, which the console's preview page uses too, so both show what a
recipient would get.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import click
import yaml

from nurture.delivery.deliverer import text_value
from nurture.engine.clock import format_instant, parse_instant
from nurture.engine.model import Event, Profile
from nurture.language.compiler import Settings, load_settings
from nurture.language.diagnostics import DiagnosticSink, did_you_mean, format_all
from nurture.language.ir import ADDRESS_TRAITS, CHANNELS
from nurture.language.sms import sms_info
from nurture.language.templates import RenderedMessage, TemplateStore
from nurture.service.preview import PreviewError, locale_line, preview_context, render_template

from .options import project_options

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
"""Looked up on PATH, in this order, when ``NURTURE_CHROMIUM`` is not set."""

SCREENSHOT_WIDTH = 700
"""Wide enough for a 600px email and its margins, as a desktop client shows it."""

MAX_HEIGHT = 16_000
BROWSER_TIMEOUT = 60.0
_INSTALL_HINT = "install it (apt-get install chromium) or set NURTURE_CHROMIUM to the browser's path"
_EVENT_KEYS = ("name", "properties", "timestamp")


@click.command()
@click.argument("template")
@click.option(
    "--user",
    "user_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file with the user's traits: id, first_name, email, locale, ...",
)
@click.option(
    "--event",
    "event_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="YAML file with the triggering event: name, properties (seen as event and last_event).",
)
@click.option("--locale", default=None, help="Locale variant to use [default: the user's locale trait].")
@click.option(
    "--png",
    "png_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Email only: write a screenshot taken with headless Chromium.",
)
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Email only: write the rendered HTML.",
)
@project_options
def preview(
    template: str,
    user_file: Path,
    event_file: Path | None,
    locale: str | None,
    png_file: Path | None,
    html_file: Path | None,
    templates_dir: Path,
    journeys_dir: Path,
    config: Path | None,
) -> None:
    """Render TEMPLATE (channel/name, or a name found in one channel) for one user."""
    if not templates_dir.is_dir():
        raise click.ClickException(f"templates directory not found: {templates_dir} (use --templates DIR)")
    store = TemplateStore(templates_dir)
    channel, name = resolve_template(store, template)
    if channel != "email" and (png_file or html_file):
        raise click.ClickException(f"--png and --html apply to email templates; {channel}/{name} is {channel}")
    browser = find_browser() if png_file else None  # before anything is printed
    settings = _settings(config if config is not None else journeys_dir.parent / "nurture.yaml")
    profile = load_user(user_file)
    event = load_event(event_file) if event_file else {}
    wanted = locale or text_value(profile.traits.get("locale"))
    message = _render(store, channel, name, preview_context(profile, event, channel, name, settings), wanted)
    address = text_value(profile.traits.get(ADDRESS_TRAITS[channel]))
    if channel == "email":
        _show_email(message, address, locale_line(store, message, wanted))
        if html_file:
            html_file.write_text(message.html or "", encoding="utf-8")
            click.echo(f"HTML written to {html_file}", err=True)
        if png_file and browser:
            for warning in font_warnings(message.text or ""):
                click.echo(f"warning: {warning}", err=True)
            screenshot(message.html or "", png_file, browser)
            click.echo(f"screenshot written to {png_file}", err=True)
    elif channel == "sms":
        _show_sms(message, address, locale_line(store, message, wanted), settings)
    else:
        _show_wechat(message, address, locale_line(store, message, wanted))


def resolve_template(store: TemplateStore, spec: str) -> tuple[str, str]:
    """``(channel, name)`` for ``channel/name``, or for a bare name that one channel has."""
    channel, separator, name = spec.partition("/")
    if separator:
        if channel not in CHANNELS:
            hint = did_you_mean(channel, CHANNELS)
            raise click.ClickException(f"unknown channel '{channel}'{hint}; channels are {', '.join(CHANNELS)}")
        if not store.exists(channel, name):
            hint = did_you_mean(name, store.names(channel))
            raise click.ClickException(
                f"no {channel} template '{name}'{hint}: expected {store.path(channel, name)}"
            )
        return channel, name
    found = [c for c in CHANNELS if store.exists(c, spec)]
    if len(found) == 1:
        return found[0], spec
    if found:
        choices = ", ".join(f"{c}/{spec}" for c in found)
        raise click.ClickException(f"'{spec}' is a template in {len(found)} channels; name one: {choices}")
    channels_of: dict[str, list[str]] = {}
    for c in CHANNELS:
        for known in store.names(c):
            channels_of.setdefault(known, []).append(c)
    close = difflib.get_close_matches(spec, list(channels_of), n=1, cutoff=0.6)
    hint = ""
    if close:
        # Qualified names, which work even when the name is in more than one channel.
        hint = " (did you mean " + " or ".join(f"'{c}/{close[0]}'" for c in channels_of[close[0]]) + "?)"
    raise click.ClickException(f"no template '{spec}' in {store.root}{hint}")


def load_user(path: Path) -> Profile:
    """The profile in a USER.yaml file: a mapping of traits with an ``id``."""
    data = _load_yaml(path, "USER.yaml")
    user_id = data.get("id")
    if not isinstance(user_id, (str, int)) or isinstance(user_id, bool) or user_id == "":
        raise click.ClickException(f"{path}: the user needs an id, e.g. 'id: u_1024'")
    traits = {str(key): _plain(value) for key, value in data.items() if key != "id"}
    return Profile(str(user_id), traits)


def load_event(path: Path) -> dict[str, Any]:
    """The ``event`` scope of an EVENT.yaml file, shaped as the engine shapes it."""
    data = _load_yaml(path, "EVENT.yaml")
    for key in data:
        if key not in _EVENT_KEYS:
            hint = did_you_mean(str(key), _EVENT_KEYS) or f"; use {', '.join(_EVENT_KEYS)}"
            raise click.ClickException(f"{path}: unknown key '{key}'{hint}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise click.ClickException(f"{path}: the event needs a name, e.g. 'name: Order Completed'")
    properties = data.get("properties") or {}
    if not isinstance(properties, dict):
        raise click.ClickException(f"{path}: properties must be a mapping ('key: value' lines)")
    return Event(name, _timestamp(path, data.get("timestamp")), _plain(properties)).scope()


def find_browser() -> str:
    """The Chromium to screenshot with: ``NURTURE_CHROMIUM``, else the first of :data:`BROWSERS`."""
    configured = os.environ.get("NURTURE_CHROMIUM")
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise click.ClickException(
                f"NURTURE_CHROMIUM is {configured!r}, which is not an executable browser: point it "
                f"at Chromium, or unset it and install Chromium on PATH (apt-get install chromium)"
            )
        return found
    for candidate in BROWSERS:
        found = shutil.which(candidate)
        if found:
            return found
    raise click.ClickException(
        f"--png needs a Chromium browser and none was found ({', '.join(BROWSERS)} on PATH): {_INSTALL_HINT}"
    )


_SCRIPTS = {
    "zh": ("Chinese", re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")),
    "ja": ("Japanese", re.compile(r"[\u3040-\u30ff]")),
    "ko": ("Korean", re.compile(r"[\uac00-\ud7af]")),
}
"""Scripts that fonts shipped with a Linux base system do not cover: (language, characters)."""
_CJK_FONTS = "apt-get install fonts-noto-cjk"


def font_warnings(text: str) -> list[str]:
    """Why a screenshot of ``text`` would show empty boxes: scripts no installed font covers.

    Chromium finds fonts through fontconfig, so ``fc-list :lang=zh`` listing nothing means the
    Chinese in the email renders as boxes; the email itself is fine, the machine lacks a font.
    """
    wanted = [(lang, name) for lang, (name, chars) in _SCRIPTS.items() if chars.search(text)]
    if not wanted:
        return []
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        names = " and ".join(name for _, name in wanted)
        return [f"cannot check that a font covers the email's {names} text (fc-list not found: apt-get install fontconfig)"]
    found = []
    for lang, name in wanted:
        try:
            listed = subprocess.run(
                [fc_list, f":lang={lang}", "family"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if listed.returncode == 0 and not listed.stdout.strip():
            found.append(
                f"no installed font covers the email's {name} text (fc-list :lang={lang} lists none), so the "
                f"screenshot shows it as empty boxes: {_CJK_FONTS}"
            )
    return found


def screenshot(html: str, target: Path, browser: str, *, timeout: float = BROWSER_TIMEOUT) -> None:
    """Write a PNG of ``html`` as headless Chromium shows it, as tall as the page."""
    with tempfile.TemporaryDirectory(prefix="nurture-preview-") as scratch:
        folder = Path(scratch)
        page = folder / "email.html"
        page.write_text(html, encoding="utf-8")
        height = _page_height(html, folder, browser, timeout)
        target = target.resolve()
        target.unlink(missing_ok=True)
        output = _run_browser(
            browser,
            folder,
            [f"--window-size={SCREENSHOT_WIDTH},{height}", f"--screenshot={target}", page.as_uri()],
            timeout,
        )
        if not target.is_file() or not target.read_bytes().startswith(b"\x89PNG"):
            raise click.ClickException(f"{browser} wrote no screenshot:\n{_tail(output)}")


# The page reports its own height once images and fonts have loaded; a small window makes the
# document exactly as tall as its content (a taller one would pad it to the window).
_MEASURE = (
    "<script>addEventListener('load',function(){document.documentElement.setAttribute("
    "'data-nurture-height',String(Math.ceil(document.documentElement.scrollHeight)))})</script>"
)


def _page_height(html: str, folder: Path, browser: str, timeout: float) -> int:
    """The rendered page's height in CSS pixels; a default when it cannot be measured."""
    page = folder / "measure.html"
    at = html.lower().rfind("</body>")
    page.write_text(html[:at] + _MEASURE + html[at:] if at >= 0 else html + _MEASURE, encoding="utf-8")
    output = _run_browser(browser, folder, [f"--window-size={SCREENSHOT_WIDTH},100", "--dump-dom", page.as_uri()], timeout)
    marker = 'data-nurture-height="'
    start = output.find(marker)
    if start < 0:
        return 1200
    digits = output[start + len(marker) :].partition('"')[0]
    return min(max(int(digits) if digits.isdigit() else 1200, 200), MAX_HEIGHT)


def _run_browser(browser: str, folder: Path, arguments: list[str], timeout: float) -> str:
    """Run headless Chromium with a throwaway profile; its stdout and stderr together."""
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={folder / 'profile'}",
        "--hide-scrollbars",
        *arguments,
    ]
    try:
        # A session of its own, so a hung browser is stopped with every process it started.
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        raise click.ClickException(f"cannot run {browser}: {exc.strerror}; {_INSTALL_HINT}") from None
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise click.ClickException(f"{browser} did not finish within {timeout:.0f} s") from None
    output = stdout.decode("utf-8", "replace") + stderr.decode("utf-8", "replace")
    if process.returncode != 0:
        raise click.ClickException(f"{browser} failed (exit code {process.returncode}):\n{_tail(output)}")
    return output


def _tail(output: str, lines: int = 15) -> str:
    # Chromium logs harmless D-Bus errors on machines without a desktop session.
    useful = [line for line in output.splitlines() if "dbus" not in line]
    return "\n".join(useful[-lines:])


def _render(
    store: TemplateStore, channel: str, name: str, context: dict[str, Any], locale: str | None
) -> RenderedMessage:
    try:
        return render_template(store, channel, name, context, locale)
    except PreviewError as exc:
        raise click.ClickException(str(exc)) from None


def _settings(path: Path) -> Settings:
    sink = DiagnosticSink()
    settings = load_settings(path, sink)
    if sink.errors:
        click.echo(format_all(sink.errors), err=True)
        click.echo(f"{path} has errors: previewing with the default settings", err=True)
    return settings


def _to(channel: str, address: str | None) -> str:
    if address:
        return address
    return f"(no {ADDRESS_TRAITS[channel]} trait: a journey would skip {channel} for this user)"


def _show_email(message: RenderedMessage, address: str | None, locale: str) -> None:
    click.echo(f"To:        {_to('email', address)}")
    click.echo(f"Subject:   {message.subject or ''}")
    click.echo(f"Preheader: {message.preheader or ''}")
    click.echo(f"Locale:    {locale}")
    click.echo("")
    click.echo(message.text or "")


def _show_sms(message: RenderedMessage, address: str | None, locale: str, settings: Settings) -> None:
    text = message.text or ""
    info = sms_info(text)
    click.echo(f"To:      {_to('sms', address)}")
    click.echo(f"Locale:  {locale}")
    click.echo("")
    click.echo(text)
    click.echo("")
    click.echo(info.describe())
    limit = settings.sms_max_segments
    if info.segments > limit:
        click.echo(
            f"warning: {info.segments} segments is more than the project allows "
            f"({limit}, sms_max_segments in nurture.yaml)"
        )


def _show_wechat(message: RenderedMessage, address: str | None, locale: str) -> None:
    from channels.wechat import template_payload

    # stdout is the request body alone, so it can be piped; the rest goes to stderr.
    click.echo(f"Locale:  {locale}", err=True)
    if not address:
        click.echo(f"To:      {_to('wechat', address)}", err=True)
    payload = template_payload(message, address or "")
    click.echo(json.dumps(payload, ensure_ascii=False, indent=2))


def _load_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: {what} must be a mapping ('key: value' lines)")
    return data


def _timestamp(path: Path, value: Any) -> datetime:
    if value is None:
        return datetime.now(UTC)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        return parse_instant(str(value))
    except ValueError:
        raise click.ClickException(f"{path}: timestamp {value!r} is not ISO-8601, e.g. 2024-06-01T08:00:00Z") from None


def _plain(value: Any) -> Any:
    """The value as the engine stores it: JSON types only (YAML dates become ISO text)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, datetime):
        return format_instant(value if value.tzinfo else value.replace(tzinfo=UTC))
    if isinstance(value, date):
        return value.isoformat()
    return value

