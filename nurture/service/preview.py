"""Rendering one template for one sample user and event, as a journey would send it.

``nurture preview`` and the console's preview page both render through here, so they show the
same thing. The context is built by the engine's own
:func:`nurture.delivery.deliverer.render_context`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from nurture.delivery.deliverer import render_context
from nurture.engine.clock import format_instant
from nurture.engine.model import Profile, SendRequest
from nurture.language.compiler import Settings
from nurture.language.diagnostics import format_all
from nurture.language.templates import RenderedMessage, TemplateError, TemplateStore

from .settings import Settings as ServiceSettings


class PreviewError(Exception):
    """The template cannot be rendered; the message shows the errors in the file, with places."""


PREVIEW_LINK_BASE = "https://nurture.example"
"""Where the preview's unsubscribe link points when NURTURE_PUBLIC_URL and NURTURE_SECRET are unset."""


def preview_context(
    profile: Profile, event: Mapping[str, Any], channel: str, name: str, settings: Settings
) -> dict[str, Any]:
    """The render context of a send of ``name`` in a run triggered by ``event``."""
    journey = {"id": "preview", "key": profile.user_id, "entered_at": format_instant(datetime.now(UTC))}
    request = SendRequest(
        run_id="preview",
        journey="preview",
        version="",
        step_id="preview",
        user_id=profile.user_id,
        channels=(channel,),
        template=name,
        category="marketing",
        timezone=settings.timezone,
        quiet_hours=settings.quiet_hours,
        variant=None,
        context={"event": dict(event), "last_event": dict(event) or None, "journey": journey},
    )
    links = ServiceSettings.from_env().unsubscribe_links()
    url = links.url(profile.user_id, channel) if links is not None else f"{PREVIEW_LINK_BASE}/u/preview"
    return render_context(request, profile, unsubscribe_url=url)


def render_template(
    store: TemplateStore, channel: str, name: str, context: dict[str, Any], locale: str | None
) -> RenderedMessage:
    """Render ``channel/name`` in ``locale`` (or its base file); :class:`PreviewError` when it fails."""
    try:
        return store.render(channel, name, context, locale=locale)
    except TemplateError as exc:
        # Errors in the file are shown with their place in it; data errors as the render says.
        try:
            used = store.path(channel, name, store.prepare(channel, name, locale=locale))
        except TemplateError:
            used = None
        errors = [
            d for d in store.check(channel, name) if d.severity == "error" and d.path == str(used)
        ]
        raise PreviewError(format_all(errors) if errors else str(exc)) from None


def locale_line(store: TemplateStore, message: RenderedMessage, wanted: str | None) -> str:
    """Which file was rendered: the locale variant, or the base file and why."""
    used = store.path(message.channel, message.template, message.locale)
    if message.locale:
        return f"{message.locale} ({used})"
    if wanted:
        return f"base file, no '{wanted}' variant ({used})"
    return f"base file ({used})"
