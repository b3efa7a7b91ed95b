"""Message templates: where they live, how they are checked and how they render.

A template store is a directory with one subdirectory per channel::

    email/<name>.mjml             MJML + Jinja2 with YAML front matter (subject, preheader)
    email/<name>.<locale>.mjml    a locale variant, e.g. welcome.zh-CN.mjml
    sms/<name>.txt                Jinja2 text
    wechat/<name>.yaml            template_id, data: {field: Jinja2 text}, url, miniprogram

``check`` finds every problem in a template at once, each pointing at a line and column of the
file. ``render`` turns a template and a context (``user``, ``event``, ``last_event``, ``journey``)
into a :class:`RenderedMessage`. MJML is compiled once per file content and the resulting HTML is
rendered by Jinja per recipient, so rendering thousands of messages costs one Jinja pass each.
A render checks the file's ``os.stat`` and re-reads it only when that changes, so an edited
template takes effect at the next render without being read from disk every time.
"""

from __future__ import annotations

import difflib
import hashlib
import html
import os
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import mrml
import yaml
from jinja2 import ChainableUndefined, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .diagnostics import Diagnostic, did_you_mean
from .schema import READ_ROOTS, Read
from .sms import minimum_text, non_gsm7, sms_info

CHANNELS: dict[str, tuple[str, str]] = {
    "email": ("email", ".mjml"),
    "sms": ("sms", ".txt"),
    "wechat": ("wechat", ".yaml"),
}
"""Channel -> (subdirectory of the store, file suffix)."""

TEMPLATE_NAMES = ("user", "event", "last_event", "journey", "unsubscribe_url")
"""The only top-level names a template may use."""

MJML_TAGS = frozenset(
    {
        "mjml",
        "mj-head",
        "mj-body",
        "mj-section",
        "mj-column",
        "mj-group",
        "mj-text",
        "mj-button",
        "mj-image",
        "mj-divider",
        "mj-spacer",
        "mj-table",
        "mj-raw",
        "mj-hero",
        "mj-navbar",
        "mj-navbar-link",
        "mj-social",
        "mj-social-element",
        "mj-accordion",
        "mj-accordion-element",
        "mj-accordion-title",
        "mj-accordion-text",
        "mj-carousel",
        "mj-carousel-image",
        "mj-wrapper",
        "mj-attributes",
        "mj-all",
        "mj-class",
        "mj-breakpoint",
        "mj-font",
        "mj-html-attributes",
        "mj-html-attribute",
        "mj-selector",
        "mj-preview",
        "mj-style",
        "mj-title",
        "mj-include",
    }
)

EMAIL_KEYS = ("subject", "preheader")
WECHAT_KEYS = ("template_id", "data", "url", "miniprogram")
MINIPROGRAM_KEYS = ("appid", "pagepath")

_STR_TAG = "tag:yaml.org,2002:str"
# One piece of Jinja code: an expression, a statement or a comment. Quoted strings are skipped
# whole, so `{{ "}}" }}` is one piece.
_JINJA_CODE = re.compile(
    r"""\{\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[^"'}]|\}(?!\}))*\}\}"""
    r"""|\{%(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[^"'%]|%(?!\}))*%\}"""
    r"|\{#.*?#\}",
    re.S,
)
_MJ_TAG = re.compile(r"<(/?)(mjml|mj-[A-Za-z0-9-]*)((?:\"[^\"]*\"|'[^']*'|[^'\">])*?)(/?)>")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_MRML_POSITION = re.compile(r"\s*in root template(?: at position (\d+):(\d+))?")
_BODY_TAG = re.compile(r"<body\b[^>]*>", re.I)
# The hidden block MJML itself emits for <mj-preview>: inbox clients show it next to the subject.
_PREHEADER_DIV = (
    '<div style="display:none;font-size:1px;color:#ffffff;line-height:1px;max-height:0px;'
    'max-width:0px;opacity:0;overflow:hidden;">{}</div>'
)


class TemplateError(Exception):
    """A template could not be rendered: it has errors, or the data broke it at run time."""


@dataclass(frozen=True)
class RenderedMessage:
    """One message ready for a channel adapter; JSON-serialisable through ``to_dict``."""

    channel: str
    """``email``, ``sms`` or ``wechat``."""
    template: str
    """Template name, without locale or suffix."""
    locale: str | None
    """The locale variant used; ``None`` when the base file was used."""
    subject: str | None = None
    """Email subject line."""
    preheader: str | None = None
    """Email preview text shown next to the subject in the inbox."""
    html: str | None = None
    """Email HTML: MJML compiled, Jinja rendered."""
    text: str | None = None
    """SMS body; for email, a plain-text alternative derived from the HTML."""
    template_id: str | None = None
    """WeChat template id."""
    data: Mapping[str, str] | None = None
    """WeChat template fields, rendered."""
    url: str | None = None
    """WeChat link opened by the message."""
    miniprogram: Mapping[str, str] | None = None
    """WeChat mini program to open instead of ``url``: ``appid`` and ``pagepath``."""

    def searchable_text(self) -> str:
        """Everything a recipient reads, for scenario ``contains:`` checks."""
        parts: list[str | None]
        if self.channel == "wechat":
            parts = [*(self.data or {}).values(), self.url]
        else:
            parts = [self.subject, self.preheader, self.text]
        return "\n".join(part for part in parts if part)

    def preview(self, width: int = 80) -> str:
        """One short line for timelines."""
        if self.channel == "email":
            line = f"Subject: {self.subject or ''}"
        elif self.channel == "wechat":
            line = ", ".join(f"{key}: {value}" for key, value in (self.data or {}).items())
        else:
            line = self.text or ""
        line = " ".join(line.split())
        if len(line) <= width:
            return line
        return line[: max(width - 1, 0)].rstrip() + "…"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name != "locale":
                continue
            out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RenderedMessage:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RenderedMessage fields: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {name: data.get(name) for name in known}
        for name in ("data", "miniprogram"):
            if values[name] is not None:
                values[name] = dict(values[name])
        return cls(**values)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The Jinja sandbox, made loud about violations and friendly to dict-shaped data."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        # Jinja's default returns an Undefined, which ChainableUndefined prints as "" -- a probe
        # of internals must fail the render instead of passing silently.
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is not allowed"
        )

    def getattr(self, obj: Any, attribute: str) -> Any:
        # `event.properties.items` must be the property, not the bound dict.items method.
        if type(obj) is dict:
            # Template data is plain dicts, so they get a path without exceptions: a missing trait
            # is common, and the general path below raises and catches three times to find out.
            value = obj.get(attribute, _ABSENT)
            if value is not _ABSENT:
                return value
            if attribute not in _DICT_ATTRIBUTES:
                return self.undefined(obj=obj, name=attribute)
        elif isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
        return super().getattr(obj, attribute)


