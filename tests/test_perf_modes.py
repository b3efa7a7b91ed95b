"""The simulator's fast paths decide exactly what the full simulation decides.

``SimRuntime(render=False)`` (no rendering, no delivery) and ``Simulator(timeline=False)`` (no
step-by-step timeline) exist for speed; on every scenario they must give the outcomes of the full
simulation, apart from what they leave out on purpose.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

from channels.outbox import Outbox
from nurture.delivery.deliverer import Deliverer
from nurture.engine.model import Profile, SendRequest
from nurture.language.compiler import Project
from nurture.language.templates import TemplateStore
from nurture.simulation.scenarios import SimRuntime, build_simulator, load_scenario, scenario_files
from nurture.simulation.simulator import Outcome

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = scenario_files([ROOT / "journeys" / "tests"])
NOW = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


def undelivered(outcome: Outcome) -> Outcome:
    """The outcome as the outcome-only mode records it: nothing rendered, nothing delivered."""
    if outcome.send is None:
        return outcome
    send = dataclasses.replace(outcome.send, text="", preview="", provider=None, provider_id=None)
    return dataclasses.replace(outcome, send=send)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
async def test_fast_paths_give_the_full_simulations_outcomes(path: Path, project: Project) -> None:
    scenario = load_scenario(path, project)
    deliverer = Deliverer(project.templates, dict.fromkeys(("email", "sms", "wechat"), Outbox()))
    full = build_simulator(scenario, project, deliverer, timeline=True)
    await full.run()

    quiet = await SimRuntime().play(scenario, project)
    bare = await SimRuntime(render=False).play(scenario, project)

    assert full.entries
    assert quiet == full.outcomes
    assert bare == [undelivered(outcome) for outcome in full.outcomes]
    assert all(o.send.text for o in full.outcomes if o.send is not None and o.send.status == "sent")


def request(template: str) -> SendRequest:
    return SendRequest(
        run_id="j:u1::1",
        journey="j",
        version="v1",
        step_id="s1",
        user_id="u1",
        channels=("sms", "wechat"),
        template=template,
        category="transactional",
        timezone="UTC",
        quiet_hours=None,
        variant=None,
        context={"event": {}, "last_event": None, "journey": {}},
    )


@pytest.mark.parametrize("render", [True, False], ids=["full", "outcomes-only"])
async def test_a_broken_template_fails_over_in_both_modes(tmp_path: Path, render: bool) -> None:
    (tmp_path / "sms").mkdir()
    (tmp_path / "wechat").mkdir()
    (tmp_path / "sms" / "note.txt").write_text("Hi {{ usr.name }}", encoding="utf-8")
    (tmp_path / "wechat" / "note.zh.yaml").write_text("template_id: T\ndata: {first: 你好}\n", encoding="utf-8")
    (tmp_path / "wechat" / "note.yaml").write_text("template_id: T\ndata: {first: Hi}\n", encoding="utf-8")
    outbox = Outbox()
    deliverer = Deliverer(TemplateStore(tmp_path), {"sms": outbox, "wechat": outbox}, render=render)
    profile = Profile("u1", {"phone": "+8613800138000", "wechat_openid": "o1", "locale": "zh-CN"})

    result = await deliverer.send(request("note"), profile, NOW)

    assert result.outcome is not None
    assert (result.outcome.status, result.outcome.channel, result.outcome.locale) == ("sent", "wechat", "zh")
    assert len(outbox.messages()) == (1 if render else 0)
    missing = await deliverer.send(request("gone"), profile, NOW)
    assert missing.outcome is not None
    assert (missing.outcome.status, missing.outcome.reason) == ("failed", "template_error")
