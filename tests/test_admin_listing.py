"""The SRE listings a page at a time, against a real hub and Redis.

Guards: the worker and session listings answer one bounded page per request (views of 10,000 workers held the
hub's event loop, and the client requests it serves, for a third of a second at each dashboard refresh); following
``next_cursor`` lists everything exactly once, in a stable order, with filters applied before the page is cut; a
cursor or limit that does not fit is a 422, never a 500.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import httpx
import pytest

from hub import registry as registry_module
from tests.conftest import ADMIN_AUTH, WORKER_AUTH, register, registration


async def every_page(hub: httpx.AsyncClient, path: str, items: str, **params: Any) -> list[list[dict[str, Any]]]:
    """The pages of a listing, following ``next_cursor`` until it is null."""
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor is not None else {})}
        resp = await hub.get(path, params=query, headers=ADMIN_AUTH)
        assert resp.status_code == 200, resp.text
        pages.append(resp.json()[items])
        cursor = resp.json()["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "the cursor never ends"


REGIONS = ["us-west-2", "eu-west-1", "us-east-1"]


async def register_bare(hub: httpx.AsyncClient, count: int) -> list[tuple[str, str]]:
    """``count`` workers over three regions (registration alone makes them live); their (region, id)s."""
    made = []
    for i in range(count):
        wid, region = f"w-{(i * 7) % count:02d}", REGIONS[i % len(REGIONS)]
        resp = await hub.post("/api/v1/workers", json=registration(wid, "http://127.0.0.1:9", region=region),
                              headers=WORKER_AUTH)
        assert resp.status_code == 200, resp.text
        made.append((region, wid))
    return made


async def test_the_worker_listing_pages_through_every_worker_once_by_region_then_id(hub: httpx.AsyncClient) -> None:
    made = await register_bare(hub, 8)
    pages = await every_page(hub, "/api/v1/workers", "workers", limit=3)
    assert [len(page) for page in pages] == [3, 3, 2]
    listed = [(w["region"], w["worker_id"]) for page in pages for w in page]
    assert listed == sorted(made)

    whole = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()
    assert whole["next_cursor"] is None and [(w["region"], w["worker_id"]) for w in whole["workers"]] == sorted(made)


async def test_filters_apply_before_the_page_is_cut(hub: httpx.AsyncClient) -> None:
    made = await register_bare(hub, 9)
    drained = sorted(made)[1][1]
    assert (await hub.post(f"/api/v1/workers/{drained}/drain", headers=ADMIN_AUTH)).status_code == 200

    ready = await every_page(hub, "/api/v1/workers", "workers", limit=2, state="ready")
    assert [w["worker_id"] for page in ready for w in page] == [wid for _, wid in sorted(made) if wid != drained]
    assert all(len(page) == 2 for page in ready[:-1])  # full pages: nothing filtered out after the cut

    in_eu = await every_page(hub, "/api/v1/workers", "workers", limit=2, region="eu-west-1")
    assert [w["worker_id"] for page in in_eu for w in page] == sorted(w for r, w in made if r == "eu-west-1")
    assert [len(page) for page in in_eu] == [2, 1]


@pytest.mark.parametrize("path, params", [
    ("/api/v1/workers", {"limit": 0}),
    ("/api/v1/workers", {"limit": 1001}),
    ("/api/v1/workers", {"cursor": "w-01"}),  # a session listing's cursor: no region
    ("/api/v1/workers", {"cursor": "eu-west-1/../x"}),
    ("/api/v1/sessions", {"limit": 0}),
    ("/api/v1/sessions", {"cursor": "eu-west-1/w-01"}),  # a worker listing's cursor
])
async def test_a_limit_or_cursor_that_does_not_fit_is_a_422_that_names_it(hub: httpx.AsyncClient, path: str,
                                                                         params: dict[str, Any]) -> None:
    resp = await hub.get(path, params=params, headers=ADMIN_AUTH)
    assert resp.status_code == 422, resp.text
    assert next(iter(params)) in resp.json()["message"]


async def test_a_cursor_past_the_last_worker_is_an_empty_last_page(hub: httpx.AsyncClient) -> None:
    await register_bare(hub, 3)
    for path, cursor in (("/api/v1/workers", "zz-zzzz-9/zzz"), ("/api/v1/sessions", "zzz")):
        resp = (await hub.get(path, params={"cursor": cursor}, headers=ADMIN_AUTH)).json()
        assert resp["next_cursor"] is None and resp[path.rsplit("/", 1)[1]] == []


async def place(hub: httpx.AsyncClient, count: int) -> set[str]:
    placed = set()
    for _ in range(count):
        resp = await hub.post("/api/v1/sessions", json={"location": {"lat": 40.0, "lon": -75.0}})
        assert resp.status_code == 201, resp.text
        placed.add(resp.json()["session_id"])
    return placed


async def test_the_session_listing_pages_worker_by_worker_and_lists_each_session_once(
        hub: httpx.AsyncClient, make_worker: Any) -> None:
    for i in range(4):
        await register(hub, f"w-{i}", await make_worker(max_streams=3))
    placed = await place(hub, 10)  # spread: 3, 3, 2, 2 or so, but no worker holds more than 3

    pages = await every_page(hub, "/api/v1/sessions", "sessions", limit=4)
    listed = [s for page in pages for s in page]
    assert sorted(s["session_id"] for s in listed) == sorted(placed)
    for page in pages:
        assert 0 < len(page) <= 4
        assert [s["created_at"] for s in page] == sorted(s["created_at"] for s in page)  # oldest first
    for earlier, later in itertools.pairwise(pages):
        # Whole workers per page, in id order: a worker's sessions never straddle two pages.
        assert max(s["worker_id"] for s in earlier) < min(s["worker_id"] for s in later)


async def test_a_worker_alone_holding_more_than_the_limit_is_listed_whole(hub: httpx.AsyncClient,
                                                                          make_worker: Any) -> None:
    await register(hub, "w-only", await make_worker(max_streams=4))
    placed = await place(hub, 3)
    pages = await every_page(hub, "/api/v1/sessions", "sessions", limit=1)
    assert [sorted(s["session_id"] for s in page) for page in pages] == [sorted(placed)]


async def test_a_session_page_reads_a_bounded_number_of_workers(hub: httpx.AsyncClient, make_worker: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A page stops after ``SESSION_PAGE_WORKERS`` workers even when it is short of ``limit``: the next page goes on
    from there, so a fleet of idle workers costs each request a bounded read."""
    monkeypatch.setattr(registry_module, "SESSION_PAGE_WORKERS", 2)
    for i in range(5):
        await register(hub, f"w-{i}", await make_worker(max_streams=2))
    placed = await place(hub, 5)

    pages = await every_page(hub, "/api/v1/sessions", "sessions", limit=1000)
    assert len(pages) == 3  # workers 0-1, 2-3, 4
    assert sorted(s["session_id"] for page in pages for s in page) == sorted(placed)
    assert {s["worker_id"] for s in pages[0]} <= {"w-0", "w-1"}


