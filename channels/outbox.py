"""The outbox: a channel that records messages instead of sending them.

Used by the simulator, by tests and in development. With a ``path`` every message is also appended
to a JSON-lines file, so ``cat .nurture/outbox.jsonl`` shows what would have been sent.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from channels import DeliveryResult, Envelope, split_idempotency_key
from nurture.language.templates import RenderedMessage

PROVIDER = "outbox"


@dataclass(frozen=True)
class OutboxRecord:
    """One message the outbox accepted."""

    idempotency_key: str
    """The key the message was delivered with."""
    address: str
    """Where it would have gone: email address, E.164 phone or WeChat openid."""
    message: RenderedMessage
    """The rendered message."""
    sent_at: datetime
    """When the outbox accepted it."""
    provider_id: str
    """The id returned in :class:`DeliveryResult`."""
    run_id: str | None = None
    """The run, when the key was made by :func:`channels.idempotency_key`."""
    step_id: str | None = None
    """The step, when the key was made by :func:`channels.idempotency_key`."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "idempotency_key": self.idempotency_key,
            "run_id": self.run_id,
            "step_id": self.step_id,
            "address": self.address,
            "sent_at": self.sent_at.isoformat(),
            "provider_id": self.provider_id,
            "message": self.message.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutboxRecord:
        return cls(
            idempotency_key=data["idempotency_key"],
            address=data["address"],
            message=RenderedMessage.from_dict(data["message"]),
            sent_at=datetime.fromisoformat(data["sent_at"]),
            provider_id=data["provider_id"],
            run_id=data.get("run_id"),
            step_id=data.get("step_id"),
        )


def outbox_id(key: str) -> str:
    """The outbox's message id: derived from the key, so a replay or a restart yields the same id."""
    return "outbox-" + hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


class Outbox:
    """A :class:`channels.Channel` for every channel that records instead of sending."""

    provider = PROVIDER
    idempotent = True
    """Delivering again with the same key returns the first record: safe to call on any retry."""

    def __init__(
        self,
        *,
        path: Path | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        """``path``: JSON-lines file to append to (earlier records are loaded, so keys stay
        de-duplicated across restarts); ``now``: the clock, e.g. the simulator's virtual one."""
        self.path = path
        self._now = now or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._records: list[OutboxRecord] = []
        self._by_key: dict[str, OutboxRecord] = {}
        if path is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    self._remember(OutboxRecord.from_dict(json.loads(line)))

    async def deliver(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult:
        if not envelope.address:
            raise ValueError("cannot deliver without an address")
        with self._lock:
            record = self._by_key.get(envelope.idempotency_key)
            if record is None:
                record = self._accept(message, envelope.address, envelope.idempotency_key)
        return DeliveryResult(provider=PROVIDER, provider_id=record.provider_id)

    def messages(self) -> list[OutboxRecord]:
        """Every accepted message, oldest first."""
        with self._lock:
            return list(self._records)

    def _accept(self, message: RenderedMessage, address: str, key: str) -> OutboxRecord:
        run_id, step_id = split_idempotency_key(key)
        record = OutboxRecord(
            idempotency_key=key,
            address=address,
            message=message,
            sent_at=self._now(),
            provider_id=outbox_id(key),
            run_id=run_id,
            step_id=step_id,
        )
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        self._remember(record)
        return record

    def _remember(self, record: OutboxRecord) -> None:
        self._records.append(record)
        self._by_key[record.idempotency_key] = record