_ABSENT = object()
_DICT_ATTRIBUTES = frozenset(dir(dict))


def _default(value: Any, default_value: Any = "", boolean: bool = False) -> Any:
    """Jinja's ``default`` filter, which also replaces ``None`` (a null trait)."""
    if isinstance(value, jinja2.Undefined) or value is None or (boolean and not value):
        return default_value
    return value


def _finalize(value: Any) -> Any:
    return "" if value is None else value


def _environment(*, autoescape: bool, trim: bool) -> _Sandbox:
    env = _Sandbox(
        undefined=ChainableUndefined,
        autoescape=autoescape,
        finalize=_finalize,
        trim_blocks=trim,
        lstrip_blocks=trim,
    )
    env.filters["default"] = env.filters["d"] = _default
    return env


_TEXT_ENV = _environment(autoescape=False, trim=True)
_HTML_ENV = _environment(autoescape=True, trim=False)
# An email's text alternative comes from its HTML, where a newline after `{% endif %}` separates
# words as it does in the HTML: it must not be trimmed there.
_TEXT_ALT_ENV = _environment(autoescape=False, trim=False)
_ALLOWED_NAMES = frozenset(TEMPLATE_NAMES) | frozenset(_HTML_ENV.globals)


def _template(env: _Sandbox, source: str) -> jinja2.Template:
    """``env.from_string`` with the template's globals flattened into a plain dict.

    Jinja gives a template a ChainMap over the environment's globals and copies and iterates it
    into every render's context, which cost more than rendering a subject line. The two
    environments never change their globals, so a flat copy behaves the same.
    """
    template = env.from_string(source)
    template.globals = dict(template.globals)
    return template


_GLOBALS = dict(_HTML_ENV.globals)
"""Names every template sees besides the context (range, dict, ...); the same in both environments."""


def _render(template: jinja2.Template, values: dict[str, Any]) -> str:
    """``template.render(values)`` for ``values`` that already hold :data:`_GLOBALS`.

    ``render`` copies its argument and the globals into a new dict for every call; the parts of
    one message (subject, preheader, HTML, text; WeChat fields) share one such dict instead.
    Rendering never writes to it: ``{% set %}`` goes to each render's own context.
    """
    context = template.new_context(values, shared=True)
    try:
        return "".join(template.root_render_func(context))
    except Exception:
        template.environment.handle_exception()


@dataclass(frozen=True)
class _File:
    """One template file as read from disk."""

    label: str
    text: str
    digest: str


@dataclass(frozen=True)
class _FrontMatter:
    """Where the front matter and the body of an email template are in the file."""

    front: str
    front_line: int
    front_offset: int
    body: str
    body_line: int
    body_offset: int


@dataclass(frozen=True)
class _Email:
    subject: jinja2.Template
    preheader: jinja2.Template | None
    html: jinja2.Template
    text: jinja2.Template | None
    """The plain-text alternative as a template, or None to derive it from each rendered HTML."""


@dataclass(frozen=True)
class _Sms:
    text: jinja2.Template


@dataclass(frozen=True)
class _WeChat:
    template_id: str
    data: dict[str, jinja2.Template]
    url: jinja2.Template | None
    miniprogram: dict[str, jinja2.Template] | None


_Compiled = _Email | _Sms | _WeChat


