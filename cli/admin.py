"""SRE commands of ``fleet``: inspect and steer a hub's registry through its admin API.

Every failure ends in one line on stderr and a distinct exit code, never a traceback:
2 bad usage (an option's value no hub could take), 3 auth refused, 4 unknown id, 5 hub unreachable or unavailable
(503), 1 anything else.
"""

from __future__ import annotations

import functools
import json as jsonlib
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

import httpx
import typer
from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.table import Column, Table
from rich.text import Text

from shared.auth import DEFAULT_ADMIN_TOKEN
from shared.errors import SessionNotFound, WorkerUnknown
from shared.keys import WORKER_ID_PATTERN
from shared.models import MAX_PAGE

EXIT_ERROR, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_UNAVAILABLE = 1, 2, 3, 4, 5
DEFAULT_HUB = "http://127.0.0.1:8080"
TIMEOUT = httpx.Timeout(10.0, connect=3.0)

HubOpt = typer.Option(DEFAULT_HUB, "--hub", envvar="FLEET_HUB_URL", help="Base URL of any hub.")
TokenOpt = typer.Option(DEFAULT_ADMIN_TOKEN, "--token", envvar="FLEET_ADMIN_TOKEN", show_default=False,
                        help="Admin bearer token (FLEET_ADMIN_TOKEN; the dev token by default).")
JsonOpt = typer.Option(False, "--json", help="Print the hub's JSON answer instead of a table.")

# No markup or emoji codes: cells and messages carry what workers registered and what the SRE typed ("[/x]" is a
# valid GPU name, "lesson:100:" a valid session_key).
_out = Console(highlight=False, markup=False, emoji=False)
_err = Console(stderr=True, highlight=False, markup=False, emoji=False)


def _print_table(*tables: RenderableType) -> None:
    """Fit a terminal; piped (rich would assume 80 columns), print at full width, so every cell can be grepped."""
    if _out.is_terminal:
        _out.print(*tables)
        return
    unbounded = _out.options.update_width(100_000)
    width = max(_out.measure(table, options=unbounded).maximum for table in tables)
    Console(highlight=False, markup=False, emoji=False, width=max(width, 1)).print(*tables)


def _tell(message: str) -> None:
    """A sentence on stdout, never broken across lines: piped, rich would wrap it at 80 columns, and a script's
    grep would miss it (a terminal still wraps it on screen)."""
    _out.print(message, soft_wrap=True)


def _id_column(header: str, ids: Iterable[str]) -> Column:
    """A column of ids an SRE copies into ``fleet drain ID`` or greps for: never wrapped or cut, the others
    shrink instead."""
    return Column(header, no_wrap=True, min_width=max((cell_len(i) for i in ids), default=None))


def _fail(message: str, code: int) -> NoReturn:
    _err.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)


#: The hub's answers for an id it does not know (any other 404 means the URL is not a hub's API).
_UNKNOWN_IDS = frozenset({WorkerUnknown.code, SessionNotFound.code})


def _refuse_unusable_hub(hub: str) -> None:
    """Exit 2 for a --hub no request can be sent to: without a scheme (``127.0.0.1:8080``), of another scheme or
    without a host, it is a typo to point out, not a hub that is down (httpx's UnsupportedProtocol, exit 5)."""
    try:
        url = httpx.URL(hub)
        usable = url.scheme in ("http", "https") and bool(url.host) and (url.port or 1) <= 65535
    except httpx.InvalidURL:
        usable = False
    if not usable:
        _fail(f"--hub {hub!r} is not a hub's URL: give it with http:// or https:// and a host, e.g. {DEFAULT_HUB} "
              "(FLEET_HUB_URL sets it too)", EXIT_USAGE)


