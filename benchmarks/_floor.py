"""The ingest floor: what any web service storing events pays. FastAPI parses each call's JSON
body (after a key check) and inserts it as one ``events`` row of the database, served by uvicorn
with its defaults, as the event API is (``python benchmarks/_stack.py floor --port PORT``)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import uvicorn
from _stack import WRITE_KEY
from fastapi import FastAPI, HTTPException, Request
from sqlalchemy import insert

from nurture.storage.db import Database
from nurture.storage.models import EventRecord, utcnow

TABLE = EventRecord.__table__  # type: ignore[attr-defined]


def app(db: Database) -> FastAPI:
    floor = FastAPI()

    def insert_row(call: str, body: dict[str, Any]) -> None:
        now = utcnow()
        row = {
            "message_id": str(body.get("messageId") or uuid.uuid4()),
            "kind": call,
            "user_id": str(body.get("userId") or body.get("anonymousId") or ""),
            "name": body.get("event") or body.get("name"),
            "properties": body.get("properties") or body.get("traits") or {},
            "timestamp": now,
            "received_at": now,
            "routed_at": now,
        }
        with db.session() as session:
            session.execute(insert(TABLE).values(**row))

    @floor.post("/v1/{call}")
    async def store(call: str, request: Request) -> dict[str, bool]:
        if request.headers.get("authorization") != f"Bearer {WRITE_KEY}":
            raise HTTPException(401)
        body = await request.json()
        await asyncio.to_thread(insert_row, call, body)
        return {"success": True}

    return floor


def serve(db: Database, port: int) -> None:
    uvicorn.run(app(db), host="127.0.0.1", port=port, log_level="warning")
