"""The adapter behind each channel, built from ``providers:`` and the environment.

:mod:`nurture.language.providers` says *what* ``nurture.yaml`` chose; this module knows which
secrets each provider reads from the environment (:func:`required_env`), builds the adapters for
the worker (:func:`build_channels`) and says what works less well with the environment as it is
(:func:`advisories`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nurture.language.providers import ProvidersDoc, sender_address, sender_name

if TYPE_CHECKING:
    from channels import Channel
    from nurture.storage.db import Database

# What each provider reads from the environment: (variable, required, what it is).
ENV: dict[str, tuple[tuple[str, bool, str], ...]] = {
    "sendgrid": (
        ("SENDGRID_API_KEY", True, "SendGrid API key with Mail Send permission"),
        ("SENDGRID_API_URL", False, "API host, for a proxy or a test server"),
    ),
    "smtp": (
        ("SMTP_HOST", True, "SMTP server host"),
        ("SMTP_PORT", False, "port (default 587)"),
        ("SMTP_USERNAME", False, "login, with SMTP_PASSWORD"),
        ("SMTP_PASSWORD", False, "password"),
        ("SMTP_SECURITY", False, "starttls (default), ssl or none"),
    ),
    "twilio": (
        ("TWILIO_ACCOUNT_SID", True, "account SID (AC...)"),
        ("TWILIO_AUTH_TOKEN", True, "auth token; also checks the webhooks' signatures"),
        ("TWILIO_API_URL", False, "API base URL, for a proxy or a test server"),
    ),
    "wechat": (
        ("WECHAT_APP_ID", True, "Official Account AppID"),
        ("WECHAT_APP_SECRET", True, "Official Account AppSecret"),
        ("WECHAT_API_URL", False, "API base URL (default https://api.weixin.qq.com)"),
    ),
}
# Marketing email carries a signed one-click unsubscribe link, so real email needs both.
LINK_ENV = (
    ("NURTURE_PUBLIC_URL", "public base URL of the event API (unsubscribe links, webhooks)"),
    ("NURTURE_SECRET", "secret that signs unsubscribe links"),
)


def required_env(providers: ProvidersDoc, env: Mapping[str, str]) -> list[str]:
    """One line per missing environment variable a configured provider needs (empty: all set)."""
    missing: list[str] = []
    for channel, provider in providers.configured().items():
        for name, required, what in ENV[provider]:
            if required and not _value(env, name):
                missing.append(f"{name} ({what}): needed because nurture.yaml sends {channel} via {provider}")
        if channel == "email":
            for name, what in LINK_ENV:
                if not _value(env, name):
                    missing.append(f"{name} ({what}): needed because nurture.yaml sends email via {provider}")
    if providers.email.provider == "smtp" and bool(_value(env, "SMTP_USERNAME")) != bool(
        _value(env, "SMTP_PASSWORD")
    ):
        missing.append("SMTP_USERNAME and SMTP_PASSWORD go together: set both or neither")
    return missing


@dataclass
class Channels:
    """The adapter for each channel, and what to close when the worker stops."""

    by_channel: dict[str, Channel]
    closers: list[Any] = field(default_factory=list)

    async def aclose(self) -> None:
        for closer in self.closers:
            await closer()


def build_channels(
    providers: ProvidersDoc, env: Mapping[str, str], *, db: Database, outbox: Channel
) -> Channels:
    """Adapters for ``providers`` configured from ``env``; ``outbox`` serves the other channels.

    Raises :class:`ValueError` naming every missing variable (see :func:`required_env`).
    """
    missing = required_env(providers, env)
    if missing:
        raise ValueError("missing provider settings:\n  " + "\n  ".join(missing))
    chosen: dict[str, Channel] = {"email": outbox, "sms": outbox, "wechat": outbox}
    closers: list[Any] = []
    public_url = _value(env, "NURTURE_PUBLIC_URL").rstrip("/")
    if providers.email.provider == "sendgrid":
        from channels.sendgrid import SendGridEmail

        chosen["email"] = SendGridEmail(
            api_key=_value(env, "SENDGRID_API_KEY"),
            from_email=sender_address(providers.email.sender),
            from_name=sender_name(providers.email.sender),
            reply_to=providers.email.reply_to,
            host=_value(env, "SENDGRID_API_URL") or None,
        )
    elif providers.email.provider == "smtp":
        from channels.smtp import SmtpEmail

        security = _value(env, "SMTP_SECURITY").lower() or "starttls"
        if security not in ("starttls", "ssl", "none"):
            raise ValueError(f"SMTP_SECURITY must be starttls, ssl or none, got {security!r}")
        port = _value(env, "SMTP_PORT")
        if port and not port.isdigit():
            raise ValueError(f"SMTP_PORT must be a port number, got {port!r}")
        chosen["email"] = SmtpEmail(
            host=_value(env, "SMTP_HOST"),
            port=int(port) if port else (465 if security == "ssl" else 587),
            username=_value(env, "SMTP_USERNAME") or None,
            password=_value(env, "SMTP_PASSWORD") or None,
            security=security,  # type: ignore[arg-type]  # checked just above
            from_address=providers.email.sender or "",
            reply_to=providers.email.reply_to,
        )
    if providers.sms.provider == "twilio":
        from channels.twilio import TwilioSms

        chosen["sms"] = TwilioSms(
            account_sid=_value(env, "TWILIO_ACCOUNT_SID"),
            auth_token=_value(env, "TWILIO_AUTH_TOKEN"),
            from_number=providers.sms.sender,
            messaging_service_sid=providers.sms.messaging_service,
            status_callback=f"{public_url}/webhooks/twilio/status" if public_url else None,
            base_url=_value(env, "TWILIO_API_URL") or None,
        )
    if providers.wechat.provider == "wechat":
        from channels.wechat import DEFAULT_URL as DEFAULT_WECHAT_URL
        from channels.wechat import WeChatTemplate
        from nurture.storage.tokens import DbTokens

        wechat = WeChatTemplate(
            app_id=_value(env, "WECHAT_APP_ID"),
            app_secret=_value(env, "WECHAT_APP_SECRET"),
            tokens=DbTokens(db),
            base_url=_value(env, "WECHAT_API_URL") or DEFAULT_WECHAT_URL,
        )
        chosen["wechat"] = wechat
        closers.append(wechat.aclose)
    return Channels(chosen, closers)


def advisories(providers: ProvidersDoc, env: Mapping[str, str]) -> list[str]:
    """What works less well with the environment as it is, though sending works."""
    notes: list[str] = []
    configured = providers.configured()
    if "twilio" in configured.values() and not _value(env, "NURTURE_PUBLIC_URL"):
        notes.append(
            "NURTURE_PUBLIC_URL is not set: Twilio gets no status callback URL, and the STOP/START "
            "webhook cannot check Twilio's signatures"
        )
    if "sendgrid" in configured.values() and not _value(env, "SENDGRID_WEBHOOK_PUBLIC_KEY"):
        notes.append(
            "SENDGRID_WEBHOOK_PUBLIC_KEY is not set: the event API answers SendGrid's event webhook "
            "with 503, so unsubscribes and spam reports there do not become opt-outs"
        )
    if "wechat" in configured.values() and not _value(env, "WECHAT_TOKEN"):
        notes.append(
            "WECHAT_TOKEN is not set: the event API cannot check WeChat's follow/unfollow pushes, "
            "so unfollows there do not become opt-outs (a send to an unfollowed user still does)"
        )
    return notes


def _value(env: Mapping[str, str], name: str) -> str:
    # A secret pasted with a trailing newline must not pass the check and then fail every call.
    return env.get(name, "").strip()