async def test_a_listing_that_ends_exactly_on_a_full_page_says_it_is_the_last(hub: httpx.AsyncClient) -> None:
    """A last page holding exactly ``limit`` workers has a null ``next_cursor``: the client is not sent for an empty
    page after it."""
    made = await register_bare(hub, 6)
    pages = await every_page(hub, "/api/v1/workers", "workers", limit=3)
    assert [len(page) for page in pages] == [3, 3]
    assert [(w["region"], w["worker_id"]) for page in pages for w in page] == sorted(made)


async def test_sessions_that_fill_the_limit_exactly_come_in_one_page(hub: httpx.AsyncClient, make_worker: Any) -> None:
    """``limit`` is the most a page holds, not one more than it: two workers of two sessions each fill a page of
    four."""
    for i in range(2):
        await register(hub, f"w-{i}", await make_worker(max_streams=2))
    placed = await place(hub, 4)
    pages = await every_page(hub, "/api/v1/sessions", "sessions", limit=4)
    assert [sorted(s["session_id"] for s in page) for page in pages] == [sorted(placed)]


async def test_a_session_page_that_reads_the_last_workers_says_it_is_the_last(
        hub: httpx.AsyncClient, make_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the workers left are exactly as many as a page reads, that page is the last: its ``next_cursor`` is
    null."""
    monkeypatch.setattr(registry_module, "SESSION_PAGE_WORKERS", 2)
    for i in range(4):
        await register(hub, f"w-{i}", await make_worker(max_streams=1))
    placed = await place(hub, 4)
    pages = await every_page(hub, "/api/v1/sessions", "sessions", limit=1000)
    assert [sorted(s["worker_id"] for s in page) for page in pages] == [["w-0", "w-1"], ["w-2", "w-3"]]
    assert sorted(s["session_id"] for page in pages for s in page) == sorted(placed)


async def test_the_session_listing_names_the_conversation_each_session_is(hub: httpx.AsyncClient,
                                                                         make_worker: Any) -> None:
    """The SRE sees each session's ``session_key`` (null for a session created without one), as ``fleet sessions``
    shows it."""
    await register(hub, "w-0", await make_worker(max_streams=2))
    keyed = await hub.post("/api/v1/sessions", json={"session_key": "lesson:100:a"})
    plain = await hub.post("/api/v1/sessions", json={})
    assert keyed.status_code == plain.status_code == 201, (keyed.text, plain.text)
    [page] = await every_page(hub, "/api/v1/sessions", "sessions")
    assert {s["session_id"]: s["session_key"] for s in page} == {keyed.json()["session_id"]: "lesson:100:a",
                                                                 plain.json()["session_id"]: None}


async def test_the_stale_filter_lists_the_workers_that_went_silent(hub: httpx.AsyncClient) -> None:
    """``state=stale`` lists the workers past their TTL, and only those: each filter agrees with the ``status`` the
    listing shows, from the moment a worker shows as stale."""
    made = await register_bare(hub, 2)
    for _ in range(200):  # registration counts as a heartbeat: they go silent a TTL (2 s here) later
        every = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
        if all(w["status"] == "stale" for w in every):
            break
        await asyncio.sleep(0.05)
    resp = await hub.post("/api/v1/workers", json=registration("w-late", "http://127.0.0.1:9"), headers=WORKER_AUTH)
    assert resp.status_code == 200, resp.text
    listed = {state: [w["worker_id"] for w in (await hub.get("/api/v1/workers", params={"state": state},
                                                              headers=ADMIN_AUTH)).json()["workers"]]
              for state in ("stale", "ready")}
    assert listed == {"stale": [wid for _, wid in sorted(made)], "ready": ["w-late"]}  # by region, then id


async def test_the_cursor_of_a_worker_in_the_longest_region_with_the_longest_id_is_taken_back(
        hub: httpx.AsyncClient) -> None:
    """Whatever region and id a registration may carry, the ``next_cursor`` they make is one the listing accepts:
    a client following the cursors never gets a 422 for one the hub handed it."""
    region = "xx-" + "a" * 27 + "-1"  # 32 characters, the most a region may have
    ids = ["Z._-" + "z" * 60, "Z._-" + "z" * 59 + "y"]  # 64 characters each
    for wid in ids:
        resp = await hub.post("/api/v1/workers", json=registration(wid, "http://127.0.0.1:9", region=region,
                                                                   location={"lat": 1.0, "lon": 2.0}),
                              headers=WORKER_AUTH)
        assert resp.status_code == 200, resp.text
    pages = await every_page(hub, "/api/v1/workers", "workers", limit=1)
    assert [[w["worker_id"] for w in page] for page in pages] == [[wid] for wid in sorted(ids)]


async def test_one_page_of_sessions_reaches_five_hundred_workers_and_no_more(hub: httpx.AsyncClient,
                                                                             make_worker: Any) -> None:
    """The dashboard shows the first page of sessions: in a fleet of 500 workers it holds the sessions of the last
    of them too; one worker more and the page says there is a next."""
    await register(hub, "w-zzz", await make_worker(max_streams=1))
    placed = await place(hub, 1)
    await register_bare(hub, 499)  # ids below w-zzz
    whole = (await hub.get("/api/v1/sessions", headers=ADMIN_AUTH)).json()
    assert [s["session_id"] for s in whole["sessions"]] == list(placed) and whole["next_cursor"] is None

    resp = await hub.post("/api/v1/workers", json=registration("w-zzzz", "http://127.0.0.1:9"), headers=WORKER_AUTH)
    assert resp.status_code == 200, resp.text
    first = (await hub.get("/api/v1/sessions", headers=ADMIN_AUTH)).json()
    assert [s["session_id"] for s in first["sessions"]] == list(placed) and first["next_cursor"] == "w-zzz"


async def test_the_session_listing_says_where_each_session_runs_as_its_creation_did(hub: httpx.AsyncClient,
                                                                                    make_worker: Any) -> None:
    """A listed session's worker, worker region, LiveKit region and room are those its creation answered."""
    await register(hub, "w-0", await make_worker(max_streams=1))
    created = await hub.post("/api/v1/sessions", json={})
    assert created.status_code == 201, created.text
    config = created.json()
    [[listed]] = await every_page(hub, "/api/v1/sessions", "sessions")
    assert (listed["worker_id"], listed["worker_region"], listed["livekit_region"], listed["room"]) == (
        config["worker"]["id"], config["worker"]["region"], config["livekit"]["region"], config["livekit"]["room"])
    assert listed["worker_region"] != listed["livekit_region"], listed  # else the test could not tell them apart


async def test_a_listing_asked_without_a_limit_answers_five_hundred(hub: httpx.AsyncClient) -> None:
    """The default page is 500 workers, as the contract says; the rest follow the cursor."""
    made = await register_bare(hub, 501)
    first = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()
    assert len(first["workers"]) == 500 and first["next_cursor"] is not None
    pages = await every_page(hub, "/api/v1/workers", "workers")
    assert [len(page) for page in pages] == [500, 1]
    assert [(w["region"], w["worker_id"]) for page in pages for w in page] == sorted(made)
