"""The four mission journeys delivered through the real provider SDKs, end to end.

Every scenario in ``journeys/tests`` is played on the durable runtime (the journey workflow on
the time-skipping Temporal server) with the channels ``nurture.yaml`` would build for Twilio,
SendGrid and WeChat, pointed at loopback mocks: Twilio and SendGrid answer from their own OpenAPI
specs and reject any request the spec does not allow; the WeChat server enforces the token flow
and the template-message shape. The scenarios must pass unchanged, and each provider must have
received exactly the messages the outcomes say were sent through it. Then faults: 429s, 5xx,
timeouts and dropped connections delay a send but never duplicate it, and a permanent rejection
moves the send to its fallback channel.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from openapi_mock import OpenApiMock, provider_spec
from support import on_schedule
from wechat_server import WeChatServer

from channels import Channel
from channels.sendgrid import SendGridEmail
from channels.twilio import TwilioSms
from channels.wechat import MemoryTokens, WeChatTemplate
from nurture.delivery.links import UnsubscribeLinks
from nurture.language.compiler import Project
from nurture.language.providers import ProvidersDoc
from nurture.service.devserver import free_port
from nurture.service.providers import build_channels
from nurture.simulation.scenarios import compare, load_scenario, scenario_files
from nurture.storage.db import Database
from nurture.storage.stores import DbOutbox
from workflows.runtime import TemporalRuntime

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = scenario_files([ROOT / "journeys" / "tests"])
LINKS = UnsubscribeLinks(secret="e2e-secret-0123456789", public_url="https://nurture.example")
PROVIDERS = ProvidersDoc.model_validate(
    {
        "email": {"provider": "sendgrid", "from": "Nurture Academy <hello@academy.example.com>"},
        "sms": {"provider": "twilio", "from": "+15005550006"},
        "wechat": "wechat",
    }
)


def scenario_openids() -> set[str]:
    """Every WeChat openid the scenario files use: the WeChat server knows them as followers."""
    found: set[str] = set()
    for path in SCENARIOS:
        for line in path.read_text(encoding="utf-8").splitlines():
            if "wechat_openid:" in line:
                found.add(line.split("wechat_openid:")[1].split(",")[0].split("}")[0].strip().strip("\"'"))
    return found


@dataclass
class Providers:
    twilio: OpenApiMock
    sendgrid: OpenApiMock
    wechat: WeChatServer
    channels: dict[str, Channel]

    def received(self) -> Counter[str]:
        return Counter(
            sms=len(self.twilio.accepted), email=len(self.sendgrid.accepted), wechat=len(self.wechat.messages)
        )


@pytest.fixture(scope="module")
def providers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Providers]:
    """The mocks, and channels built by ``build_channels`` from settings as an operator writes them."""
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('e2e') / 'nurture.db'}")
    db.migrate()
    with (
        OpenApiMock(provider_spec("twilio_api_v2010.json")) as twilio,
        OpenApiMock(provider_spec("sendgrid_mail_v3.json")) as sendgrid,
        WeChatServer(app_id="wx-e2e", app_secret="e2e-secret", openids=scenario_openids()) as wechat,
    ):
        env = {
            "TWILIO_ACCOUNT_SID": "AC" + "1" * 32,
            "TWILIO_AUTH_TOKEN": "e2e-token",
            "TWILIO_API_URL": twilio.url,
            "SENDGRID_API_KEY": "SG.e2e-key",
            "SENDGRID_API_URL": sendgrid.url,
            "WECHAT_APP_ID": "wx-e2e",
            "WECHAT_APP_SECRET": "e2e-secret",
            "WECHAT_API_URL": wechat.url,
            "NURTURE_PUBLIC_URL": "https://nurture.example",
            "NURTURE_SECRET": "e2e-secret-0123456789",
        }
        built = build_channels(PROVIDERS, env, db=db, outbox=DbOutbox())
        assert {name: c.provider for name, c in built.by_channel.items()} == {
            "email": "sendgrid",
            "sms": "twilio",
            "wechat": "wechat",
        }
        yield Providers(twilio, sendgrid, wechat, built.by_channel)
    db.dispose()




@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
async def test_scenario_through_real_sdks(
    path: Path, project: Project, temporal: TemporalRuntime, providers: Providers
) -> None:
    scenario = load_scenario(path, project)
    before = providers.received()

    outcomes = await temporal.play(scenario, project, channels=providers.channels, links=LINKS.url)

    verdict = compare(scenario, on_schedule(scenario, outcomes))
    assert verdict.passed, verdict.report()
    sent = Counter(o.send.channel for o in outcomes if o.send is not None and o.send.status == "sent")
    assert providers.received() - before == sent
    assert providers.twilio.rejected == [] and providers.sendgrid.rejected == []
    for o in outcomes:
        if o.send is not None and o.send.status == "sent":
            assert (
                o.send.provider == {"email": "sendgrid", "sms": "twilio", "wechat": "wechat"}[o.send.channel]
            )
            assert o.send.provider_id


async def test_marketing_email_carries_a_working_unsubscribe_link(
    project: Project, temporal: TemporalRuntime, providers: Providers
) -> None:
    scenario = load_scenario(ROOT / "journeys" / "tests" / "welcome_full_series.yaml", project)
    before = len(providers.sendgrid.accepted)
    await temporal.play(scenario, project, channels=providers.channels, links=LINKS.url)
    request = providers.sendgrid.accepted[before]  # the welcome email

    personalization = request.body["personalizations"][0]
    url = request.body["headers"]["List-Unsubscribe"].strip("<>")
    target = LINKS.verify(url.rsplit("/", 1)[1])
    assert (target.user_id, target.channel) == (personalization["custom_args"]["user_id"], "email")
    assert request.body["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    html = next(c["value"] for c in request.body["content"] if c["type"] == "text/html")
    assert f'href="{url}"' in html  # the footer link and the header are the same signed URL


FAULTY = """\
scenario: provider faults delay sends, lost answers are looked up, a rejected number falls back
start: 2026-03-02T10:00:00+08:00
journeys: [welcome_series]
users:
  na: {email: na.li@example.com, phone: "+8613800138000", wechat_openid: o-na, first_name: Na, timezone: Asia/Shanghai}
  bo: {email: bo@example.com, phone: "+8613800138001", wechat_openid: o-bo, first_name: Bo, timezone: Asia/Shanghai}