class TemplateStore:
    """Templates under one root directory, checked and rendered with caching."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._directories = {channel: self.root / sub for channel, (sub, _) in CHANNELS.items()}
        self._files: dict[str, tuple[_Stamp, _File]] = {}
        self._listings: dict[Path, tuple[_Stamp, tuple[str, ...]]] = {}
        self._resolved: dict[tuple[str, str, str | None], tuple[tuple[str, ...] | None, Path, str | None]] = {}
        self._checked: dict[str, tuple[str, list[Diagnostic], list[TemplateRead]]] = {}
        self._mjml: dict[str, tuple[str, _Markup]] = {}
        self._compiled: dict[str, tuple[str, _Compiled]] = {}

    def names(self, channel: str) -> list[str]:
        """Base template names present for a channel (locale variants left out)."""
        directory, suffix = self._location(channel)
        return sorted(
            filename[: -len(suffix)]
            for filename in self._listing(directory)
            if filename.endswith(suffix)
            and not filename.startswith(".")
            and "." not in filename[: -len(suffix)]
        )

    def exists(self, channel: str, name: str) -> bool:
        return valid_name(name) and self.path(channel, name).is_file()

    def path(self, channel: str, name: str, locale: str | None = None) -> Path:
        """Where the file is or would be; the name is not validated (see ``exists``)."""
        directory, suffix = self._location(channel)
        middle = f".{locale}" if locale else ""
        return directory / f"{name}{middle}{suffix}"

    def locales(self, channel: str, name: str) -> list[str]:
        """Locales that have a variant of this template, as spelled in the file names."""
        directory, suffix = self._location(channel)
        prefix = f"{name}."
        found = []
        for filename in self._listing(directory):
            if filename.startswith(prefix) and filename.endswith(suffix):
                locale = filename[len(prefix) : -len(suffix)]
                if locale and "." not in locale:
                    found.append(locale)
        return sorted(found)

    def version(self, channel: str, name: str) -> str:
        """A short hash of the base file and every locale variant."""
        digest = hashlib.blake2b(digest_size=6)
        for path in [self.path(channel, name)] + [
            self.path(channel, name, locale) for locale in self.locales(channel, name)
        ]:
            digest.update(path.name.encode() + b"\0")
            try:
                digest.update(path.read_bytes())
            except OSError:
                digest.update(b"\0missing")
            digest.update(b"\0")
        return digest.hexdigest()

    def check(self, channel: str, name: str, *, sms_max_segments: int | None = None) -> list[Diagnostic]:
        """Every problem in the base file and each locale variant.

        With ``sms_max_segments``, an SMS file that needs more segments than that whatever the
        data (see :func:`nurture.language.sms.minimum_text`) gets a warning.
        """
        if not valid_name(name):
            return [Diagnostic(str(self.path(channel, name)), 0, 0, _INVALID_NAME.format(name))]
        paths = [self.path(channel, name)]
        paths += [self.path(channel, name, locale) for locale in self.locales(channel, name)]
        found: list[Diagnostic] = []
        for path in paths:
            file = self._file(path)
            if isinstance(file, Diagnostic):
                found.append(file)
                continue
            problems = self._check_file(channel, file)
            found.extend(problems)
            if channel == "sms" and sms_max_segments is not None and not problems:
                found.extend(_check_segments(file, sms_max_segments))
        return found

    def render(
        self,
        channel: str,
        name: str,
        context: Mapping[str, Any],
        *,
        locale: str | None = None,
    ) -> RenderedMessage:
        """Render for one recipient; ``locale`` picks ``zh-CN``, else ``zh``, else the base."""
        file, compiled, used = self._prepare(channel, name, locale)
        values = {**_GLOBALS, **context}
        try:
            if isinstance(compiled, _Email):
                return _render_email(compiled, values, name, used)
            if isinstance(compiled, _Sms):
                text = _render(compiled.text, values).strip()
                return RenderedMessage(channel="sms", template=name, locale=used, text=text)
            return _render_wechat(compiled, values, name, used)
        except SecurityError as exc:
            raise TemplateError(f"{file.label}: not allowed in a template: {exc}") from exc
        except Exception as exc:
            # Template code and recipient data can raise anything (TypeError, ZeroDivisionError,
            # UndefinedError...); the caller needs to know which template broke and why.
            raise TemplateError(f"{file.label}: could not render: {exc}") from exc

    def prepare(self, channel: str, name: str, *, locale: str | None = None) -> str | None:
        """Everything ``render`` does before it renders: the locale variant it would use.

        Raises :class:`TemplateError` as ``render`` does for a missing file or a template with
        errors; only failures that depend on the recipient's data need a real render.
        """
        return self._prepare(channel, name, locale)[2]

    def _prepare(self, channel: str, name: str, locale: str | None) -> tuple[_File, _Compiled, str | None]:
        if not valid_name(name):
            raise TemplateError(_INVALID_NAME.format(name))
        path, used = self._resolve(channel, name, locale)
        file = self._file(path)
        if isinstance(file, Diagnostic):
            raise TemplateError(file.headline())
        return file, self._compile(channel, file), used

    def _location(self, channel: str) -> tuple[Path, str]:
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}{did_you_mean(channel, CHANNELS)}")
        return self._directories[channel], CHANNELS[channel][1]

    def _resolve(self, channel: str, name: str, locale: str | None) -> tuple[Path, str | None]:
        """The file a render reads and its locale variant, kept until the directory changes."""
        listing = self._listing(self._location(channel)[0]) if locale else None
        cached = self._resolved.get((channel, name, locale))
        if cached is not None and cached[0] is listing:
            return cached[1], cached[2]
        path, used = self.path(channel, name), None
        if locale:
            wanted = _normalise_locale(locale)
            variants = {_normalise_locale(v): v for v in self.locales(channel, name)}
            for candidate in (wanted, wanted.split("-")[0]):
                if candidate in variants:
                    path, used = self.path(channel, name, variants[candidate]), variants[candidate]
                    break
        self._resolved[(channel, name, locale)] = (listing, path, used)
        return path, used

    def _file(self, path: Path) -> _File | Diagnostic:
        """The file as it is now, read again only when its ``os.stat`` changes."""
        label = str(path)
        try:
            info = os.stat(label)
        except OSError:
            return _read(path)  # reports the missing or unreadable file
        stamp = _stamp(info)
        cached = self._files.get(label)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        file = _read(path)
        if isinstance(file, _File) and _settled(info):
            self._files[label] = (stamp, file)
        else:
            self._files.pop(label, None)
        return file

    def _listing(self, directory: Path) -> tuple[str, ...]:
        """File names in ``directory``, listed again only when its ``os.stat`` changes."""
        try:
            info = os.stat(directory)
        except OSError:
            return ()
        stamp = _stamp(info)
        cached = self._listings.get(directory)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        names = tuple(_listdir(directory))
        if _settled(info):
            self._listings[directory] = (stamp, names)
        else:
            self._listings.pop(directory, None)
        return names

    def reads(self, channel: str, name: str) -> list[TemplateRead]:
        """Every read of ``user``, ``event`` and ``last_event`` in the base file and each locale
        variant, where it is written; a file that does not parse has none."""
        if not valid_name(name):
            return []
        found: list[TemplateRead] = []
        for path in [self.path(channel, name)] + [self.path(channel, name, v) for v in self.locales(channel, name)]:
            file = self._file(path)
            if not isinstance(file, Diagnostic):
                found.extend(self._checked_file(channel, file)[1])
        return found

    def _check_file(self, channel: str, file: _File) -> list[Diagnostic]:
        return list(self._checked_file(channel, file)[0])

    def _checked_file(self, channel: str, file: _File) -> tuple[list[Diagnostic], list[TemplateRead]]:
        cached = self._checked.get(file.label)
        if cached is not None and cached[0] == file.digest:
            return cached[1], cached[2]
        checker = _Checker(file)
        if channel == "email":
            self._check_email(checker)
        elif channel == "sms":
            checker.jinja(file.text, _TEXT_ENV, first_line=1, span=(0, len(file.text)))
        else:
            _check_wechat(checker)
        found = sorted(checker.found, key=lambda d: (d.line, d.column))
        self._checked[file.label] = (file.digest, found, checker.reads)
        return found, checker.reads

    def _check_email(self, checker: _Checker) -> None:
        parts = _split_front_matter(checker.file.text)
        if isinstance(parts, str):
            checker.add(1, 1, parts)
            return
        _check_front_matter(checker, parts)
        body = parts.body
        span = (parts.body_offset, len(checker.file.text))
        body_ok = checker.jinja(body, _HTML_ENV, first_line=parts.body_line, span=span)
        if not _check_mjml_tags(checker, parts) or not body_ok:
            # Jinja that does not parse is not set aside from the MJML, so mrml would only
            # report the same mistake again as invalid MJML somewhere after it.
            return
        try:
            markup = self._compile_mjml(checker.file, body)
        except _MjmlError as exc:
            checker.add_at(parts.body_offset + exc.offset, exc.message)
            return
        try:
            _HTML_ENV.parse(markup.html)
        except jinja2.TemplateSyntaxError as exc:
            if markup.copied:
                checker.add_at(
                    parts.body_offset + markup.copied[0].start,
                    f"MJML repeats this Jinja code elsewhere in the HTML (an mj-title is also "
                    f"the body's label) and the copy is not valid Jinja ({exc.message}); "
                    "keep each {% %} block inside one element",
                )
            else:
                checker.add_at(
                    parts.body_offset,
                    f"Jinja code does not survive MJML compilation ({exc.message}); "
                    "keep {{ }} and {% %} inside text or attribute values",
                )

    def _compile_mjml(self, file: _File, body: str) -> _Markup:
        cached = self._mjml.get(file.label)
        if cached is not None and cached[0] == file.digest:
            return cached[1]
        markup = _mjml_to_html(body)
        self._mjml[file.label] = (file.digest, markup)
        return markup

    def _compile(self, channel: str, file: _File) -> _Compiled:
        cached = self._compiled.get(file.label)
        if cached is not None and cached[0] == file.digest:
            return cached[1]
        errors = [d for d in self._check_file(channel, file) if d.severity == "error"]
        if errors:
            raise TemplateError(
                f"{file.label} has {len(errors)} error(s):\n" + "\n".join(d.headline() for d in errors)
            )
        compiled: _Compiled
        if channel == "email":
            parts = _split_front_matter(file.text)
            assert isinstance(parts, _FrontMatter)  # check() passed
            front = yaml.safe_load(parts.front)
            preheader = front.get("preheader")
            markup = self._compile_mjml(file, parts.body)
            compiled = _Email(
                subject=_template(_TEXT_ENV, front["subject"]),
                preheader=None if preheader is None else _template(_TEXT_ENV, preheader),
                html=_template(_HTML_ENV, markup.html),
                text=_text_template(markup.text),
            )
        elif channel == "sms":
            compiled = _Sms(text=_template(_TEXT_ENV, file.text))
        else:
            spec = yaml.safe_load(file.text)
            mini = spec.get("miniprogram")
            compiled = _WeChat(
                template_id=spec["template_id"],
                data={key: _template(_TEXT_ENV, value) for key, value in spec["data"].items()},
                url=_template(_TEXT_ENV, spec["url"]) if "url" in spec else None,
                miniprogram=None
                if mini is None
                else {key: _template(_TEXT_ENV, value) for key, value in mini.items()},
            )
        self._compiled[file.label] = (file.digest, compiled)
        return compiled


def _check_segments(file: _File, limit: int) -> list[Diagnostic]:
    """A warning when the SMS text needs more than ``limit`` segments even with empty data."""
    shortest = minimum_text(_TEXT_ENV.parse(file.text))
    least = sms_info(shortest)
    if least.segments <= limit:
        return []
    message = (
        f"at least {least.segments} SMS segments ({least.encoding}, {least.characters} characters); "
        f"the project allows {limit} (sms_max_segments in nurture.yaml)"
    )
    if least.encoding == "UCS-2":
        forcing = non_gsm7(shortest)
        if sum(shortest.count(char) for char in forcing) <= 3:
            # A stray curly quote or dash makes a Latin text UCS-2, which holds less than half.
            listed = ", ".join(repr(char) for char in forcing)
            message += f"; only {listed} keep{'s' if len(forcing) == 1 else ''} it from GSM-7"
    return [Diagnostic(file.label, 1, 1, message, severity="warning")]


def _render_email(compiled: _Email, values: dict[str, Any], name: str, locale: str | None) -> RenderedMessage:
    subject = " ".join(_render(compiled.subject, values).split())
    preheader = None
    if compiled.preheader is not None:
        preheader = " ".join(_render(compiled.preheader, values).split())
    body = _render(compiled.html, values)
    text = html_to_text(body) if compiled.text is None else _tidy(_render(compiled.text, values))
    if preheader:
        hidden = _PREHEADER_DIV.format(html.escape(preheader))
        match = _BODY_TAG.search(body)
        at = match.end() if match else 0
        body = body[:at] + hidden + body[at:]
    return RenderedMessage(
        channel="email",
        template=name,
        locale=locale,
        subject=subject,
        preheader=preheader,
        html=body,
        text=text,
    )


def _render_wechat(
    compiled: _WeChat, values: dict[str, Any], name: str, locale: str | None
) -> RenderedMessage:
    mini = compiled.miniprogram
    return RenderedMessage(
        channel="wechat",
        template=name,
        locale=locale,
        template_id=compiled.template_id,
        data={key: _render(tpl, values).strip() for key, tpl in compiled.data.items()},
        url=None if compiled.url is None else _render(compiled.url, values).strip(),
        miniprogram=None if mini is None else {key: _render(tpl, values).strip() for key, tpl in mini.items()},
    )


_INVALID_NAME = "invalid template name {!r}: use letters, digits, '-' and '_' only"


def valid_name(name: str) -> bool:
    # A dot would be read as a locale; slashes would leave the store.
    return bool(name) and "." not in name and "/" not in name and "\\" not in name


def name_in_path(written: str) -> str:
    """The template name a file path points at: ``email/welcome.zh-CN.mjml`` is ``welcome``."""
    return written.replace("\\", "/").rsplit("/", 1)[-1].split(".", 1)[0]


_Stamp = tuple[int, int, int]

_RACY_NS = 2_000_000_000
"""File systems stamp modifications coarsely (a few ms; 1-2 s on some), so a file changed this
recently could change again without its stat changing: its content is not cached yet."""


def _stamp(info: os.stat_result) -> _Stamp:
    # The inode catches an editor's save-as-new-file-and-rename; mtime and size catch the rest.
    return info.st_ino, info.st_mtime_ns, info.st_size


def _settled(info: os.stat_result) -> bool:
    return time.time_ns() - info.st_mtime_ns >= _RACY_NS


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _normalise_locale(locale: str) -> str:
    return locale.replace("_", "-").lower()


def _read(path: Path) -> _File | Diagnostic:
    label = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Diagnostic(label, 0, 0, "template file not found: create it or fix the name")
    except OSError as exc:
        return Diagnostic(label, 0, 0, f"cannot read template: {exc.strerror}")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return Diagnostic(label, 0, 0, "template is not UTF-8 text: save it as UTF-8")
    return _File(label, text, hashlib.blake2b(data, digest_size=16).hexdigest())


@dataclass(frozen=True)
class TemplateRead:
    """A read of ``user``, ``event`` or ``last_event`` in a template file, and where it is."""

    read: Read
    path: str
    line: int
    columns: tuple[int, ...]
    """Where each key of the read is written (``first_name`` of ``user.first_name``)."""


class _Checker:
    """Collects diagnostics for one file and maps offsets in it to lines and columns."""

    def __init__(self, file: _File) -> None:
        self.file = file
        self.found: list[Diagnostic] = []
        self.reads: list[TemplateRead] = []
        self._lines = file.text.splitlines()

    def add(self, line: int, column: int, message: str, key: str = "") -> None:
        self.found.append(Diagnostic(self.file.label, line, column, message, key=key))

    def add_at(self, offset: int, message: str, key: str = "") -> None:
        self.add(*self.position(offset), message, key=key)

    def position(self, offset: int) -> tuple[int, int]:
        text = self.file.text
        line = text.count("\n", 0, offset) + 1
        return line, offset - (text.rfind("\n", 0, offset) + 1) + 1

    def jinja(self, source: str, env: jinja2.Environment, *, first_line: int, span: tuple[int, int]) -> bool:
        """Check Jinja text that starts at ``first_line`` and sits at ``span`` in the file.

        Returns whether the text parsed, so callers can skip checks that would only repeat it.
        """
        region = self.file.text[span[0] : span[1]]
        try:
            ast = env.parse(source)
        except jinja2.TemplateSyntaxError as exc:
            opened = _open_block(source) if "Unexpected end of template" in (exc.message or "") else None
            if opened is not None:
                tag, code = opened
                # Jinja only notices at the end of the file; the mistake is where the block opened.
                self.add_at(
                    span[0] + max(region.find(code), 0),
                    f"Jinja syntax error: this {{% {tag} %}} is never closed: add {{% end{tag} %}} where it ends",
                )
                return False
            line = min(first_line + (exc.lineno or 1) - 1, max(len(self._lines), 1))
            self.add(line, self._code_column(line), f"Jinja syntax error: {exc.message}")
            return False
        self._check_filters(ast, env, first_line)
        for read, lineno in _reads(ast):
            line = first_line + lineno - 1
            text = self._lines[line - 1] if 1 <= line <= len(self._lines) else ""
            columns = []
            for index in range(len(read.keys)):
                found = read.pattern(index).search(text)
                columns.append(found.start(1) + 1 if found else self._code_column(line))
            self.reads.append(TemplateRead(read, self.file.label, line, tuple(columns) or (self._code_column(line),)))
        try:
            undeclared = meta.find_undeclared_variables(ast)
        except jinja2.TemplateAssertionError as exc:
            line = first_line + (exc.lineno or 1) - 1
            self.add(line, self._code_column(line), f"Jinja error: {exc.message}")
            return True
        for name in sorted(undeclared - _ALLOWED_NAMES):
            hint = did_you_mean(name, TEMPLATE_NAMES)
            if not hint:
                hint = ": templates can use only user, event, last_event, journey and unsubscribe_url"
            self.add_at(span[0] + _find_name(region, name), f"unknown name '{name}'{hint}")
        loaders = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
        for node in ast.find_all(loaders):
            tag = type(node).__name__.lower().replace("fromimport", "from")
            self.add(
                first_line + node.lineno - 1,
                1,
                f"{{% {tag} %}} is not available in message templates: copy the shared part into this file",
            )
        return True

    def _check_filters(self, ast: nodes.Template, env: jinja2.Environment, first_line: int) -> None:
        """Report filters and tests the environment does not have, at their names.

        An unknown one is then renamed in this throwaway tree, so that the name check that
        follows (which compiles the tree) still runs instead of stopping at it.
        """
        for node in ast.find_all((nodes.Filter, nodes.Test)):
            kind, table = ("filter", env.filters) if isinstance(node, nodes.Filter) else ("test", env.tests)
            if node.name in table:
                continue
            hint = did_you_mean(node.name, table) or f"; {kind}s: {', '.join(sorted(table))}"
            line = first_line + node.lineno - 1
            text = self._lines[line - 1] if 1 <= line <= len(self._lines) else ""
            lead = r"(?:\|\s*|\bfilter\s+)" if kind == "filter" else r"\bis\s+(?:not\s+)?"
            found = re.search(rf"{lead}({re.escape(node.name)})\b", text)
            column = found.start(1) + 1 if found else self._code_column(line)
            self.add(line, column, f"unknown {kind} '{node.name}'{hint}")
            node.name = "string" if kind == "filter" else "defined"

    def _code_column(self, line: int) -> int:
        if not 1 <= line <= len(self._lines):
            return 1
        text = self._lines[line - 1]
        starts = [i for i in (text.find("{{"), text.find("{%")) if i >= 0]
        if starts:
            return min(starts) + 1
        return len(text) - len(text.lstrip()) + 1


def _reads(ast: nodes.Node) -> list[tuple[Read, int]]:
    """Reads of ``user``, ``event`` and ``last_event`` in a Jinja tree, each as long as written,
    with its line in the parsed text. A read through another name (``{% set u = user %}``) is
    not followed."""
    found: list[tuple[Read, int]] = []

    def visit(node: nodes.Node) -> None:
        if isinstance(node, (nodes.Getattr, nodes.Getitem)):
            keys: list[str | int | None] = []
            current: nodes.Node = node
            while isinstance(current, (nodes.Getattr, nodes.Getitem)):
                if isinstance(current, nodes.Getattr):
                    keys.append(current.attr)
                else:
                    arg = current.arg
                    if isinstance(arg, nodes.Const) and type(arg.value) in (str, int):
                        keys.append(arg.value)
                    else:
                        keys.append(None)
                        visit(arg)
                current = current.node
            if isinstance(current, nodes.Name) and current.name in READ_ROOTS:
                found.append((Read(current.name, tuple(reversed(keys))), node.lineno))
            else:
                visit(current)
            return
        for child in node.iter_child_nodes():
            visit(child)

    visit(ast)
    return found


_BLOCK_TAG = re.compile(r"\{%[-+]?\s*(\w+)")
_BLOCK_TAGS = frozenset({"if", "for", "macro", "call", "filter", "set", "block", "with", "autoescape"})


def _open_block(source: str) -> tuple[str, str] | None:
    """The innermost block tag of ``source`` that is never closed, and its code as written."""
    open_blocks: list[tuple[str, str]] = []
    raw = False
    for match in _JINJA_CODE.finditer(source):
        code = match.group()
        tag_match = _BLOCK_TAG.match(code)
        if tag_match is None:
            continue
        tag = tag_match.group(1)
        if raw:
            raw = tag != "endraw"
        elif tag == "raw":
            raw = True
        elif tag in _BLOCK_TAGS and not (tag == "set" and "=" in code):
            open_blocks.append((tag, code))
        elif tag.startswith("end") and any(name == tag[3:] for name, _ in open_blocks):
            while open_blocks.pop()[0] != tag[3:]:
                pass
    return open_blocks[-1] if open_blocks else None


def _find_name(region: str, name: str) -> int:
    """Offset in ``region`` of the first use of ``name`` inside Jinja delimiters."""
    token = re.compile(rf"(?<![\w.]){re.escape(name)}\b")
    for span in _JINJA_CODE.finditer(region):
        if span.group().startswith("{#"):
            continue
        found = token.search(span.group())
        if found:
            return span.start() + found.start()
    return 0


def _split_front_matter(text: str) -> _FrontMatter | str:
    """Split an email template, or say what is wrong with its front matter."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return (
            "email template needs YAML front matter with a subject: start the file with a "
            "'---' line, then 'subject: ...', then another '---' line"
        )
    for index in range(1, len(lines)):
        if lines[index].rstrip() == "---":
            body_offset = sum(len(line) for line in lines[: index + 1])
            return _FrontMatter(
                front="".join(lines[1:index]),
                front_line=2,
                front_offset=len(lines[0]),
                body=text[body_offset:],
                body_line=index + 2,
                body_offset=body_offset,
            )
    return "front matter is not closed: add a '---' line after the subject and preheader"


