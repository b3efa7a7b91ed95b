"""Loopback stand-ins for Twilio, SendGrid, WeChat and an SMTP server, to try real providers locally.

    .venv/bin/python tests/provider_mocks.py --env-file .nurture/mocks.env

Twilio and SendGrid are served from their own OpenAPI specs (a request the spec rejects is
answered 4xx, as the real API would); WeChat enforces its token flow and message shape; SMTP
accepts everything. The environment that points Nurture at them goes to ``--env-file`` (and is
printed), together with ``NURTURE_CONFIG``: a copy of ``nurture.yaml`` whose ``providers:`` sends
email through SendGrid (``--email smtp`` for SMTP), SMS through Twilio and WeChat through WeChat.
Every message the mocks accept is printed, addresses masked. Ctrl-C stops them.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

import yaml
from aiosmtpd.controller import Controller
from openapi_mock import OpenApiMock, provider_spec
from wechat_server import WeChatServer

from channels import mask_address
from nurture.service.devserver import free_port

ROOT = Path(__file__).resolve().parents[1]
APP_ID, APP_SECRET = "wx-local-mock", "local-mock-secret"


class _Inbox:
    """The SMTP server's handler: prints each message."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        subject = next(
            (
                line[9:]
                for line in envelope.content.decode(errors="replace").splitlines()
                if line.startswith("Subject: ")
            ),
            "",
        )
        for to in envelope.rcpt_tos:
            print(f"smtp      {mask_address(to)}  {subject}", flush=True)
        return "250 OK"


def project_file(email: str, target: Path) -> Path:
    """``nurture.yaml`` with the mocks as providers."""
    source = ROOT / "nurture.yaml"
    data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    data["providers"] = {
        "email": {"provider": email, "from": "Nurture Academy <hello@academy.example.com>"},
        "sms": {"provider": "twilio", "from": "+15005550006"},
        "wechat": "wechat",
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-file", type=Path, default=Path(".nurture/mocks.env"))
    parser.add_argument("--email", choices=("sendgrid", "smtp"), default="sendgrid")
    parser.add_argument("--public-url", default="http://127.0.0.1:8000", help="where the event API listens")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    smtp_port = free_port()
    smtp = Controller(_Inbox(), hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    with (
        OpenApiMock(provider_spec("twilio_api_v2010.json")) as twilio,
        OpenApiMock(provider_spec("sendgrid_mail_v3.json")) as sendgrid,
        WeChatServer(app_id=APP_ID, app_secret=APP_SECRET, openids=None) as wechat,
    ):
        config = project_file(args.email, args.env_file.parent / "providers-mock.yaml")
        env = {
            "NURTURE_CONFIG": str(config.resolve()),
            "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
            "TWILIO_AUTH_TOKEN": "local-mock-token",
            "TWILIO_API_URL": twilio.url,
            "SENDGRID_API_KEY": "SG.local-mock-key",
            "SENDGRID_API_URL": sendgrid.url,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp_port),
            "SMTP_SECURITY": "none",
            "WECHAT_APP_ID": APP_ID,
            "WECHAT_APP_SECRET": APP_SECRET,
            "WECHAT_API_URL": wechat.url,
            "NURTURE_PUBLIC_URL": args.public_url,
            "NURTURE_SECRET": secrets.token_urlsafe(24),
        }
        lines = [f"{name}={value}" for name, value in env.items()]
        args.env_file.parent.mkdir(parents=True, exist_ok=True)
        args.env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"mock providers ready; environment written to {args.env_file}:", flush=True)
        print("\n".join(f"  {line}" for line in lines), flush=True)
        print(f"then: set -a; . {args.env_file}; set +a; .venv/bin/nurture up", flush=True)
        seen = dict.fromkeys(("twilio", "sendgrid", "wechat", "rejected"), 0)
        try:
            while not stop.wait(0.2):
                for request in twilio.accepted[seen["twilio"] :]:
                    print(f"twilio    {mask_address(request.body['To'])}  {request.body['Body']}", flush=True)
                for request in sendgrid.accepted[seen["sendgrid"] :]:
                    to = request.body["personalizations"][0]["to"][0]["email"]
                    print(f"sendgrid  {mask_address(to)}  {request.body['subject']}", flush=True)
                for message in wechat.messages[seen["wechat"] :]:
                    data = ", ".join(f"{k}: {v['value']}" for k, v in message.body["data"].items())
                    print(f"wechat    {mask_address(message.body['touser'])}  {data}", flush=True)
                rejected = [*twilio.rejected, *sendgrid.rejected]
                for request, problem in rejected[seen["rejected"] :]:
                    print(f"REJECTED  {request.method} {request.path}: {problem}", flush=True)
                seen = {
                    "twilio": len(twilio.accepted),
                    "sendgrid": len(sendgrid.accepted),
                    "wechat": len(wechat.messages),
                    "rejected": len(rejected),
                }
        except KeyboardInterrupt:
            pass
        finally:
            smtp.stop()


if __name__ == "__main__":
    main()