events:
  - {at: 0s, user: na, event: Signed Up, properties: {interest: Python}}
  - {at: 1h, user: bo, event: Signed Up, properties: {interest: Python}}
expect: []
"""


async def test_faults_delay_and_fall_back_without_duplicates(
    project: Project, temporal: TemporalRuntime, tmp_path: Path
) -> None:
    path = tmp_path / "faulty.yaml"
    path.write_text(FAULTY, encoding="utf-8")
    scenario = load_scenario(path, project)
    with (
        OpenApiMock(provider_spec("twilio_api_v2010.json"), timeout_hold=3.0) as twilio,
        OpenApiMock(provider_spec("sendgrid_mail_v3.json")) as sendgrid,
        WeChatServer(openids=["o-na", "o-bo"]) as wechat,
    ):
        channels: dict[str, Channel] = {
            "email": SendGridEmail(api_key="SG.k", from_email="hello@academy.example.com", host=sendgrid.url),
            "sms": TwilioSms(
                account_sid="AC" + "2" * 32,
                auth_token="t",
                from_number="+15005550006",
                base_url=twilio.url,
                timeout=1.0,
            ),
            "wechat": WeChatTemplate(
                app_id=wechat.app_id, app_secret=wechat.app_secret, tokens=MemoryTokens(), base_url=wechat.url
            ),
        }
        # Na's welcome email meets a 429 and two 5xx before SendGrid takes it.
        for kind in ("429", "500", "503"):
            sendgrid.fail_next(kind)
        # Na's coupon: Twilio never answers (it did not take it), then takes it and the answer is
        # lost; each retry asks Twilio first, so she gets it exactly once.
        twilio.fail_next("timeout")
        twilio.fail_next("accept_then_drop")
        # Bo's number is rejected for good (21211): his coupon goes to WeChat, which is busy once.
        twilio.answer_next(400, {"code": 21211, "message": "The 'To' number is not valid.", "status": 400})
        wechat.fail_next("busy")

        outcomes = await temporal.play(scenario, project, channels=channels)

        sends = {
            user: [
                (o.send.channel, o.send.template, o.send.label) for o in outcomes if o.send and o.user == user
            ]
            for user in ("na", "bo")
        }
        emails = [("email", t, "sent") for t in ("welcome", "popular_courses", "live_session_preview")]
        assert sends == {
            "na": [*emails, ("sms", "welcome_coupon", "sent")],
            "bo": [*emails, ("wechat", "welcome_coupon", "sent")],
        }
        assert sorted(o.exit for o in outcomes if o.exit) == ["completed", "completed"]
        assert [f.fault for f in sendgrid.faulted] == ["429", "500", "503"]
        assert len(sendgrid.accepted) == 6  # one request per email step
        coupons = [r for r in twilio.accepted if r.body["To"] == "+8613800138000"]
        assert len(coupons) == 1 and "WELCOME30" in coupons[0].body["Body"]
        assert [f.fault for f in twilio.faulted] == ["timeout", "answer:400"]
        assert len(twilio.reads) == 2  # a lookup before each retry of Na's coupon
        assert [m.body["touser"] for m in wechat.messages] == ["o-bo"]
        await channels["wechat"].aclose()  # type: ignore[attr-defined]


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.messages.append(envelope.content)  # type: ignore[attr-defined]
        return "250 OK"


async def test_smtp_carries_the_welcome_series(
    project: Project, temporal: TemporalRuntime, tmp_path: Path
) -> None:
    inbox = _Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        doc = ProvidersDoc.model_validate(
            {"email": {"provider": "smtp", "from": "Nurture <hello@academy.example.com>"}}
        )
        db = Database(f"sqlite:///{tmp_path / 'n.db'}")
        env = {
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(port),
            "SMTP_SECURITY": "none",
            "NURTURE_PUBLIC_URL": "https://nurture.example",
            "NURTURE_SECRET": "e2e-secret-0123456789",
        }
        channels = build_channels(doc, env, db=db, outbox=DbOutbox()).by_channel
        scenario = load_scenario(ROOT / "journeys" / "tests" / "welcome_full_series.yaml", project)
        outcomes = await temporal.play(scenario, project, channels=channels, links=LINKS.url)
        assert compare(scenario, on_schedule(scenario, outcomes)).passed
    finally:
        controller.stop()
    assert len(inbox.messages) == 3
    assert b"Subject: Welcome to Nurture Academy" in inbox.messages[0]
    assert all(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in m for m in inbox.messages)