def _yaml_root(checker: _Checker, source: str, first_line: int, what: str) -> yaml.Node | None:
    """Compose YAML, reporting a syntax error at its place in the file."""
    try:
        return yaml.compose(source, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = first_line + (mark.line if mark else 0)
        column = mark.column + 1 if mark else 1
        hint = ""
        if "{{" in source or "{%" in source:
            hint = "; a value that starts with {{ or contains ': ' must be quoted"
        checker.add(line, column, f"{what} is not valid YAML: {exc.problem}{hint}")
    except yaml.YAMLError as exc:
        checker.add(first_line, 1, f"{what} is not valid YAML: {exc}")
    return None


def _mapping_items(
    checker: _Checker, node: yaml.MappingNode, allowed: tuple[str, ...], base: int, prefix: str
) -> dict[str, yaml.Node]:
    """Known keys of a mapping node; unknown and duplicate keys are reported."""
    items: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        where = base + key_node.start_mark.index
        if key in items:
            checker.add_at(where, f"duplicate key '{key}': keep only one", prefix.rstrip("."))
        elif allowed and key not in allowed:
            hint = did_you_mean(key, allowed) or f": use {', '.join(allowed)}"
            checker.add_at(where, f"unknown key '{key}'{hint}", prefix.rstrip("."))
        else:
            items[key] = value_node
    return items


def _text_value(checker: _Checker, node: yaml.Node, base: int, key: str, *, jinja: bool = True) -> None:
    """Check that a YAML value is text and, if ``jinja``, valid Jinja."""
    where = base + node.start_mark.index
    if not isinstance(node, yaml.ScalarNode) or node.tag != _STR_TAG:
        raw = checker.file.text[where : where + 2]
        hint = "; quote it" if isinstance(node, yaml.ScalarNode) or raw == "{{" else ""
        checker.add_at(where, f"must be text{hint}", key)
        return
    if jinja:
        line, _ = checker.position(where)
        span = (where, base + node.end_mark.index)
        checker.jinja(str(node.value), _TEXT_ENV, first_line=line, span=span)


def _check_front_matter(checker: _Checker, parts: _FrontMatter) -> None:
    before = len(checker.found)
    root = _yaml_root(checker, parts.front, parts.front_line, "front matter")
    if len(checker.found) > before:
        return
    base = parts.front_offset
    if root is not None and not isinstance(root, yaml.MappingNode):
        checker.add_at(base + root.start_mark.index, "front matter must be keys like 'subject: …'")
        return
    items = _mapping_items(checker, root, EMAIL_KEYS, base, "") if root else {}
    if "subject" not in items:
        checker.add(1, 1, "front matter needs a subject: add 'subject: …' between the '---' lines")
    for key, value in items.items():
        _text_value(checker, value, base, key)


def _check_wechat(checker: _Checker) -> None:
    before = len(checker.found)
    root = _yaml_root(checker, checker.file.text, 1, "WeChat template")
    if len(checker.found) > before:
        return
    if root is None:
        checker.add(1, 1, "WeChat template is empty: add template_id and data")
        return
    if not isinstance(root, yaml.MappingNode):
        checker.add_at(root.start_mark.index, "WeChat template must be keys: template_id, data")
        return
    items = _mapping_items(checker, root, WECHAT_KEYS, 0, "")
    for required, example in (("template_id", "<id from the WeChat console>"), ("data", "…")):
        if required not in items:
            checker.add(1, 1, f"'{required}' is required: add '{required}: {example}'")
    if "template_id" in items:
        _text_value(checker, items["template_id"], 0, "template_id", jinja=False)
    if "url" in items:
        _text_value(checker, items["url"], 0, "url")
    data = items.get("data")
    if data is not None:
        if not isinstance(data, yaml.MappingNode) or not data.value:
            msg = "must map each template field to its text, e.g. 'first: Hi {{ user.id }}'"
            checker.add_at(data.start_mark.index, msg, "data")
        else:
            for key, node in _mapping_items(checker, data, (), 0, "data.").items():
                _text_value(checker, node, 0, f"data.{key}")
    mini = items.get("miniprogram")
    if mini is not None:
        if not isinstance(mini, yaml.MappingNode):
            checker.add_at(mini.start_mark.index, "needs appid and pagepath", "miniprogram")
            return
        found = _mapping_items(checker, mini, MINIPROGRAM_KEYS, 0, "miniprogram.")
        for key in MINIPROGRAM_KEYS:
            if key in found:
                _text_value(checker, found[key], 0, f"miniprogram.{key}", jinja=key == "pagepath")
            else:
                checker.add_at(mini.start_mark.index, f"needs {key}", "miniprogram")


def _check_mjml_tags(checker: _Checker, parts: _FrontMatter) -> bool:
    """Report unknown and unbalanced ``mj-`` tags; False when the structure is broken."""
    # Blank out comments, keeping offsets, so commented-out markup is ignored.
    body = _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), parts.body)
    base = parts.body_offset
    open_tags: list[tuple[str, int]] = []
    balanced = True
    for match in _MJ_TAG.finditer(body):
        closing, tag, self_closing = match.group(1), match.group(2), match.group(4)
        where = base + match.start()
        if not closing and tag not in MJML_TAGS:
            close = difflib.get_close_matches(tag, sorted(MJML_TAGS), n=1, cutoff=0.6)
            hint = f" (did you mean <{close[0]}>?)" if close else ""
            checker.add_at(where, f"unknown MJML tag <{tag}>{hint}")
        if self_closing:
            continue
        if not closing:
            open_tags.append((tag, where))
            continue
        if not any(name == tag for name, _ in open_tags):
            checker.add_at(where, f"</{tag}> closes nothing: no <{tag}> is open here")
            balanced = False
            continue
        while open_tags[-1][0] != tag:
            name, opened = open_tags.pop()
            checker.add_at(opened, f"<{name}> is not closed: add </{name}> before </{tag}>")
            balanced = False
        open_tags.pop()
    for name, opened in open_tags:
        checker.add_at(opened, f"<{name}> is not closed: add </{name}>")
        balanced = False
    return balanced


