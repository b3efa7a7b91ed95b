"""Outbox channel: records, de-duplication, the JSON-lines file and address masking."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from channels import (
    Channel,
    DeliveryResult,
    Envelope,
    idempotency_key,
    mask_address,
    mask_user_id,
    split_idempotency_key,
)
from channels.outbox import Outbox, OutboxRecord
from nurture.language.templates import RenderedMessage

SMS = RenderedMessage(channel="sms", template="code", locale=None, text="Your code is 1234")
EMAIL = RenderedMessage(
    channel="email",
    template="welcome",
    locale="zh-CN",
    subject="欢迎, Li",
    html="<p>你好</p>",
    text="你好",
)
START = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def deliver(outbox: Outbox, message: RenderedMessage, address: str, key: str) -> DeliveryResult:
    return asyncio.run(outbox.deliver(message, Envelope(address=address, idempotency_key=key)))


def test_outbox_is_a_channel() -> None:
    assert isinstance(Outbox(), Channel)
    assert Outbox().provider == "outbox"


def test_deliver_records_the_message() -> None:
    clock = Clock()
    outbox = Outbox(now=clock)

    result = deliver(outbox, SMS, "+8613800138000", idempotency_key("run-1", "remind"))

    assert result.provider == "outbox"
    assert result.provider_id is not None and result.provider_id.startswith("outbox-")
    [record] = outbox.messages()
    assert record == OutboxRecord(
        idempotency_key="run-1:remind",
        address="+8613800138000",
        message=SMS,
        sent_at=START,
        provider_id=result.provider_id,
        run_id="run-1",
        step_id="remind",
    )


def test_same_key_is_delivered_once() -> None:
    clock = Clock()
    outbox = Outbox(now=clock)

    first = deliver(outbox, SMS, "+8613800138000", "run-1:remind")
    clock.now = START + timedelta(minutes=5)
    again = deliver(outbox, EMAIL, "li@example.com", "run-1:remind")
    other = deliver(outbox, SMS, "+8613800138000", "run-2:remind")

    assert again == first
    assert other.provider_id != first.provider_id
    assert [(r.idempotency_key, r.message, r.sent_at) for r in outbox.messages()] == [
        ("run-1:remind", SMS, START),
        ("run-2:remind", SMS, START + timedelta(minutes=5)),
    ]


def test_concurrent_deliveries_with_one_key_record_once() -> None:
    outbox = Outbox()

    async def many() -> list[DeliveryResult]:
        return await asyncio.gather(
            *(
                outbox.deliver(SMS, Envelope(address="+8613800138000", idempotency_key="r:s"))
                for _ in range(20)
            )
        )

    results = asyncio.run(many())

    assert len(set(results)) == 1
    assert len(outbox.messages()) == 1


def test_default_clock_is_utc_now() -> None:
    outbox = Outbox()
    before = datetime.now(UTC)

    deliver(outbox, SMS, "+8613800138000", "r:s")

    [record] = outbox.messages()
    assert before <= record.sent_at <= datetime.now(UTC)
    assert record.sent_at.tzinfo is not None


def test_jsonl_file_holds_one_line_per_message(tmp_path: Path) -> None:
    path = tmp_path / ".nurture" / "outbox.jsonl"
    outbox = Outbox(path=path, now=Clock())

    deliver(outbox, EMAIL, "li@example.com", "run-1:welcome")
    deliver(outbox, EMAIL, "li@example.com", "run-1:welcome")
    deliver(outbox, SMS, "+8613800138000", "run-1:code")

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first == {
        "idempotency_key": "run-1:welcome",
        "run_id": "run-1",
        "step_id": "welcome",
        "address": "li@example.com",
        "sent_at": "2026-03-02T02:00:00+00:00",
        "provider_id": first["provider_id"],
        "message": {
            "channel": "email",
            "template": "welcome",
            "locale": "zh-CN",
            "subject": "欢迎, Li",
            "html": "<p>你好</p>",
            "text": "你好",
        },
    }
    assert "欢迎" in lines[0]  # readable with cat, not \u escapes
    assert [OutboxRecord.from_dict(json.loads(line)) for line in lines] == outbox.messages()


def test_reopened_outbox_remembers_keys(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    first = deliver(Outbox(path=path), SMS, "+8613800138000", "run-1:code")

    reopened = Outbox(path=path)
    again = deliver(reopened, SMS, "+8613800138000", "run-1:code")

    assert again == first
    assert len(reopened.messages()) == 1
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1


def test_delivery_without_address_is_a_bug() -> None:
    with pytest.raises(ValueError, match="without an address"):
        deliver(Outbox(), SMS, "", "r:s")


@pytest.mark.parametrize(
    ("key", "parts"),
    [
        ("run-1:remind", ("run-1", "remind")),
        ("cart:u1:c1:remind", ("cart:u1:c1", "remind")),
        ("no-separator", (None, None)),
        (":remind", (None, None)),
    ],
)
def test_split_idempotency_key(key: str, parts: tuple[str | None, str | None]) -> None:
    assert split_idempotency_key(key) == parts


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("li@example.com", "l***@example.com"),
        ("zhang.wei@mail.example.cn", "z***@mail.example.cn"),
        ("+8613800138000", "+86*******8000"),
        ("+14155550123", "+14*****0123"),
        ("13800138000", "*******8000"),
        ("+861234", "+****34"),
        ("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o", "oUp***S6o"),
        ("abc", "***"),
        ("+1 (500) 555-0143", "+15*****0143"),
        ("(500) 555-0143", "******0143"),
    ],
)
def test_mask_address(address: str, masked: str) -> None:
    assert mask_address(address) == masked


@pytest.mark.parametrize(
    ("user_id", "masked"),
    [
        ("li@example.com", "l***@example.com"),
        ("+8613800138000", "+86*******8000"),
        ("+1 (500) 555-0143", "+15*****0143"),
        ("+1-500-555-0143", "+15*****0143"),
        ("500 555 0143", "******0143"),
        # Ids that are not addresses stay readable.
        ("user-1", "user-1"),
        ("u_1024", "u_1024"),
        ("2026-03-02", "2026-03-02"),
        ("8890eb76-7a7e-465b-9f25-cb3efcc3ada8", "8890eb76-7a7e-465b-9f25-cb3efcc3ada8"),
    ],
)
def test_mask_user_id(user_id: str, masked: str) -> None:
    assert mask_user_id(user_id) == masked
