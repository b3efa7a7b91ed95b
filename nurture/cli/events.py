"""``nurture track`` and ``nurture identify``: send an event or traits to a running event API.

    nurture track u_1024 "Cart Updated" --prop cart_id=c_77 --prop item_count=2
    nurture identify u_1024 email=li@example.com vip=true --opt-out sms
    nurture identify u_1024 --unsubscribe promotions --subscribe sms

Values in ``key=value`` are read as JSON when they parse (``2``, ``true``, ``null``, ``[1, 2]``)
and as text otherwise; quote them to force text (``zip='"01234"'``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from nurture.language.ir import CHANNELS
from nurture.service.client import DEFAULT_URL, Accepted, Client, NurtureError

F = TypeVar("F", bound=Callable[..., Any])



def connection_options(func: F) -> F:
    """``--url`` and ``--write-key`` on every command that calls the API."""
    func = click.option(
        "--write-key",
        envvar="NURTURE_WRITE_KEY",
        default=None,
        help="Write key [env NURTURE_WRITE_KEY; default: the file .nurture/write_key written by `nurture up`].",
    )(func)
    func = click.option(
        "--url",
        envvar="NURTURE_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="The event API [env NURTURE_URL].",
    )(func)
    return func


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, null, lists, objects), else the text itself."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError:
        return text


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; JSON does not


def parse_pairs(pairs: Sequence[str], what: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint=what)
        values[key.strip()] = parse_value(value)
    return values


def write_key_or_fail(given: str | None) -> str:
    if given:
        return given
    stored = Path(os.environ.get("NURTURE_HOME", ".nurture")) / "write_key"
    if stored.is_file() and stored.read_text(encoding="utf-8").strip():
        return stored.read_text(encoding="utf-8").strip()
    raise click.UsageError(
        f"no write key: pass --write-key, set NURTURE_WRITE_KEY, or run `nurture up` (it writes {stored})"
    )


def call(url: str, write_key: str | None, send: Callable[[Client], Accepted]) -> None:
    """Run one call and print the server's answer; on a refusal print every field at fault."""
    # Two quick retries (same messageId): a person is waiting at the terminal.
    with Client(write_key_or_fail(write_key), base_url=url, retries=2, max_delay=2.0) as client:
        try:
            answer = send(client)
        except NurtureError as exc:
            if exc.status is None:
                raise click.ClickException(f"cannot reach the event API at {url} ({exc.message})") from exc
            lines = [f"{exc.status} {exc.error}" + (f": {exc.message}" if exc.message else "")]
            lines.extend(f"  {d['field']}: {d['message']}" for d in exc.detail)
            raise click.ClickException("\n".join(lines)) from exc
    click.echo(json.dumps(answer, indent=2, ensure_ascii=False))


@click.command()
@click.argument("user")
@click.argument("event")
@click.option("--prop", "props", multiple=True, metavar="KEY=VALUE", help="A property (repeatable).")
@click.option("--json", "props_json", metavar="JSON", help="Properties as a JSON object (--prop wins).")
@click.option("--timestamp", metavar="ISO", help="When it happened, ISO 8601 [default: now].")
@click.option(
    "--message-id", metavar="ID", help="De-duplication id: reuse it to send the same event again safely."
)
@connection_options
def track(
    user: str,
    event: str,
    props: tuple[str, ...],
    props_json: str | None,
    timestamp: str | None,
    message_id: str | None,
    url: str,
    write_key: str | None,
) -> None:
    """Send a track event: USER did EVENT."""
    properties: dict[str, Any] = {}
    if props_json is not None:
        try:
            loaded = json.loads(props_json)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--json") from exc
        if not isinstance(loaded, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--json")
        properties.update(loaded)
    properties.update(parse_pairs(props, "--prop"))
    call(
        url,
        write_key,
        lambda client: client.track(user, event, properties, timestamp=timestamp, message_id=message_id),
    )


@click.command()
@click.argument("user")
@click.argument("traits", nargs=-1, metavar="[KEY=VALUE]...")
# Channel or topic names are not checked here: the topics are the project's, and the API names
# any unknown one with the choices (and a "did you mean").
@click.option(
    "--opt-out",
    "opt_outs",
    multiple=True,
    metavar="NAME",
    help=f"A channel ({', '.join(CHANNELS)}) or topic the user opted out of (repeatable); "
    "replaces all the stored opt-outs.",
)
@click.option("--clear-opt-outs", is_flag=True, help="Opt the user back in to every channel and topic.")
@click.option(
    "--unsubscribe",
    "unsubscribe",
    multiple=True,
    metavar="NAME",
    help="Opt out of a channel or topic (repeatable), keeping the other opt-outs.",
)
@click.option(
    "--subscribe",
    "subscribe",
    multiple=True,
    metavar="NAME",
    help="Opt back in to a channel or topic (repeatable), keeping the other opt-outs.",
)
@click.option("--message-id", metavar="ID", help="De-duplication id.")
@connection_options
def identify(
    user: str,
    traits: tuple[str, ...],
    opt_outs: tuple[str, ...],
    clear_opt_outs: bool,
    unsubscribe: tuple[str, ...],
    subscribe: tuple[str, ...],
    message_id: str | None,
    url: str,
    write_key: str | None,
) -> None:
    """Merge traits into USER's profile (email=..., phone=+86..., timezone=..., vip=true)."""
    if opt_outs and clear_opt_outs:
        raise click.UsageError("--opt-out and --clear-opt-outs contradict each other")
    if (opt_outs or clear_opt_outs) and (subscribe or unsubscribe):
        raise click.UsageError(
            "--opt-out/--clear-opt-outs replace every opt-out, so they cannot be combined with "
            "--subscribe/--unsubscribe: use one or the other"
        )
    values = parse_pairs(traits, "KEY=VALUE")
    opted_out: list[str] | None = [] if clear_opt_outs else (list(opt_outs) if opt_outs else None)
    call(
        url,
        write_key,
        lambda client: client.identify(
            user,
            values,
            opted_out=opted_out,
            subscribe=list(subscribe) if subscribe else None,
            unsubscribe=list(unsubscribe) if unsubscribe else None,
            message_id=message_id,
        ),
    )