class _MjmlError(Exception):
    """MJML that does not compile, with the offset in the MJML body to report it at."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


@dataclass(frozen=True)
class _Code:
    """One piece of Jinja code in MJML, and the placeholder that stands in for it."""

    source: str
    start: int
    """Offset in the MJML body."""
    placeholder: str
    at: int
    """Offset of the placeholder in the protected MJML."""
    optional: bool
    """Inside an HTML comment, which mrml may drop."""


@dataclass(frozen=True)
class _Protected:
    """MJML with its Jinja code replaced by placeholders mrml leaves alone."""

    text: str
    codes: tuple[_Code, ...]
    pattern: re.Pattern[str]
    """Matches any placeholder; group 1 is its index in ``codes``."""

    def restore(self, text: str) -> str:
        return self.pattern.sub(lambda match: self.codes[int(match.group(1))].source, text)

    def body_offset(self, offset: int) -> int:
        """Where an offset in the protected MJML falls in the original body."""
        shift = 0
        for code in self.codes:
            if offset < code.at:
                break
            end = code.at + len(code.placeholder)
            if offset < end:
                return code.start
            shift = code.start + len(code.source) - end
        return offset + shift


@dataclass(frozen=True)
class _Markup:
    """Compiled MJML: HTML holding the template's Jinja code as written."""

    html: str
    text: str
    """The plain-text alternative with the Jinja code. Parsing HTML costs far more than rendering
    Jinja, so it is derived once, from the HTML with the Jinja still protected: markup or quotes
    inside Jinja strings are not taken for HTML."""
    copied: tuple[_Code, ...]
    """Jinja code that mrml wrote more than once (e.g. an mj-title is also an aria-label)."""


