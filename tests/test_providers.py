"""Provider configuration: nurture.yaml's `providers:`, checked at compile time; secrets from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from channels.sendgrid import SendGridEmail
from channels.smtp import SmtpEmail
from channels.twilio import TwilioSms
from nurture.language.compiler import compile_project
from nurture.language.providers import ProvidersDoc
from nurture.service.providers import advisories, build_channels, required_env
from nurture.storage.db import Database
from nurture.storage.stores import DbOutbox

ROOT = Path(__file__).resolve().parents[1]
LINKS = {"NURTURE_PUBLIC_URL": "https://n.example", "NURTURE_SECRET": "s" * 32}


def compile_with(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "journeys").mkdir(exist_ok=True)
    (tmp_path / "nurture.yaml").write_text(text, encoding="utf-8")
    result = compile_project(tmp_path / "journeys", ROOT / "templates")
    return [d.headline() for d in result.errors]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "providers:\n  email: sendgrid\n",
            ':2:10: providers.email: email via sendgrid needs a sender: add from: "Name <you@example.com>"',
        ),
        (
            "providers:\n  sms: {provider: twilio}\n",
            ":2:8: providers.sms: sms via twilio needs exactly one of from",
        ),
        ("providers:\n  email: {provider: mailgun}\n", ":2:21: providers.email.provider:"),
        (
            "providers:\n  email: {provider: sendgrid, from: a@b.c, api_key: SG.x}\n",
            ":2:44: providers.email.api_key: unknown key 'api_key'; allowed keys: provider, from, reply_to",
        ),
        (
            "providers:\n  push: outbox\n",
            ":2:3: providers.push: unknown key 'push'; allowed keys: email, sms, wechat",
        ),
    ],
)
def test_provider_mistakes_are_compile_errors_with_a_location(tmp_path: Path, text: str, error: str) -> None:
    errors = compile_with(tmp_path, text)
    assert len(errors) == 1 and error in errors[0], errors


def test_shorthand_and_defaults(tmp_path: Path) -> None:
    assert compile_with(tmp_path, "providers:\n  wechat: wechat\n") == []
    doc = ProvidersDoc.model_validate({"wechat": "wechat"})
    assert doc.configured() == {"wechat": "wechat"}
    assert ProvidersDoc().configured() == {}


def test_required_env_names_each_missing_variable_and_why() -> None:
    doc = ProvidersDoc.model_validate(
        {"email": {"provider": "smtp", "from": "a@b.example"}, "sms": {"provider": "twilio", "from": "+1555"}}
    )
    missing = required_env(doc, {"SMTP_HOST": "mail", "TWILIO_AUTH_TOKEN": "t", "SMTP_USERNAME": "u"})
    assert [line.split(" ", 1)[0] for line in missing] == [
        "NURTURE_PUBLIC_URL",
        "NURTURE_SECRET",
        "TWILIO_ACCOUNT_SID",
        "SMTP_USERNAME",
    ]
    assert "needed because nurture.yaml sends sms via twilio" in missing[2]
    assert required_env(ProvidersDoc(), {}) == []


def test_build_channels_uses_the_outbox_for_the_rest(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    outbox = DbOutbox()
    doc = ProvidersDoc.model_validate(
        {
            "email": {"provider": "sendgrid", "from": "Nurture <hi@n.example>"},
            "sms": {"provider": "twilio", "from": "+1555"},
        }
    )
    env = {
        "SENDGRID_API_KEY": "SG.k",
        "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
        "TWILIO_AUTH_TOKEN": "t",
        **LINKS,
    }
    built = build_channels(doc, env, db=db, outbox=outbox).by_channel
    assert isinstance(built["email"], SendGridEmail) and isinstance(built["sms"], TwilioSms)
    assert built["wechat"] is outbox
    with pytest.raises(ValueError, match="SENDGRID_API_KEY"):
        build_channels(doc, {**env, "SENDGRID_API_KEY": ""}, db=db, outbox=outbox)


@pytest.mark.parametrize(("security", "port"), [("ssl", 465), ("starttls", 587), ("none", 587)])
def test_smtp_settings(tmp_path: Path, security: str, port: int) -> None:
    doc = ProvidersDoc.model_validate({"email": {"provider": "smtp", "from": "Nurture <hi@n.example>"}})
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    env = {"SMTP_HOST": "mail.example", "SMTP_SECURITY": security, **LINKS}
    smtp = build_channels(doc, env, db=db, outbox=DbOutbox()).by_channel["email"]
    assert isinstance(smtp, SmtpEmail)
    assert (smtp.host, smtp.port, smtp.security) == ("mail.example", port, security)
    with pytest.raises(ValueError, match="SMTP_SECURITY must be starttls, ssl or none"):
        build_channels(doc, {**env, "SMTP_SECURITY": "tls"}, db=db, outbox=DbOutbox())


def test_advisories_name_what_the_webhooks_will_miss() -> None:
    doc = ProvidersDoc.model_validate(
        {
            "email": {"provider": "sendgrid", "from": "a@b.example"},
            "sms": {"provider": "twilio", "from": "+1555"},
        }
    )
    notes = advisories(doc, {})
    assert len(notes) == 2
    assert notes[0].startswith("NURTURE_PUBLIC_URL is not set") and notes[1].startswith(
        "SENDGRID_WEBHOOK_PUBLIC_KEY"
    )
    assert advisories(doc, {"NURTURE_PUBLIC_URL": "https://n", "SENDGRID_WEBHOOK_PUBLIC_KEY": "k"}) == []


def test_secrets_with_stray_whitespace_are_trimmed(tmp_path: Path) -> None:
    doc = ProvidersDoc.model_validate({"sms": {"provider": "twilio", "from": "+1555"}})
    env = {"TWILIO_ACCOUNT_SID": " AC" + "0" * 32 + "\n", "TWILIO_AUTH_TOKEN": "  \n"}
    assert [line.split(" ")[0] for line in required_env(doc, env)] == ["TWILIO_AUTH_TOKEN"]
