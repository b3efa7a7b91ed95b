"""A console with data on it: the project's chat recovery forecast played into a database, with
the profiles and events of its people, for the console's browser tests and screenshots."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlmodel import select

from nurture.delivery.deliverer import Deliverer
from nurture.engine.identity import call_identifiers
from nurture.language.compiler import Project
from nurture.simulation.scenarios import build_simulator, load_scenario
from nurture.storage.db import Database
from nurture.storage.identities import DbIdentities
from nurture.storage.models import EventRecord, MessageRecord, ProfileRecord, StepReach, utcnow
from nurture.storage.stores import BatchRecorder

ROOT = Path(__file__).resolve().parents[1]
FORECAST = ROOT / "journeys" / "forecasts" / "chat_followup_copy.yaml"


def seed_console(db: Database, project: Project, *, people: int = 400) -> list[str]:
    """:func:`seed` outside an event loop."""
    return asyncio.run(seed(db, project, people=people))


async def seed(db: Database, project: Project, *, people: int = 400) -> list[str]:
    """Play ``people`` interrupted chats of the last three days into ``db`` up to now (runs,
    steps, messages, conversions; the latest runs still active), store their profiles and
    events; the user ids, in order."""
    scenario = load_scenario(FORECAST, project)
    assert scenario.population is not None
    scenario.population = dataclasses.replace(scenario.population, count=people)
    now = datetime.now(UTC)
    scenario.start = now - timedelta(days=3)
    recorder = BatchRecorder(db)
    simulator = build_simulator(
        scenario, project, Deliverer(project.templates, {}, render=False), timeline=False, recorder=recorder
    )
    await simulator.run(until=now)
    recorder.flush()
    people = DbIdentities(db)
    users = []
    with db.session() as session:
        for person in scenario.population.generate(scenario.start):
            users.append(person.user_id)
            traits = {k: v for k, v in person.traits.items() if v is not None}
            people.apply(call_identifiers(person.user_id, None, traits), at=scenario.start, traits=traits)
            for index, event in enumerate(e for e in person.events if e.timestamp <= now):
                session.add(
                    EventRecord(
                        message_id=f"{person.user_id}-{index}",
                        kind="track",
                        user_id=person.user_id,
                        name=event.name,
                        properties=dict(event.properties),
                        timestamp=event.timestamp.astimezone(UTC),
                        received_at=utcnow(),
                        routed_at=datetime.now(UTC),
                    )
                )
    # The forecast renders nothing, so its messages have no address: give them the person's; and
    # a message that was not sent gets the time its step was reached, not the time of seeding.
    with db.session() as session:
        for message in session.exec(select(MessageRecord)).all():
            profile = session.get(ProfileRecord, message.user_id)
            if profile is not None:
                message.address = {"email": profile.email, "sms": profile.phone}.get(message.channel)
            reach = session.get(StepReach, (message.run_id, message.step_id))
            if reach is not None:
                message.created_at = reach.reached_at
            session.add(message)
    return users