def _protect(body: str) -> _Protected:
    """Replace each piece of Jinja code by a placeholder of letters and digits.

    mrml treats Jinja as text: with inlined CSS it re-serialises the HTML and escapes '>' and '&'
    inside `{% if n > 1 %}`, and a '<' or a quote inside Jinja breaks its parser. A placeholder
    carries none of these; an index ends with 'z' so that no placeholder is a prefix of another.
    """
    prefix = "nurturejinja"
    while prefix in body:
        prefix += "x"
    comments = [match.span() for match in _COMMENT.finditer(body)]
    pieces: list[str] = []
    codes: list[_Code] = []
    at = last = 0
    for index, match in enumerate(_JINJA_CODE.finditer(body)):
        text = body[last : match.start()]
        pieces.append(text)
        at += len(text)
        placeholder = f"{prefix}{index}z"
        optional = any(start <= match.start() < end for start, end in comments)
        codes.append(_Code(match.group(), match.start(), placeholder, at, optional))
        pieces.append(placeholder)
        at += len(placeholder)
        last = match.end()
    pieces.append(body[last:])
    return _Protected("".join(pieces), tuple(codes), re.compile(rf"{prefix}(\d+)z"))


def _mjml_to_html(body: str) -> _Markup:
    """Compile MJML to HTML with its Jinja code intact; raises :class:`_MjmlError`."""
    protected = _protect(body)
    try:
        compiled = mrml.to_html(protected.text).content
    except OSError as exc:
        raise _mrml_error(protected, str(exc)) from None
    found = Counter(int(match.group(1)) for match in protected.pattern.finditer(compiled))
    for index, code in enumerate(protected.codes):
        if not found[index] and not code.optional:
            raise _MjmlError(
                f"MJML compilation drops this Jinja code ({_shorten(code.source)}): use Jinja "
                "only in text and in attribute values MJML keeps as written (href, src, alt)",
                code.start,
            )
    copied = tuple(code for index, code in enumerate(protected.codes) if found[index] > 1)
    text = protected.restore(html_to_text(compiled, jinja=protected.pattern))
    return _Markup(protected.restore(compiled), text, copied)