def call(hub: str, token: str, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
    """One admin request; every way it can fail becomes a one-line message and an exit code."""
    _refuse_unusable_hub(hub)
    url = hub.rstrip("/") + path
    query = {k: v for k, v in (params or {}).items() if v is not None}
    token = token.strip()  # a token read from a file often ends in a line break
    if not token.isascii() or not token.isprintable():  # httpx would quote the whole header, token and all
        _fail("the admin token must be printable ASCII (it travels in an HTTP header)", EXIT_USAGE)
    try:
        with httpx.Client(timeout=TIMEOUT) as client:
            resp = client.request(method, url, params=query, headers={"Authorization": f"Bearer {token}"})
    except httpx.TimeoutException:
        _fail(f"the hub at {hub} did not answer in time", EXIT_UNAVAILABLE)
    except httpx.InvalidURL as exc:
        _fail(f"--hub {hub!r} is not a usable URL: {exc}", EXIT_USAGE)
    except httpx.LocalProtocolError as exc:  # the request could not be written; its text may quote a header
        _fail(f"the request to {hub} could not be sent ({exc.__class__.__name__})", EXIT_ERROR)
    except httpx.HTTPError as exc:  # connection refused, DNS…
        _fail(f"cannot reach the hub at {hub}: {exc.__class__.__name__}: {exc}", EXIT_UNAVAILABLE)
    if resp.status_code == 204:
        return None
    if resp.is_success:
        try:
            return resp.json()
        except ValueError:
            _fail(f"the hub answered {resp.status_code} with a body that is not JSON", EXIT_ERROR)
    body: Any = None
    try:
        body = resp.json()
        message = f"{body.get('error', resp.status_code)}: {body.get('message', '')}".rstrip(": ")
    except (ValueError, AttributeError):
        message = f"HTTP {resp.status_code}"
    if resp.status_code == 401:
        _fail(f"the hub refused the admin token (set FLEET_ADMIN_TOKEN or --token): {message}", EXIT_AUTH)
    if resp.status_code == 404:
        if isinstance(body, dict) and body.get("error") in _UNKNOWN_IDS:
            _fail(message, EXIT_NOT_FOUND)
        _fail(f"{hub} has no {path} (is --hub a hub's URL?): {message}", EXIT_ERROR)
    if resp.status_code in (502, 503, 504):  # 502/504: a load balancer with no hub behind it
        _fail(f"the hub is unavailable: {message}", EXIT_UNAVAILABLE)
    _fail(f"the hub answered {resp.status_code}: {message}", EXIT_ERROR)


def _worker_path(worker_id: str) -> str:
    """The worker's path segment; an id no worker can have is unknown here, before it can reach a URL."""
    if not re.fullmatch(WORKER_ID_PATTERN, worker_id):
        _fail(f"no worker can have the id {worker_id!r} (letters, digits, '.', '_', '-'; at most 64)",
              EXIT_NOT_FOUND)
    return f"/api/v1/workers/{worker_id}"


_Command = TypeVar("_Command", bound=Callable[..., None])


def _tolerant(command: _Command) -> _Command:
    """A hub's success answer of an unexpected shape (an older or newer hub, a proxy's page) or with a value of the
    wrong kind or range (``"n/a"`` for a figure, a time no calendar holds) is one line, not a traceback."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError, OverflowError) as exc:
            _fail(f"the hub's answer is not what this command reads ({type(exc).__name__}: {exc})", EXIT_ERROR)

    return run  # type: ignore[return-value]


def _print_json(data: Any) -> None:
    typer.echo(jsonlib.dumps(data, indent=2, sort_keys=True))


def _utc(timestamp: float) -> str:
    """Epoch seconds as UTC; a time out of range is an OverflowError however the platform's gmtime says so."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
    except OSError:  # EOVERFLOW: within time_t, beyond the C library's calendar
        raise OverflowError(f"timestamp {timestamp!r} out of range") from None


def _age(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.1f}s"


def _gpu(worker: dict[str, Any]) -> str:
    gpus = worker.get("gpus") or []
    if not gpus:
        return "—"
    names = {g["name"] for g in gpus}
    label = ", ".join(sorted(names))
    return f"{len(gpus)} x {label}" if len(gpus) > 1 else label


def _state(worker: dict[str, Any]) -> Text:
    if not worker["alive"]:
        return Text("stale", style="red")
    return Text("draining", style="yellow") if worker["state"] == "draining" else Text("ready", style="green")


def _load(worker: dict[str, Any]) -> str:
    return f"{worker['used_streams'] / worker['max_streams']:.0%}" if worker["max_streams"] else "—"


def every_page(hub: str, token: str, path: str, items: str, params: dict[str, Any]) -> dict[str, list[Any]]:
    """A whole listing, page after page (the hub answers one page per request, so that listing a large fleet never
    holds it for long), as ``{items: [...]}``."""
    listed: list[Any] = []
    cursor = None
    while True:
        data = call(hub, token, "GET", path, {**params, "limit": MAX_PAGE, "cursor": cursor})
        listed.extend(data[items])
        if data.get("next_cursor") in (None, cursor):  # the same cursor again would never end
            return {items: listed}
        cursor = data["next_cursor"]


def workers_table(workers: list[dict[str, Any]], title: str | None = None) -> Table:
    # A stale worker's figures are those of its last heartbeat; the hub routes nothing to it and its leases lapse.
    caption = "stale: streams and load as of the last heartbeat" if any(not w["alive"] for w in workers) else None
    table = Table(_id_column("id", (w["worker_id"] for w in workers)), "region", "GPU", "state", "streams", "load",
                  "GPU util", "latency", "heartbeat age", title=title, caption=caption)
    for w in workers:
        table.add_row(w["worker_id"], w["region"], _gpu(w), _state(w), f"{w['used_streams']}/{w['max_streams']}",
                      _load(w), f"{w['gpu_utilization']:.0f}%", f"{w['latency_ms']:.0f} ms",
                      _age(w["heartbeat_age_s"]))
    return table


@_tolerant
def show_worker(worker_id: str, hub: str = DEFAULT_HUB, json: bool = False,
                token: str | None = None) -> None:
    """``fleet worker ID``: one worker in full. The token defaults to FLEET_ADMIN_TOKEN, then the dev token."""
    token = token or os.environ.get("FLEET_ADMIN_TOKEN") or DEFAULT_ADMIN_TOKEN
    w = call(hub, token, "GET", _worker_path(worker_id))
    if json:
        _print_json(w)
        return
    summary = workers_table([w])  # both built before either is printed: an odd value prints nothing but the error
    details = Table.grid(padding=(0, 2))
    details.add_row("url", w["url"])
    details.add_row("zone", w["zone"] or "—")
    details.add_row("location", f"{w['location']['lat']:.2f}, {w['location']['lon']:.2f}")
    details.add_row("drain requested", str(w["drain_requested"]))
    details.add_row("instance type", w["instance_type"] or "—")
    details.add_row("engine", w["engine"] or "—")
    details.add_row("cpu / memory", f"{w['cpu_percent']:.0f}% / {w['memory_percent']:.0f}%")
    details.add_row("vram used", f"{w['vram_used_mb']} MB")
    details.add_row("error rate", f"{w['error_rate']:.2%}")
    details.add_row("labels", ", ".join(f"{k}={v}" for k, v in sorted(w["labels"].items())) or "—")
    details.add_row("registered", _utc(w["registered_at"]))
    _print_table(summary, details)


def workers(
    region: str | None = typer.Option(None, help="Only this region."),
    state: str | None = typer.Option(None, help="ready, draining or stale."),
    hub: str = HubOpt, token: str = TokenOpt, json: bool = JsonOpt,
) -> None:
    """List the registered workers."""
    if state is not None and state not in ("ready", "draining", "stale"):
        _fail(f"--state must be ready, draining or stale, not {state!r}", EXIT_USAGE)
    data = every_page(hub, token, "/api/v1/workers", "workers", {"region": region, "state": state})
    if json:
        _print_json(data)
    else:
        n = len(data["workers"])
        _print_table(workers_table(data["workers"], title=f"{n} worker{'s' * (n != 1)}"))


def _steer(worker_id: str, hub: str, token: str, action: str) -> None:
    w = call(hub, token, "POST", f"{_worker_path(worker_id)}/{action}")
    streams = f"({w['used_streams']}/{w['max_streams']} streams in use)"
    if w["state"] == "ready" and not w["alive"]:  # the drain is lifted, but the hub routes nothing to it
        _fail(f"{w['worker_id']} is resumed but stale: no heartbeat for {_age(w['heartbeat_age_s'])}, it takes no "
              "session until it heartbeats again", EXIT_ERROR)
    if w["state"] == "ready":
        _tell(f"{w['worker_id']} is ready: taking sessions again {streams}")
    elif action == "drain":
        _tell(f"{w['worker_id']} is draining: no new sessions, running ones finish {streams}")
    else:  # the hub lifted the SRE drain, but the worker drains on its own account (it is leaving)
        _fail(f"{w['worker_id']} is still draining: it drains on its own (leaving), not at an SRE's request "
              f"{streams}", EXIT_ERROR)


def drain(worker_id: str = typer.Argument(..., metavar="ID"), hub: str = HubOpt, token: str = TokenOpt) -> None:
    """Stop placing new sessions on a worker; its running sessions finish."""
    _steer(worker_id, hub, token, "drain")


def resume(worker_id: str = typer.Argument(..., metavar="ID"), hub: str = HubOpt, token: str = TokenOpt) -> None:
    """Let a drained worker take sessions again."""
    _steer(worker_id, hub, token, "resume")


def forget(worker_id: str = typer.Argument(..., metavar="ID"), hub: str = HubOpt, token: str = TokenOpt) -> None:
    """Remove a stale worker (its instance is gone) and what it held, instead of waiting for retention (1 h).
    Refused while the worker is live."""
    call(hub, token, "POST", f"{_worker_path(worker_id)}/forget")
    _tell(f"{worker_id} forgotten")


def sessions(
    worker: str | None = typer.Option(None, help="Only the sessions of this worker."),
    region: str | None = typer.Option(None, help="Only workers of this region."),
    hub: str = HubOpt, token: str = TokenOpt, json: bool = JsonOpt,
) -> None:
    """List the sessions the fleet holds."""
    data = every_page(hub, token, "/api/v1/sessions", "sessions", {"worker_id": worker, "region": region})
    data["sessions"].sort(key=lambda s: s["created_at"])  # each page is in order, the pages are by worker
    if json:
        _print_json(data)
        return
    listed = data["sessions"]
    # The session id begins with its worker's: the worker column may shrink in a narrow terminal.
    table = Table(_id_column("session", (s["session_id"] for s in listed)), "key", "worker", "region", "LiveKit",
                  "status", "age", "origin", title=f"{len(listed)} session{'s' * (len(listed) != 1)}")
    now = time.time()
    for s in data["sessions"]:
        origin = f"{s['location']['lat']:.1f}, {s['location']['lon']:.1f}" if s["location"] else "—"
        table.add_row(s["session_id"], s["session_key"] or "—", s["worker_id"], s["worker_region"],
                      s["livekit_region"], s["status"], _age(max(0.0, now - s["created_at"])), origin)
    _print_table(table)


def capacity(hub: str = HubOpt, token: str = TokenOpt, json: bool = JsonOpt) -> None:
    """Capacity per region: live and ready workers, used and free streams."""
    data = call(hub, token, "GET", "/api/v1/fleet")
    if json:
        _print_json(data)
        return
    table = Table("region", "workers", "ready", "streams used", "streams free", "max", "full", title="capacity")
    for r in [*data["regions"], data["total"]]:
        full = f"{r['used_streams'] / r['max_streams']:.0%}" if r["max_streams"] else "—"
        style = "bold" if r is data["total"] else None
        table.add_row(r["region"], str(r["workers"]), str(r["ready_workers"]), str(r["used_streams"]),
                      str(r["free_streams"]), str(r["max_streams"]), full, style=style)
    _print_table(table)


LabelOpt = typer.Option(None, help="key=value: only workers with this label, as in a session request (repeat for "
                                    "several).")


def explain(
    lat: float | None = typer.Option(None, min=-90, max=90, help="User latitude."),
    lon: float | None = typer.Option(None, min=-180, max=180, help="User longitude."),
    region: str | None = typer.Option(
        None, help="Use this region's coordinates when --lat/--lon are not given (as in a session request, a "
                   "location wins over a region)."),
    policy: str | None = typer.Option(None, help="spread or pack (else the hub's policy)."),
    limit: int = typer.Option(10, min=1, max=100, help="How many candidates."),
    label: list[str] | None = LabelOpt,
    hub: str = HubOpt, token: str = TokenOpt, json: bool = JsonOpt,
) -> None:
    """Why this worker: the ranked candidates for a user at a location, with every score factor.

    A placement leads with one of the near-best candidates (marked *), chosen at random so that many hubs do not
    all pick the same worker."""
    if (lat is None) != (lon is None):
        _fail("give both --lat and --lon (or --region)", EXIT_USAGE)
    if policy is not None and policy not in ("spread", "pack"):
        _fail(f"--policy must be spread or pack, not {policy!r}", EXIT_USAGE)
    label = label or []
    for pair in label:
        if "=" not in pair:
            _fail(f"--label takes key=value, not {pair!r}", EXIT_USAGE)
    data = call(hub, token, "GET", "/api/v1/route/explain",
                {"lat": lat, "lon": lon, "region": region, "policy": policy, "limit": limit, "label": label})
    if json:
        _print_json(data)
        return
    loc = data["location"]
    source = _LOCATION_SOURCES.get(data["location_source"], data["location_source"])
    _tell(f"user at {loc['lat']:.2f}, {loc['lon']:.2f} ({source}), policy {data['policy']}, "
          f"LiveKit region {data['livekit_region'] or '—'}")
    table = Table("#", _id_column("worker", (c["worker_id"] for c in data["candidates"])), "region", "score",
                  "distance km", "rtt ms", "distance", "load", "latency", "capacity", "streams",
                  title="candidates, best first")
    for i, c in enumerate(data["candidates"], 1):
        f = c["factors"]
        table.add_row(f"{i}{' *' if c.get('near_best') else ''}", c["worker_id"], c["region"], f"{c['score']:.4f}",
                      f"{f['distance_km']:.0f}",
                      f"{f['rtt_ms']:.1f}", f"{f['distance']:.4f}", f"{f['load']:.4f}", f"{f['latency']:.4f}",
                      f"{f['capacity']:.4f}", f"{c['used_streams']}/{c['max_streams']}")
    _print_table(table)
    if not data["candidates"]:
        _tell(data.get("note") or "no live, ready worker with free capacity")  # a hub of before the note


#: Where the hub took the user's location from (``location_source``), as the explain view says it.
_LOCATION_SOURCES = {"body": "as given", "cloudfront": "from CloudFront's viewer headers",
                     "region": "the region's centre", "default": "the default region's centre"}


def register(app: typer.Typer) -> None:
    """Add the SRE commands to the ``fleet`` app."""
    for command in (workers, drain, resume, forget, sessions, capacity, explain):
        app.command()(_tolerant(command))
