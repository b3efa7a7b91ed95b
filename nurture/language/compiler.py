"""Journey files in, typed intermediate form out, every mistake reported at once.

Three passes over each file: YAML with positions (:mod:`nurture.language.source`), validation against the
document models (:mod:`nurture.language.document`, which also checks durations, zones, times and
expression syntax in place), then project-wide checks that need more than one value at a time:
templates exist for every channel a send may use, ids are unique, no step follows an ``exit``.
Only a file with no errors becomes an :class:`nurture.language.ir.Journey`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import ir
from .audiences import ENTERED, EXITED, Activity, Audience, condition_source
from .broadcasts import Broadcast, ScheduleDoc, compile_broadcast_text
from .diagnostics import CompileError, Diagnostic, DiagnosticSink, describe_value, did_you_mean
from .document import (
    FORM_TAGS,
    IDENT,
    STEP_KINDS,
    ActivityDoc,
    ArmDoc,
    AudienceDoc,
    AudienceGoalDoc,
    AudienceTriggerDoc,
    AudienceWaitDoc,
    BranchDoc,
    ChannelQuietHoursDoc,
    DateTriggerDoc,
    DateWaitDoc,
    ElseArmDoc,
    EventDoc,
    EventRuleDoc,
    ExitDoc,
    FrequencyCapsDoc,
    GoalDoc,
    HoldoutDoc,
    JourneyDoc,
    PolicyFields,
    ProjectDoc,
    PropertyDoc,
    QuietHoursDoc,
    RandomWaitDoc,
    ReEntryDoc,
    SendDoc,
    SplitDoc,
    StepDoc,
    TraitDoc,
    UpdateDoc,
    VariantDoc,
    WaitDoc,
    WaitForDoc,
    WaitUntilDoc,
    allowed_keys,
    step_kind,
)
from .durations import parse_duration, parse_duration_range, parse_rate, parse_signed_duration
from .expressions import ExpressionError, compile_expression, compile_value
from .providers import PROVIDER_DOCS, ProvidersDoc
from .schema import (
    TYPES,
    Declarations,
    Declared,
    EventScope,
    Read,
    Usage,
    comparison_problems,
    read_problem,
    reads,
    trait_faults,
    unknown_event,
)
from .source import Path as KeyPath
from .source import SourceError, SourceMap, load_yaml
from .templates import TemplateRead, TemplateStore, name_in_path, valid_name

_STEP_LISTS = frozenset({"steps", "then", "else", "branch"})


@dataclass(frozen=True)
class Settings:
    """Project defaults from ``nurture.yaml``, resolved."""

    timezone: str = "UTC"
    quiet_hours: ir.QuietHours | None = None
    source: str | None = None
    sms_max_segments: int = 3
    """Warn when an SMS template needs more segments than this, whatever the data."""
    providers: ProvidersDoc = field(default_factory=ProvidersDoc)
    """Which provider carries each channel (default: the outbox for all)."""
    topics: tuple[str, ...] = ()
    """Subscription topics a send may name and users may opt out of."""
    policy: ir.Policy = field(default_factory=ir.Policy)
    """Frequency caps, what to do at a cap, the channel order and per-channel quiet hours."""
    declarations: Declarations = field(default_factory=Declarations)
    """The declared traits and events, built-ins included (nothing declared: nothing checked)."""


@dataclass
class Project:
    """Every compiled journey of a project, with the templates they use."""

    journeys: dict[str, ir.Journey]
    templates: TemplateStore
    settings: Settings
    warnings: list[Diagnostic] = field(default_factory=list)
    audiences: dict[str, Audience] = field(default_factory=dict)
    """The compiled audiences (``audiences/<id>.yaml``), by id."""
    broadcasts: dict[str, Broadcast] = field(default_factory=dict)
    """``broadcasts/<id>.yaml``, by id (:mod:`nurture.language.broadcasts`)."""

    def select(self, ids: list[str] | None) -> list[ir.Journey]:
        """The named journeys (all when ``ids`` is empty; a broadcast's by ``broadcast:<id>``);
        unknown names raise ``KeyError``."""
        if not ids:
            return list(self.journeys.values())
        known = {**self.journeys, **{b.journey.id: b.journey for b in self.broadcasts.values()}}
        missing = [i for i in ids if i not in known]
        if missing:
            hint = did_you_mean(missing[0], known)
            raise KeyError(f"unknown journey '{missing[0]}'{hint}")
        return [known[i] for i in ids]


@dataclass
class CompileResult:
    project: Project | None
    diagnostics: list[Diagnostic]
    checked: list[str]
    """The journey and audience files that were read."""

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]


def compile_project(
    journeys_dir: Path,
    templates_dir: Path,
    config: Path | None = None,
    *,
    report_undeclared: bool = False,
    audiences_dir: Path | None = None,
    broadcasts_dir: Path | None = None,
) -> CompileResult:
    """Compile every ``*.yaml`` directly in ``journeys_dir`` against ``templates_dir``, the
    audiences in ``audiences_dir`` (default: ``audiences/`` beside the journeys; none when absent)
    and the broadcasts in ``broadcasts_dir`` (default: ``broadcasts/`` beside the journeys).

    With ``report_undeclared``, a project that declares no traits (or no events) gets a warning
    listing the ones its journeys and templates read, which declarations would check.
    """
    sink = DiagnosticSink()
    if config is not None and not config.is_file():
        sink.add(Diagnostic(str(config), 0, 0, "project file not found (check --config or NURTURE_CONFIG)"))
    config = config if config is not None else journeys_dir.parent / "nurture.yaml"
    settings = load_settings(config, sink)
    templates = TemplateStore(templates_dir)
    journeys: dict[str, ir.Journey] = {}
    files = sorted(journeys_dir.glob("*.yaml")) + sorted(journeys_dir.glob("*.yml"))
    if not journeys_dir.is_dir():
        sink.add(Diagnostic(str(journeys_dir), 0, 0, "journeys directory not found (use --journeys DIR)"))
    stems: dict[str, Path] = {}
    for path in files:
        if (twin := stems.setdefault(path.stem, path)) is not path:
            sink.add(Diagnostic(str(path), 0, 0, f"journey '{path.stem}' is also defined in {twin.name}: keep one file"))
    checked_templates: set[tuple[str, str]] = set()
    usage = Usage()
    audience_files = project_files(audiences_dir or journeys_dir.parent / "audiences", "audience", sink)
    audiences = {
        audience.id: audience
        for path in audience_files
        if (audience := compile_audience_file(path, settings, sink, usage=usage)) is not None
    }
    known = [path.stem for path in audience_files]
    for path in files:
        journey = compile_file(path, templates, settings, sink, checked_templates, usage=usage, audiences=known)
        if journey is not None:
            journeys[journey.id] = journey
    broadcasts = {
        broadcast.id: broadcast
        for path in project_files(
            broadcasts_dir if broadcasts_dir is not None else journeys_dir.parent / "broadcasts", "broadcast", sink
        )
        if (text := read_source(path, sink)) is not None
        and (
            broadcast := compile_broadcast_text(
                text, str(path), templates, settings, sink, checked_templates, usage=usage, audiences=known
            )
        )
        is not None
    }
    if report_undeclared:
        where = str(config) if config.exists() else str(journeys_dir)
        for message in usage.warnings(settings.declarations):
            sink.add(Diagnostic(where, 0, 0, message, severity="warning"))
    # A template shared by journeys is checked for each; the same finding is shown once.
    sink.items = list(dict.fromkeys(sink.items))
    errors = sink.errors
    project = None if errors else Project(journeys, templates, settings, sink.warnings, audiences, broadcasts)
    ordered = sorted(sink.items, key=lambda d: (d.path, d.line, d.column))
    return CompileResult(project, ordered, [str(p) for p in files + audience_files])


def load_project(
    journeys_dir: Path,
    templates_dir: Path,
    config: Path | None = None,
    *,
    audiences_dir: Path | None = None,
    broadcasts_dir: Path | None = None,
) -> Project:
    """Compile, raising :class:`CompileError` with every diagnostic on any error."""
    result = compile_project(
        journeys_dir, templates_dir, config, audiences_dir=audiences_dir, broadcasts_dir=broadcasts_dir
    )
    if result.project is None:
        raise CompileError(result.errors)
    return result.project


def load_settings(path: Path, sink: DiagnosticSink) -> Settings:
    if not path.exists():
        return Settings()
    text = path.read_text(encoding="utf-8")
    try:
        data, smap = load_yaml(text, str(path))
    except SourceError as exc:
        sink.extend(exc.diagnostics)
        return Settings()
    try:
        doc = ProjectDoc.model_validate(data or {})
    except ValidationError as exc:
        sink.extend(_validation_diagnostics(exc, data, smap))
        return Settings()
    return Settings(
        timezone=doc.timezone,
        quiet_hours=_quiet(doc.quiet_hours),
        source=str(path),
        sms_max_segments=doc.sms_max_segments,
        providers=doc.providers,
        topics=tuple(doc.topics),
        policy=_policy(doc, doc.quiet_hours, ir.Policy(holdout=_holdout(doc.holdout))),
        declarations=Declarations.build(
            None if doc.traits is None else {name: _declared(t) for name, t in doc.traits.items()},
            None
            if doc.events is None
            else {
                name: {prop: _declared(p, p.required) for prop, p in event.properties.items()}
                for name, event in doc.events.items()
            },
            enforce=doc.enforce_declarations,
        ),
    )


def _declared(doc: TraitDoc, required: bool = False) -> Declared:
    return Declared(doc.type, required=required, description=doc.description or "", example=doc.example)


def compile_file(
    path: Path,
    templates: TemplateStore,
    settings: Settings,
    sink: DiagnosticSink,
    checked_templates: set[tuple[str, str]] | None = None,
    *,
    usage: Usage | None = None,
    audiences: Collection[str] = (),
) -> ir.Journey | None:
    """Compile one journey file, adding its diagnostics to ``sink``."""
    text = read_source(path, sink)
    if text is None:
        return None
    return compile_text(text, str(path), templates, settings, sink, checked_templates, usage=usage, audiences=audiences)


def compile_text(
    text: str,
    path: str,
    templates: TemplateStore,
    settings: Settings,
    sink: DiagnosticSink,
    checked_templates: set[tuple[str, str]] | None = None,
    *,
    usage: Usage | None = None,
    audiences: Collection[str] = (),
) -> ir.Journey | None:
    """Compile journey source text; ``path`` is used for messages and the id check.

    ``usage`` collects the traits and events the journey and its templates read; ``audiences``
    are the ids of the project's audiences, which a trigger, goal or ``wait_for`` may name.
    """
    before = len(sink.errors)
    try:
        return _compile_text(
            text, path, templates, settings, sink, checked_templates, before, usage or Usage(), audiences
        )
    except RecursionError:
        sink.add(Diagnostic(path, 1, 1, "the document is nested too deeply to read: simplify it"))
        return None


def _compile_text(
    text: str,
    path: str,
    templates: TemplateStore,
    settings: Settings,
    sink: DiagnosticSink,
    checked_templates: set[tuple[str, str]] | None,
    before: int,
    usage: Usage,
    audiences: Collection[str],
) -> ir.Journey | None:
    loaded = load_mapping(text, path, sink, "a journey file is a mapping with journey:, trigger: and steps:")
    if loaded is None:
        return None
    data, smap = loaded
    doc = validate_journey(data, smap, path, templates, sink, checked_templates, settings)
    _check_audiences(data, smap, sink, audiences)
    _check_declared(data, smap, templates, sink, settings, usage)
    if doc is None or len(sink.errors) > before:
        return None
    return build_journey(doc, settings, path)


# --- project files ------------------------------------------------------------------------------


def read_source(path: Path, sink: DiagnosticSink) -> str | None:
    """The text of a project file; ``None`` (and a diagnostic) when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        sink.add(Diagnostic(str(path), 0, 0, f"cannot read file: {exc}"))
        return None


def project_files(directory: Path, kind: str, sink: DiagnosticSink) -> list[Path]:
    """The ``kind`` files (audience, broadcast) directly in ``directory``, none when it does not
    exist; of two files with one id (``a.yaml``, ``a.yml``) the first, the other reported."""
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    stems: dict[str, Path] = {}
    for path in files:
        if (twin := stems.setdefault(path.stem, path)) is not path:
            sink.add(Diagnostic(str(path), 0, 0, f"{kind} '{path.stem}' is also defined in {twin.name}: keep one file"))
    return [path for path in files if stems[path.stem] is path]


def load_mapping(
    text: str, path: str, sink: DiagnosticSink, shape: str, *, empty: bool = False
) -> tuple[dict[str, Any], SourceMap] | None:
    """The mapping a project file holds, and where its parts are; ``None`` (and a diagnostic: its
    YAML errors, or ``shape``, what the file should be) when it holds no mapping. With ``empty``
    an empty file is an empty mapping."""
    try:
        data, smap = load_yaml(text, path)
    except SourceError as exc:
        sink.extend(exc.diagnostics)
        return None
    if data is None and empty:
        data = {}
    if not isinstance(data, dict):
        sink.add(Diagnostic(path, 1, 1, shape))
        return None
    return data, smap


def check_file_id(path: str, kind: str, sink: DiagnosticSink) -> str:
    """The id of the ``kind`` file at ``path`` (its stem), reported when it is not a valid one."""
    stem = Path(path).stem
    if not IDENT.match(stem):
        sink.add(
            Diagnostic(
                path, 1, 1, f"'{stem}' is not a valid {kind} id: name the file with lowercase letters, digits "
                "and _, starting with a letter"
            )
        )
    return stem


def title(ident: str) -> str:
    """The display name of an id that has none written: ``lapsed_customers`` → Lapsed customers."""
    return ident.replace("_", " ").capitalize()


# --- audiences ----------------------------------------------------------------------------------


def compile_audience_file(
    path: Path, settings: Settings, sink: DiagnosticSink, *, usage: Usage | None = None
) -> Audience | None:
    """Compile one audience file (its id is the file name), adding its diagnostics to ``sink``."""
    text = read_source(path, sink)
    if text is None:
        return None
    return compile_audience_text(text, str(path), settings, sink, usage=usage)


def compile_audience_text(
    text: str, path: str, settings: Settings, sink: DiagnosticSink, *, usage: Usage | None = None
) -> Audience | None:
    """Compile audience source text; ``path`` gives the id (its stem) and places messages."""
    try:
        return _compile_audience_text(text, path, settings, sink, usage or Usage())
    except RecursionError:
        sink.add(Diagnostic(path, 1, 1, "the document is nested too deeply to read: simplify it"))
        return None


def _compile_audience_text(
    text: str, path: str, settings: Settings, sink: DiagnosticSink, usage: Usage
) -> Audience | None:
    before = len(sink.errors)
    loaded = load_mapping(
        text, path, sink, "an audience file is a mapping with where:, did:, not_did: or subscribed:", empty=True
    )
    if loaded is None:
        return None
    data, smap = loaded
    stem = check_file_id(path, "audience", sink)
    doc: AudienceDoc | None = None
    try:
        doc = AudienceDoc.model_validate(data)
    except ValidationError as exc:
        sink.extend(_validation_diagnostics(exc, data, smap, AudienceDoc))
    _check_audience(data, smap, sink, settings, usage)
    if doc is None or len(sink.errors) > before:
        return None
    return Audience(
        id=stem,
        name=doc.name or title(stem),
        description=doc.description or "",
        where=compile_expression(doc.where) if doc.where else None,
        did=tuple(_activity(clause) for clause in doc.did),
        not_did=tuple(_activity(clause) for clause in doc.not_did),
        subscribed=tuple(doc.subscribed),
        source=path,
    )


def _activity(doc: ActivityDoc) -> Activity:
    return Activity(
        event=doc.event,
        cond=compile_expression(doc.if_) if doc.if_ else None,
        at_least=doc.at_least,
        within=parse_duration(doc.within) if doc.within else None,
        within_written=doc.within.strip() if doc.within else None,
    )


_AUDIENCE_NAMES = frozenset({"user", "event"})


def _check_audience(data: dict[str, Any], smap: SourceMap, sink: DiagnosticSink, settings: Settings, usage: Usage) -> None:
    """Topics, event names and reads of an audience file against the project."""
    topics = data.get("subscribed")
    for index, topic in enumerate(topics if isinstance(topics, list) else []):
        if isinstance(topic, str) and IDENT.match(topic) and topic not in settings.topics:
            declared = f"declared topics: {', '.join(settings.topics)}" if settings.topics else "no topics are declared"
            sink.add(
                smap.diagnostic(
                    ("subscribed", index),
                    f"unknown topic '{topic}'{did_you_mean(topic, settings.topics)}; {declared} (add it to topics: in nurture.yaml)",
                )
            )
    places: list[tuple[KeyPath, Any, EventScope]] = [(("where",), data.get("where"), EventScope())]
    for key in ("did", "not_did"):
        clauses = data.get(key)
        for index, clause in enumerate(clauses if isinstance(clauses, list) else []):
            if not isinstance(clause, dict):
                continue
            name = clause.get("event")
            here: KeyPath = (key, index)
            if isinstance(name, str) and name:
                _check_counted_event(name, here + ("event",), smap, sink, settings, usage)
            places.append((here + ("if",), clause.get("if"), EventScope(event=(name,) if isinstance(name, str) else ())))
    for path, source, where in places:
        if not isinstance(source, str):
            continue
        try:
            names = compile_expression(source).names
        except ExpressionError:
            continue  # reported by validation
        for name in names:
            if name not in _AUDIENCE_NAMES or (name == "event" and path == ("where",)):
                sink.add(smap.diagnostic(path, _audience_name_message(name, path)))
        _check_reads(path, source, where, smap, sink, settings.declarations, usage, value=False)


def _audience_name_message(name: str, path: KeyPath) -> str:
    if path == ("where",):
        return (
            f"where: is about the person and reads user only, not {name}: "
            "a condition on events goes in the if: of a did: or not_did: clause"
        )
    return f"an audience clause reads user and event only, not {name}"


def _check_counted_event(
    name: str, path: KeyPath, smap: SourceMap, sink: DiagnosticSink, settings: Settings, usage: Usage
) -> None:
    if name in (ENTERED, EXITED):
        sink.add(smap.diagnostic(path, f"an audience cannot count '{name}' events: name the events that make a person a member"))
        return
    usage.add_event(name)
    events = settings.declarations.events
    if events is not None and name not in events:
        sink.add(smap.diagnostic(path, f"unknown event '{name}'{did_you_mean(name, events)}: declare it under events: in nurture.yaml"))


# --- checks on the raw document ----------------------------------------------------------------


def _raw_steps(items: Any, path: KeyPath) -> Iterator[tuple[KeyPath, dict[str, Any]]]:
    """Every step mapping under a step list, nested ones included, with its path."""
    if not isinstance(items, list):
        return
    for index, step in enumerate(items):
        if not isinstance(step, dict):
            continue
        here = path + (index,)
        yield here, step
        kind = step_kind(step)
        for key in ("then", "else"):
            if kind == "wait_for":
                yield from _raw_steps(step.get(key), here + (key,))
        if kind == "branch" and isinstance(step.get("branch"), list):
            for arm_index, arm in enumerate(step["branch"]):
                if isinstance(arm, dict):
                    for key in ("then", "else"):
                        yield from _raw_steps(arm.get(key), here + ("branch", arm_index, key))
        if kind == "split" and isinstance(step.get("variants"), dict):
            for name, variant in step["variants"].items():
                if isinstance(variant, dict):
                    yield from _raw_steps(variant.get("steps"), here + ("variants", name, "steps"))


def _step_lists(data: dict[str, Any]) -> Iterator[tuple[KeyPath, list[Any]]]:
    if isinstance(data.get("steps"), list):
        yield ("steps",), data["steps"]
    for path, step in _raw_steps(data.get("steps"), ("steps",)):
        for key, value in step.items():
            if key in ("then", "else") and isinstance(value, list):
                yield path + (key,), value
        if isinstance(step.get("branch"), list):
            for index, arm in enumerate(step["branch"]):
                for key in ("then", "else"):
                    if isinstance(arm, dict) and isinstance(arm.get(key), list):
                        yield path + ("branch", index, key), arm[key]
        if isinstance(step.get("variants"), dict):
            for name, variant in step["variants"].items():
                if isinstance(variant, dict) and isinstance(variant.get("steps"), list):
                    yield path + ("variants", name, "steps"), variant["steps"]


def validate_journey(
    data: dict[str, Any],
    smap: SourceMap,
    path: str,
    templates: TemplateStore,
    sink: DiagnosticSink,
    checked_templates: set[tuple[str, str]] | None,
    settings: Settings,
) -> JourneyDoc | None:
    """The validated journey document of ``data`` (``None`` when invalid) and the checks of its raw
    form (ids, steps, templates), their diagnostics added to ``sink``; journeys and broadcasts share it."""
    doc: JourneyDoc | None = None
    try:
        doc = JourneyDoc.model_validate(data)
    except ValidationError as exc:
        sink.extend(_validation_diagnostics(exc, data, smap))
    journey_id = data.get("journey")
    stem = Path(path).stem
    if isinstance(journey_id, str) and journey_id != stem:
        sink.add(
            smap.diagnostic(
                ("journey",),
                f"journey id '{journey_id}' must equal the file name '{stem}': "
                f"rename the file to {journey_id}.yaml or set journey: {stem}",
            )
        )
    _check_date_trigger(data.get("trigger"), smap, sink)
    seen_ids: dict[str, KeyPath] = {}
    for step_path, step in _raw_steps(data.get("steps"), ("steps",)):
        step_id = step.get("id")
        if isinstance(step_id, str):
            if step_id in seen_ids:
                first = smap.value(seen_ids[step_id] + ("id",))
                sink.add(
                    smap.diagnostic(
                        step_path + ("id",),
                        f"duplicate step id '{step_id}' (first used on line {first.line}); ids are unique in a journey",
                    )
                )
            else:
                seen_ids[step_id] = step_path
        if step_kind(step) == "send":
            order = data.get("channel_order")
            if not (isinstance(order, list) and all(isinstance(c, str) for c in order)):
                order = list(settings.policy.channel_order)
            _check_send(step, step_path, smap, templates, sink, checked_templates, settings, order)
        if step_kind(step) == "wait_until" and isinstance(step["wait_until"], dict) and "days" in step:
            sink.add(
                smap.diagnostic(
                    step_path + ("days",),
                    'days go with a time of day (wait_until: "10:00"), not with a date: remove days',
                    at_key=True,
                )
            )
        if step_kind(step) == "split":
            variants = step.get("variants")
            if isinstance(variants, dict) and variants:
                weights = [v.get("weight") for v in variants.values() if isinstance(v, dict)]
                if all(isinstance(w, int) for w in weights) and sum(w for w in weights if isinstance(w, int)) == 0:
                    sink.add(smap.diagnostic(step_path + ("variants",), "variant weights add up to 0: give at least one a positive weight"))
        if step_kind(step) == "branch" and isinstance(step.get("branch"), list):
            arms = step["branch"]
            for index, arm in enumerate(arms[:-1]):
                if isinstance(arm, dict) and "else" in arm and "if" not in arm:
                    sink.add(smap.diagnostic(step_path + ("branch", index), "the else arm must be the last arm of a branch"))
    for list_path, items in _step_lists(data):
        for index, step in enumerate(items[:-1]):
            if isinstance(step, dict) and step_kind(step) == "exit":
                sink.add(
                    smap.diagnostic(
                        list_path + (index + 1,),
                        "this step can never run: it follows an exit step in the same list; "
                        "remove it or move the exit after it",
                    )
                )
                break
    return doc


def _audience_refs(data: dict[str, Any]) -> Iterator[tuple[KeyPath, Any]]:
    """Where the journey names an audience (trigger, goal, ``wait_for``), and the name."""
    for key in ("trigger", "goal"):
        rule = data.get(key)
        if isinstance(rule, dict) and "audience" in rule:
            yield (key, "audience"), rule["audience"]
    for step_path, step in _raw_steps(data.get("steps"), ("steps",)):
        waited = step.get("wait_for") if step_kind(step) == "wait_for" else None
        if isinstance(waited, dict) and "audience" in waited:
            yield step_path + ("wait_for", "audience"), waited["audience"]


def _check_audiences(data: dict[str, Any], smap: SourceMap, sink: DiagnosticSink, audiences: Collection[str]) -> None:
    """Every audience a journey names is one of the project's."""
    for path, name in _audience_refs(data):
        if not isinstance(name, str) or not IDENT.match(name) or name in audiences:
            continue  # a malformed id is reported by validation
        known = f"the project's audiences: {', '.join(sorted(audiences))}" if audiences else "the project has none"
        sink.add(
            smap.diagnostic(
                path, f"unknown audience '{name}'{did_you_mean(name, audiences)}; {known} (create audiences/{name}.yaml)"
            )
        )


def _check_date_trigger(trigger: Any, smap: SourceMap, sink: DiagnosticSink) -> None:
    """A date read from an event needs that event named; one read from traits has no event."""
    if not isinstance(trigger, dict) or "date" not in trigger or trigger.get("event"):
        return
    for name in ("date", "if"):
        text = trigger.get(name)
        if not isinstance(text, str):
            continue
        try:
            names = compile_expression(text).names
        except ExpressionError:
            continue  # reported by validation
        if "event" in names:
            sink.add(
                smap.diagnostic(
                    ("trigger", name),
                    "this reads the event, but no event is named: add event: (the event that carries "
                    "the date, e.g. event: Subscription Renewed), or read the date from user traits",
                )
            )


def _check_send(
    step: dict[str, Any],
    step_path: KeyPath,
    smap: SourceMap,
    templates: TemplateStore,
    sink: DiagnosticSink,
    checked_templates: set[tuple[str, str]] | None,
    settings: Settings,
    order: list[str],
) -> None:
    name = step.get("template")
    primary = step.get("send")
    fallback: list[Any] = step["fallback"] if isinstance(step.get("fallback"), list) else []
    _check_topic(step, step_path, smap, sink, settings)
    if primary == "auto" and fallback:
        sink.add(
            smap.diagnostic(
                step_path + ("fallback",),
                "send: auto falls back through channel_order by itself: remove fallback, or name a channel",
            )
        )
        return
    if not isinstance(name, str) or not name:
        return
    if not valid_name(name):
        # One name serves every channel the send may use, so a path to one channel's file is
        # not accepted as if it were the name: the marketer is told the name to write.
        meant = name_in_path(name)
        fix = f"write 'template: {meant}'" if valid_name(meant) else "use letters, digits, '-' and '_' only"
        sink.add(
            smap.diagnostic(
                step_path + ("template",),
                f"'{name}' is not a template name: {fix} (the name without folder, locale or "
                f"extension; each channel reads its own file, e.g. {templates.path('email', meant or 'name')})",
            )
        )
        return
    auto = primary == "auto"
    channels = order if auto else [primary, *fallback]
    for index, channel in enumerate(channels):
        if not isinstance(channel, str) or channel not in ("email", "sms", "wechat"):
            continue
        where: KeyPath = step_path + (("template",) if index == 0 or auto else ("fallback", index - 1))
        if index > 0 and channel in channels[:index]:
            sink.add(smap.diagnostic(where, f"channel '{channel}' is listed twice; each channel is tried once"))
            continue
        if not templates.exists(channel, name):
            hint = did_you_mean(name, templates.names(channel))
            expected = templates.path(channel, name)
            sink.add(
                smap.diagnostic(
                    where,
                    f"no {channel} template '{name}'{hint}: create {expected}"
                    + (
                        f" (send: auto may use any channel of channel_order: {', '.join(order)})"
                        if auto
                        else "" if index == 0 else f" (needed for the {channel} fallback)"
                    ),
                )
            )
            continue
        if checked_templates is not None:
            if (channel, name) in checked_templates:
                continue
            checked_templates.add((channel, name))
        sink.extend(templates.check(channel, name, sms_max_segments=settings.sms_max_segments))


def _check_topic(
    step: dict[str, Any], step_path: KeyPath, smap: SourceMap, sink: DiagnosticSink, settings: Settings
) -> None:
    if step.get("category") == "transactional" and "rate" in step:
        sink.add(
            smap.diagnostic(
                step_path + ("rate",),
                "a transactional send is never held back, so it has no rate: remove rate, or make it marketing",
                at_key=True,
            )
        )
    topic = step.get("topic")
    if not isinstance(topic, str):
        return
    if step.get("category") == "transactional":
        sink.add(
            smap.diagnostic(
                step_path + ("topic",),
                "a transactional send ignores subscriptions, so it has no topic: remove topic, or make it marketing",
            )
        )
    elif topic not in settings.topics:
        declared = f"declared topics: {', '.join(settings.topics)}" if settings.topics else "no topics are declared"
        sink.add(
            smap.diagnostic(
                step_path + ("topic",),
                f"unknown topic '{topic}'{did_you_mean(topic, settings.topics)}; {declared} "
                "(add it to topics: in nurture.yaml)",
            )
        )


# --- declared traits and events ----------------------------------------------------------------


def _check_declared(
    data: dict[str, Any],
    smap: SourceMap,
    templates: TemplateStore,
    sink: DiagnosticSink,
    settings: Settings,
    usage: Usage,
) -> None:
    """Event names, reads of ``user``, ``event`` and ``last_event`` (in expressions and in the
    templates the journey sends) and updated traits, against ``nurture.yaml``'s declarations."""
    declared = settings.declarations
    steps = list(_raw_steps(data.get("steps"), ("steps",)))
    waits = tuple(
        dict.fromkeys(
            waited
            for _, step in steps
            if step_kind(step) == "wait_for" and isinstance(waited := _rule_event(step["wait_for"]), str)
        )
    )

    def scope(rule: Any) -> EventScope:
        event = _rule_event(rule)
        return EventScope(event=(event,) if isinstance(event, str) else (), last_event=waits)

    trigger = data.get("trigger")
    main = scope(trigger)
    named: list[tuple[KeyPath, Any]] = []
    places: list[tuple[KeyPath, Any, EventScope]] = [(("key",), data.get("key"), main)]
    rules: list[tuple[KeyPath, Any]] = [(("trigger",), trigger), (("goal",), data.get("goal"))]
    exits = data.get("exit_on")
    rules += [(("exit_on", index), rule) for index, rule in enumerate(exits)] if isinstance(exits, list) else []
    for rule_path, rule in rules:
        if isinstance(rule, dict):
            if "audience" not in rule:
                named.append((rule_path + ("event",), rule.get("event")))
            keys = ("if", "value") if rule_path == ("goal",) else ("if", "date")
            places += [(rule_path + (key,), rule.get(key), scope(rule)) for key in keys]
    for step_path, step in steps:
        kind = step_kind(step)
        if kind == "wait_for":
            if not isinstance(step["wait_for"], dict):
                named.append((step_path + ("wait_for",), step["wait_for"]))
            places.append((step_path + ("if",), step.get("if"), scope(step["wait_for"])))
        elif kind == "wait_until" and isinstance(step["wait_until"], dict):
            places.append((step_path + ("wait_until", "date"), step["wait_until"].get("date"), main))
        elif kind == "branch" and isinstance(step["branch"], list):
            for index, arm in enumerate(step["branch"]):
                if isinstance(arm, dict):
                    places.append((step_path + ("branch", index, "if"), arm.get("if"), main))
        elif kind == "update" and isinstance(step["update"], dict):
            _check_updates(step["update"], step_path + ("update",), smap, sink, declared, usage)
            places += [(step_path + ("update", k), v, main) for k, v in step["update"].items() if isinstance(k, str)]
    for path, name in named:
        if not isinstance(name, str) or not name:
            continue
        usage.add_event(name)
        if declared.events is not None and name not in declared.events:
            sink.add(smap.diagnostic(path, unknown_event(name, declared)))
    for path, source, where in places:
        _check_reads(path, source, where, smap, sink, declared, usage, value=path[-2:-1] == ("update",))
    journey_id = data.get("journey") if isinstance(data.get("journey"), str) else Path(smap.path).stem
    in_templates = dataclasses.replace(main, context=f"the trigger of journey {journey_id}")
    found: dict[Diagnostic, None] = {}
    for read in _template_reads(data, steps, templates, settings):
        usage.add_read(read.read, main)
        problem = read_problem(read.read, declared, in_templates)
        if problem is not None:
            index, message = problem
            column = read.columns[index] if index < len(read.columns) else read.columns[-1]
            found[Diagnostic(read.path, read.line, column, message)] = None
    sink.extend(found)


def _rule_event(rule: Any) -> Any:
    """The event a raw trigger, goal, ``exit_on`` or ``wait_for`` is about: an audience's is the
    audience event (entry, or exit with ``on: exit``)."""
    if isinstance(rule, dict) and "audience" in rule:
        return EXITED if rule.get("on") == "exit" else ENTERED
    return rule.get("event") if isinstance(rule, dict) else rule


def _check_reads(
    path: KeyPath,
    source: Any,
    where: EventScope,
    smap: SourceMap,
    sink: DiagnosticSink,
    declared: Declarations,
    usage: Usage,
    *,
    value: bool,
) -> None:
    if not isinstance(source, str):
        return
    try:
        expr = compile_value(source) if value else compile_expression(source)
    except ExpressionError:
        return  # reported by validation
    for read in reads(expr.tree):
        usage.add_read(read, where)
        problem = read_problem(read, declared, where)
        if problem is not None:
            sink.add(_at_read(smap, path, source, read, *problem))
    for read, message in comparison_problems(expr.tree, declared, where):
        sink.add(_at_read(smap, path, source, read, -1, message))


def _at_read(smap: SourceMap, path: KeyPath, source: str, read: Read, index: int, message: str) -> Diagnostic:
    """A diagnostic at key ``index`` of ``read`` (-1: at the whole read) as written in the
    expression at ``path``."""
    diagnostic = smap.diagnostic(path, message)
    found = read.pattern(max(index, len(read.keys) - 1 if index < 0 else index)).search(source)
    if found is None:
        return diagnostic
    start = found.start() if index < 0 else found.start(1)
    return dataclasses.replace(diagnostic, column=_column_in_value(smap, diagnostic, source, start))


def _check_updates(
    update: dict[Any, Any], path: KeyPath, smap: SourceMap, sink: DiagnosticSink, declared: Declarations, usage: Usage
) -> None:
    """Updated traits are declared, and a plain value fits the declared type."""
    for name, value in update.items():
        if not isinstance(name, str):
            continue
        usage.add_read(Read("user", (name,)), EventScope())
        computed = isinstance(value, str) and ("{{" in value or "{%" in value)
        for fault in trait_faults(declared, {name: None if computed else value}, undeclared=True):
            sink.add(smap.diagnostic(path + (name,), fault.describe("trait"), at_key=fault.type is None))


def _template_reads(
    data: dict[str, Any], steps: list[tuple[KeyPath, dict[str, Any]]], templates: TemplateStore, settings: Settings
) -> Iterator[TemplateRead]:
    """The reads in every template file a send of the journey may use."""
    order = data.get("channel_order")
    if not (isinstance(order, list) and all(isinstance(c, str) for c in order)):
        order = list(settings.policy.channel_order)
    seen: set[tuple[str, str]] = set()
    for _, step in steps:
        name = step.get("template")
        if step_kind(step) != "send" or not isinstance(name, str) or not valid_name(name):
            continue
        fallback = step["fallback"] if isinstance(step.get("fallback"), list) else []
        for channel in order if step["send"] == "auto" else [step["send"], *fallback]:
            if channel in ir.CHANNELS and (channel, name) not in seen and templates.exists(channel, name):
                seen.add((channel, name))
                yield from templates.reads(channel, name)


# --- pydantic errors as marketer-facing diagnostics --------------------------------------------


def _clean_loc(loc: tuple[Any, ...]) -> tuple[KeyPath, bool]:
    """Drop union tags pydantic inserts after list indexes; report whether a key is at fault."""
    out: list[str | int] = []
    at_key = False
    skip = False
    for index, part in enumerate(loc):
        if skip:
            skip = False
            continue
        if part == "[key]" and index == len(loc) - 1 and index > 0:
            at_key = True
            continue
        if isinstance(part, str) and (part.startswith(("function-after[", "literal[")) or part in FORM_TAGS):
            continue  # the union member pydantic tried, not a key of the file
        out.append(part)
        if isinstance(part, int) and index > 0 and loc[index - 1] in _STEP_LISTS:
            skip = True
    return tuple(out), at_key


def _lookup(data: Any, path: KeyPath) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


_MODEL_AT = {
    "trigger": EventRuleDoc,
    "goal": GoalDoc,
    "quiet_hours": QuietHoursDoc,
    "providers": ProvidersDoc,
    "frequency_caps": FrequencyCapsDoc,
    "holdout": HoldoutDoc,
    "wait": RandomWaitDoc,
    "wait_until": DateWaitDoc,
    "re_entry": ReEntryDoc,
    "schedule": ScheduleDoc,
}
_PROJECT_ONLY = frozenset(ProjectDoc.model_fields) - frozenset(JourneyDoc.model_fields)
"""Keys of ``nurture.yaml`` a journey cannot set."""


def _keys_for(path: KeyPath, value: Any, root: type[Any] | None = None) -> tuple[str, ...]:
    """Keys allowed in the mapping at ``path`` (for "did you mean"); ``root`` is the model of the
    whole file when it is neither a journey nor ``nurture.yaml``."""
    keys = allowed_keys(value)
    if keys is not None:
        return keys
    model: type[Any] = JourneyDoc
    audience = isinstance(value, dict) and "audience" in value
    if not path:
        model = JourneyDoc if "journey" in (value or {}) or "steps" in (value or {}) else ProjectDoc
        if root is not None:
            model = root
    elif root is AudienceDoc:
        model = ActivityDoc
    elif path == ("trigger",) and audience:
        model = AudienceTriggerDoc
    elif path == ("goal",) and audience:
        model = AudienceGoalDoc
    elif path[-1] == "wait_for":
        model = AudienceWaitDoc
    elif path == ("trigger",) and isinstance(value, dict) and "date" in value:
        model = DateTriggerDoc
    elif path[-1] in _MODEL_AT:
        model = _MODEL_AT[str(path[-1])]
    elif len(path) == 2 and path[0] == "traits":
        model = TraitDoc
    elif len(path) == 2 and path[0] == "events":
        model = EventDoc
    elif len(path) == 4 and path[0] == "events" and path[2] == "properties":
        model = PropertyDoc
    elif len(path) == 2 and path[0] == "providers" and path[1] in PROVIDER_DOCS:
        model = PROVIDER_DOCS[str(path[1])]
    elif len(path) >= 2 and path[-2] == "exit_on":
        model = EventRuleDoc
    elif len(path) >= 2 and path[-2] == "variants":
        model = VariantDoc
    elif len(path) >= 2 and path[-2] == "branch":
        model = ElseArmDoc if isinstance(value, dict) and "else" in value and "if" not in value else ArmDoc
    elif len(path) >= 2 and path[-2] in _STEP_LISTS:
        return STEP_KINDS + ("id",)
    return tuple(f.alias or name for name, f in model.model_fields.items())


def _validation_diagnostics(
    exc: ValidationError, data: Any, smap: SourceMap, root: type[Any] | None = None
) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    seen: set[tuple[KeyPath, str]] = set()
    for error in exc.errors():
        loc, at_key = _clean_loc(tuple(error["loc"]))
        kind = error["type"]
        value = error.get("input")
        ctx = error.get("ctx") or {}
        parent = loc[:-1]
        report_path, use_key, column_shift = loc, at_key, None
        if kind == "missing":
            report_path = parent
            message = f"'{loc[-1]}' is required" + _missing_hint(str(loc[-1]))
        elif kind == "extra_forbidden":
            name = str(loc[-1])
            candidates = _keys_for(parent, _lookup(data, parent), root)
            hint = did_you_mean(name, candidates)
            if not hint:
                hint = f"; allowed keys: {', '.join(candidates)}"
            message = f"unknown key '{name}'{hint}"
            if not parent and name in _PROJECT_ONLY and "journey" in candidates:
                message = f"'{name}' is project-wide: set it in nurture.yaml, not in a journey"
            use_key = True
        elif kind == "union_tag_not_found":
            message = _step_shape_message(_lookup(data, loc), loc)
        elif kind in ("string_type",):
            message = f"expected text, got {describe_value(value)}" + (
                "; quote it" if isinstance(value, (int, float, bool)) else ""
            )
        elif kind in ("int_type", "int_from_float"):
            message = f"expected a whole number, got {describe_value(value)}"
        elif kind == "float_type":
            message = f"expected a number, got {describe_value(value)}"
        elif kind == "bool_type":
            message = f"expected true or false, got {describe_value(value)}"
        elif kind == "list_type":
            message = f"expected a list ('- item' lines), got {describe_value(value)}"
        elif kind in ("dict_type", "model_type", "model_attributes_type"):
            message = f"expected a mapping ('key: value' lines), got {describe_value(value)}"
        elif kind == "literal_error":
            expected = ctx.get("expected", "")
            options = [o.strip(" '") for o in expected.replace(" or ", ",").split(",") if o.strip()]
            # Options are short words (mon, sms): a looser match still helps.
            hint = did_you_mean(str(value), options, cutoff=0.5) if isinstance(value, str) else ""
            message = f"{describe_value(value)} is not allowed{hint}; expected {expected}"
        elif kind in ("too_short", "string_too_short"):
            message = "must not be empty"
        elif kind == "greater_than_equal":
            message = f"must be at least {ctx.get('ge')}, got {value}"
        else:
            message = str(error["msg"])
            if kind == "expression":
                column = int(ctx.get("column", 0))
                column_shift = column - 1 if column > 0 else None
        if (report_path, message) in seen:
            continue
        seen.add((report_path, message))
        diagnostic = smap.diagnostic(report_path, message, at_key=use_key)
        if column_shift is not None:
            diagnostic = dataclasses.replace(diagnostic, column=_column_in_value(smap, diagnostic, value, column_shift))
        out.append(diagnostic)
    return out


def _column_in_value(smap: SourceMap, diagnostic: Diagnostic, value: Any, shift: int) -> int:
    """The file column ``shift`` characters into the text value the diagnostic points at.

    Exact for a value written on one line, quoted or not; where the file spells the value
    differently (escapes, a block scalar over several lines) the value's start is kept.
    """
    lines = smap.text.splitlines()
    line = lines[diagnostic.line - 1] if 0 < diagnostic.line <= len(lines) else ""
    start = diagnostic.column - 1
    if line[start : start + 1] in ("'", '"'):
        start += 1
    if isinstance(value, str) and line[start : start + shift] == value[:shift]:
        return start + shift + 1
    return diagnostic.column


def _missing_hint(name: str) -> str:
    hints = {
        "timeout": " (how long to wait, e.g. timeout: 24h)",
        "type": f" (one of {', '.join(TYPES)})",
        "template": " (the template name, e.g. template: welcome)",
        "trigger": " (e.g. trigger: {event: Signed Up})",
        "steps": " (a non-empty list of steps)",
        "journey": " (the journey id, equal to the file name)",
        "event": " (the event name, e.g. event: Order Completed)",
        "weight": " (a whole number, e.g. weight: 50)",
        "then": " (the steps to run when the condition is true)",
        "percent": " (the share of users held out, e.g. percent: 5)",
        "salt": ' (any text; a new salt draws a new group, e.g. salt: "2026-q1")',
    }
    return hints.get(name, "")


def _step_shape_message(value: Any, loc: KeyPath) -> str:
    if len(loc) >= 2 and loc[-2] == "branch":
        return "a branch arm is a mapping with 'if:' and 'then:', or a last 'else:'"
    if not isinstance(value, dict):
        return f"a step is a mapping like '- wait: 1h', got {describe_value(value)}"
    kinds = [k for k in STEP_KINDS if k in value]
    if len(kinds) > 1:
        return (
            f"a step has exactly one kind key, found {' and '.join(kinds)}: "
            "put each in its own '- ' list item"
        )
    unknown = [k for k in value if k != "id"]
    for key in unknown:
        hint = did_you_mean(str(key), STEP_KINDS)
        if hint:
            return f"unknown step kind '{key}'{hint}"
    return f"a step needs one kind key: {', '.join(STEP_KINDS)}"


# --- the typed form ----------------------------------------------------------------------------


def _quiet(doc: ChannelQuietHoursDoc | None) -> ir.QuietHours | None:
    if doc is None:
        return None
    return ir.QuietHours(start=_minutes(doc.start), end=_minutes(doc.end))


def _policy(doc: PolicyFields, quiet: QuietHoursDoc | None, base: ir.Policy) -> ir.Policy:
    """``base`` with what ``doc`` sets (a journey's settings override the project's)."""
    caps = base.caps
    if doc.frequency_caps is not None:
        caps = tuple(
            ir.Cap(scope=scope, per_day=cap.per_day, per_week=cap.per_week)
            for scope in ("all", "email", "sms", "wechat")
            if (cap := getattr(doc.frequency_caps, scope)) is not None
        )
    quiet_by = base.quiet_by_channel
    if quiet is not None:
        quiet_by = tuple(
            ir.ChannelQuiet(channel, _quiet(own) if isinstance(own, ChannelQuietHoursDoc) else None)
            for channel in ("email", "sms", "wechat")
            if (own := getattr(quiet, channel)) is not None
        )
    return ir.Policy(
        caps=caps,
        on_cap=doc.on_cap or base.on_cap,
        channel_order=tuple(doc.channel_order) if doc.channel_order else base.channel_order,
        quiet_by_channel=quiet_by,
        holdout=base.holdout,
    )


def _holdout(doc: HoldoutDoc | None) -> ir.Holdout | None:
    return None if doc is None else ir.Holdout(percent=float(doc.percent), salt=doc.salt)


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def _audience_rule(audience: str, on: str, written: str | None) -> ir.EventRule:
    """An audience trigger or ``wait_for`` as the event rule it stands for."""
    event = EXITED if on == "exit" else ENTERED
    return ir.EventRule(event=event, cond=compile_expression(condition_source(audience, written)), audience=audience)


def _trigger_rule(doc: EventRuleDoc | DateTriggerDoc | AudienceTriggerDoc) -> ir.EventRule:
    if isinstance(doc, AudienceTriggerDoc):
        return _audience_rule(doc.audience, doc.on, doc.if_)
    if isinstance(doc, EventRuleDoc):
        return _rule(doc)
    # A date read from the traits has no trigger event: no event name is empty, so none matches.
    return ir.EventRule(event=doc.event or "", cond=compile_expression(doc.if_) if doc.if_ else None)


def _date_trigger(doc: EventRuleDoc | DateTriggerDoc | AudienceTriggerDoc) -> ir.DateTrigger | None:
    if not isinstance(doc, DateTriggerDoc):
        return None
    return ir.DateTrigger(
        date=compile_expression(doc.date),
        offset=0 if doc.offset is None else parse_signed_duration(doc.offset),
        minute=None if doc.at is None else _minutes(doc.at),
        yearly=doc.every == "year",
    )


def compile_rate(text: str | None) -> ir.Rate | None:
    """The compiled form of a rate as written (``1000/h``); ``None`` for none."""
    if text is None:
        return None
    count, per = parse_rate(text)
    return ir.Rate(count=count, per=per, written=text.strip())


def _rule(doc: EventRuleDoc) -> ir.EventRule:
    return ir.EventRule(event=doc.event, cond=compile_expression(doc.if_) if doc.if_ else None)


def build_journey(doc: JourneyDoc, settings: Settings, source: str) -> ir.Journey:
    """The intermediate form of a validated document, with its content version."""
    goal = None
    if isinstance(doc.goal, AudienceGoalDoc):
        entered = _audience_rule(doc.goal.audience, "enter", doc.goal.if_)
        goal = ir.Goal(
            event=entered.event,
            cond=entered.cond,
            within=parse_duration(doc.goal.within) if doc.goal.within else None,
            exit=doc.goal.exit,
            within_written=doc.goal.within.strip() if doc.goal.within else None,
            measured_from=doc.goal.from_,
            audience=doc.goal.audience,
        )
    elif doc.goal is not None:
        goal = ir.Goal(
            event=doc.goal.event,
            cond=compile_expression(doc.goal.if_) if doc.goal.if_ else None,
            within=parse_duration(doc.goal.within) if doc.goal.within else None,
            exit=doc.goal.exit,
            within_written=doc.goal.within.strip() if doc.goal.within else None,
            value=compile_expression(doc.goal.value) if doc.goal.value else None,
            measured_from=doc.goal.from_,
        )
    journey = ir.Journey(
        id=doc.journey,
        version="",
        name=doc.name or title(doc.journey),
        description=doc.description or "",
        trigger=_trigger_rule(doc.trigger),
        date_trigger=_date_trigger(doc.trigger),
        key=compile_expression(doc.key) if doc.key else None,
        re_entry="after_exit" if isinstance(doc.re_entry, ReEntryDoc) else doc.re_entry,
        re_entry_after=parse_duration(doc.re_entry.after) if isinstance(doc.re_entry, ReEntryDoc) else 0,
        goal=goal,
        exit_on=tuple(_rule(r) for r in doc.exit_on),
        timezone=doc.timezone or settings.timezone,
        quiet_hours=_quiet(doc.quiet_hours) or settings.quiet_hours,
        policy=_policy(doc, doc.quiet_hours, settings.policy),
        rate=compile_rate(doc.rate),
        steps=_Ids(doc).steps(doc.steps, "s"),
        source=source,
    )
    return dataclasses.replace(journey, version=ir.content_version(journey))


class _Ids:
    """Generated step ids (``s2``, ``s3.then.1``) that never take an id a step declares."""

    def __init__(self, doc: JourneyDoc) -> None:
        self.taken: set[str] = set()
        self._collect(doc.steps)

    def _collect(self, docs: list[Any]) -> None:
        for step in docs:
            if step.id is not None:
                self.taken.add(step.id)
            if isinstance(step, WaitForDoc):
                self._collect(step.then)
                self._collect(step.else_)
            elif isinstance(step, BranchDoc):
                for arm in step.branch:
                    self._collect(arm.then if isinstance(arm, ArmDoc) else arm.else_)
            elif isinstance(step, SplitDoc):
                for variant in step.variants.values():
                    self._collect(variant.steps)

    def steps(self, docs: list[Any], prefix: str) -> tuple[ir.Step, ...]:
        separator = "" if prefix == "s" else "."
        out = []
        for number, step in enumerate(docs, 1):
            step_id = step.id
            if step_id is None:
                step_id = f"{prefix}{separator}{number}"
                while step_id in self.taken:
                    step_id += "_"
            out.append(_build_step(step, step_id, self))
        return tuple(out)


def _build_step(doc: StepDoc, step_id: str, ids: _Ids) -> ir.Step:
    if isinstance(doc, WaitDoc):
        if isinstance(doc.wait, RandomWaitDoc):
            low, high = parse_duration_range(doc.wait.random)
            return ir.Wait(id=step_id, seconds=low, written=doc.wait.random.strip(), spread=high - low)
        return ir.Wait(id=step_id, seconds=parse_duration(doc.wait), written=doc.wait.strip())
    if isinstance(doc, WaitUntilDoc):
        if isinstance(doc.wait_until, DateWaitDoc):
            when = doc.wait_until
            return ir.WaitUntil(
                id=step_id,
                minute=None if when.at is None else _minutes(when.at),
                date=compile_expression(when.date),
                offset=0 if when.offset is None else parse_signed_duration(when.offset),
            )
        days = tuple(ir.WEEKDAYS.index(d) for d in doc.days or ())
        return ir.WaitUntil(id=step_id, minute=_minutes(doc.wait_until), days=tuple(sorted(set(days))))
    if isinstance(doc, SendDoc):
        return ir.Send(
            id=step_id,
            channel=doc.send,
            template=doc.template,
            fallback=tuple(doc.fallback),
            category=doc.category,
            topic=doc.topic,
            rate=compile_rate(doc.rate),
        )
    if isinstance(doc, WaitForDoc):
        if isinstance(doc.wait_for, AudienceWaitDoc):
            rule = _audience_rule(doc.wait_for.audience, doc.wait_for.on, doc.if_)
        else:
            rule = ir.EventRule(doc.wait_for, compile_expression(doc.if_) if doc.if_ else None)
        return ir.WaitFor(
            id=step_id,
            event=rule.event,
            timeout=parse_duration(doc.timeout),
            timeout_written=doc.timeout.strip(),
            cond=rule.cond,
            audience=rule.audience,
            then=ids.steps(doc.then, f"{step_id}.then"),
            otherwise=ids.steps(doc.else_, f"{step_id}.else"),
        )
    if isinstance(doc, BranchDoc):
        arms = []
        otherwise: tuple[ir.Step, ...] = ()
        for number, arm in enumerate(doc.branch, 1):
            if isinstance(arm, ArmDoc):
                arms.append(
                    ir.Arm(
                        cond=compile_expression(arm.if_),
                        steps=ids.steps(arm.then, f"{step_id}.arm{number}"),
                    )
                )
            else:
                assert isinstance(arm, ElseArmDoc)
                otherwise = ids.steps(arm.else_, f"{step_id}.else")
        return ir.Branch(id=step_id, arms=tuple(arms), otherwise=otherwise)
    if isinstance(doc, SplitDoc):
        return ir.Split(
            id=step_id,
            experiment=doc.split,
            variants=tuple(
                ir.Variant(name=name, weight=v.weight, steps=ids.steps(v.steps, f"{step_id}.{name}"))
                for name, v in doc.variants.items()
            ),
        )
    if isinstance(doc, UpdateDoc):
        return ir.Update(
            id=step_id,
            traits=tuple(ir.Trait(name=k, value=compile_value(v)) for k, v in doc.update.items()),
        )
    assert isinstance(doc, ExitDoc)
    return ir.Exit(id=step_id, reason=doc.exit)