def _mrml_error(protected: _Protected, message: str) -> _MjmlError:
    position = _MRML_POSITION.search(message)
    offset = 0
    if position:
        message = message[: position.start()] + message[position.end() :]
        if position.group(1):
            # mrml counts bytes of the MJML it was given.
            text = protected.text
            prefix = text.encode()[: int(position.group(1))].decode("utf-8", "ignore")
            rest = text[len(prefix) :]
            # A text token starts with the whitespace before it; point at the text itself.
            offset = protected.body_offset(len(prefix) + len(rest) - len(rest.lstrip()))
    message = protected.restore(message)
    if "parse" in message:
        message += " (write a literal '<' in text as &lt;, and quote every attribute value)"
    elif "include" in message:
        message += " (mj-include is not supported: copy the shared part into this file)"
    return _MjmlError(f"invalid MJML: {message}", offset)


def _shorten(source: str, width: int = 40) -> str:
    line = " ".join(source.split())
    return line if len(line) <= width else line[: width - 1] + "…"


class _TextExtractor(HTMLParser):
    """Readable text from email HTML: no head or styles, links kept as ``text (url)``."""

    _SKIP = frozenset({"head", "style", "script", "title"})
    _BLOCK = frozenset(
        {"p", "div", "br", "tr", "table", "li", "ul", "ol", "hr", "section", "blockquote"}
        | {f"h{n}" for n in range(1, 7)}
    )

    def __init__(self, jinja: re.Pattern[str] | None = None) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0
        self._links: list[tuple[str | None, int]] = []
        self._jinja = jinja

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")
        elif tag == "td":
            self.parts.append(" ")
        elif tag == "a":
            self._links.append((dict(attrs).get("href"), len(self.parts)))
        elif tag == "img" and self._links and not self._skipping:
            # A linked logo or banner reads as its alt text, e.g. "Shop (https://…)".
            self.parts.append(dict(attrs).get("alt") or "")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.handle_starttag(tag, attrs)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(self._skipping - 1, 0)
        elif tag in self._BLOCK:
            self.parts.append("\n")
        elif tag == "a" and self._links:
            href, start = self._links.pop()
            if href and self._jinja is not None and self._jinja.search(href):
                # The address is known only once rendered ({{ unsubscribe_url }}), so the text
                # template decides then, by the same rule, whether and how the link is shown.
                self.parts.insert(start, "{% set nurture_label %}")
                self.parts.append(
                    f"{{% endset %}}{{% filter nurture_link(nurture_label) %}}{href}{{% endfilter %}}"
                )
                return
            self.parts.append(_link_suffix("".join(self.parts[start:]), href))

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def _link_suffix(label: str, href: str | None) -> str:
    """What follows a link's label in text: its address in brackets, unless the label is the
    address or the address is not a web link (mailto:, an empty ``{{ unsubscribe_url }}``)."""
    label = " ".join(label.split())
    href = (href or "").strip()
    if not href.startswith(("http://", "https://")) or href == label:
        return ""
    return f" ({href})" if label else f" {href} "


def _rendered_link(href: str, label: str) -> str:
    """The ``nurture_link`` filter: a link of the text alternative once its address is rendered."""
    return label + _link_suffix(label, href)


_TEXT_ALT_ENV.filters["nurture_link"] = _rendered_link


def html_to_text(markup: str, *, jinja: re.Pattern[str] | None = None) -> str:
    """A plain-text alternative for an HTML email.

    ``jinja`` matches the placeholders of Jinja code still in ``markup``; a link whose address
    holds one is written as Jinja that applies the link rule to the rendered address.
    """
    parser = _TextExtractor(jinja)
    parser.feed(markup)
    parser.close()
    return _tidy("".join(parser.parts))


def _tidy(text: str) -> str:
    """Whitespace runs as one space, no blank space at line ends, at most one empty line in a row."""
    # map() and str.replace keep the work in C: this runs for every email, and a list
    # comprehension with re.sub cost a third more.
    text = "\n".join(map(" ".join, map(str.split, text.splitlines())))
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


def _text_template(text: str) -> jinja2.Template | None:
    """The text alternative as a template; None when its Jinja does not parse (a block that
    starts in text and ends in markup the text leaves out), and each render derives the text."""
    try:
        return _template(_TEXT_ALT_ENV, text)
    except jinja2.TemplateSyntaxError:
        return None
