"""The placement loop the allocator and the routing simulator share: which candidates it tries, when it ranks and
reads the board again, and where it gives up."""

from __future__ import annotations

import json
import random

import pytest

from hub.board import Ranked, RoutingBoard
from hub.placement import MAX_RESERVATIONS, first_to_accept
from hub.scoring import Weights
from hub.store import BoardRead
from shared.errors import NoCapacity
from shared.geo import AWS_REGIONS
from shared.models import Policy

USER = AWS_REGIONS["eu-west-1"]
NOW_MS = 1_000_000


def _static(region: str, max_streams: int = 4) -> str:
    loc = AWS_REGIONS[region]
    return json.dumps({"url": "", "region": region, "zone": None, "lat": loc.lat, "lon": loc.lon, "labels": {},
                       "max_streams": max_streams})


def board_with(workers: dict[str, str]) -> RoutingBoard:
    """A board (no store) that has just read ``workers`` (id -> region), all idle and heard from just now."""
    board = RoutingBoard(None, ttl_ms=9000, retention_ms=3_600_000, policy=Policy.SPREAD,  # type: ignore[arg-type]
                         weights=Weights(), near_best_margin=0.0, rng=random.Random(3))
    board.apply(BoardRead(static={w: _static(r) for w, r in workers.items()},
                          status={w: json.dumps({"hb": NOW_MS}) for w in workers}, used={w: "0" for w in workers},
                          now_ms=NOW_MS, complete=True))
    board.redis_now_ms = lambda: board.now_ms  # type: ignore[method-assign]
    return board


class Fleet:
    """What the attempts and reads see: which workers take a session, and what a read of the board brings."""

    def __init__(self, board: RoutingBoard, *, taking: set[str], failing: set[str] | None = None,
                 appears_on_read: dict[str, str] | None = None) -> None:
        self.board = board
        self.taking = taking
        self.failing = failing or set()  # reserved, then the dispatch fails
        self.appears_on_read = appears_on_read or {}
        self.tried: list[str] = []
        self.reads: list[float] = []

    async def attempt(self, candidate: Ranked) -> tuple[str | None, bool]:
        wid = candidate.entry.worker_id
        self.tried.append(wid)
        if wid in self.taking:
            return wid, True
        if wid in self.failing:
            self.board.note_unavailable(wid)
            return None, True
        self.board.note_used(wid, candidate.entry.max_streams)  # the script said it is full
        return None, False

    async def read_again(self, looked: float) -> None:
        self.reads.append(looked)
        new = self.appears_on_read
        self.board.apply(BoardRead(static={w: _static(r) for w, r in new.items()},
                                   status={w: json.dumps({"hb": NOW_MS}) for w in new}, used={w: "0" for w in new},
                                   now_ms=NOW_MS + 1, complete=False))


async def place(fleet: Fleet, max_dispatches: int = 3) -> str:
    return await first_to_accept(fleet.board, USER.lat, USER.lon, None, fleet.attempt, fleet.read_again,
                                 max_dispatches=max_dispatches)


async def test_full_workers_are_passed_over_nearest_first_until_one_takes_it() -> None:
    board = board_with({"w-dublin": "eu-west-1", "w-london": "eu-west-2", "w-tokyo": "ap-northeast-1"})
    fleet = Fleet(board, taking={"w-tokyo"})
    assert await place(fleet) == "w-tokyo"
    assert fleet.tried == ["w-dublin", "w-london", "w-tokyo"]
    assert fleet.reads == []  # the board offered a taker: no read was needed


async def test_a_failed_dispatch_counts_and_the_loop_stops_at_the_limit() -> None:
    board = board_with({f"w-{i}": "eu-west-1" for i in range(6)})
    fleet = Fleet(board, taking=set(), failing={f"w-{i}" for i in range(6)})
    with pytest.raises(NoCapacity):
        await place(fleet, max_dispatches=2)
    assert len(fleet.tried) == 2
    assert fleet.reads == []  # candidates were left: it was the dispatch limit that stopped it


async def test_with_no_candidate_left_the_board_is_read_once_more_and_what_it_brings_is_placed() -> None:
    board = board_with({"w-full": "eu-west-1"})
    fleet = Fleet(board, taking={"w-new"}, appears_on_read={"w-new": "us-east-1"})
    assert await place(fleet) == "w-new"
    assert fleet.tried == ["w-full", "w-new"]
    assert len(fleet.reads) == 1


async def test_the_board_is_read_at_most_once_before_there_is_no_capacity() -> None:
    board = board_with({"w-a": "eu-west-1", "w-b": "us-east-1"})
    fleet = Fleet(board, taking=set())
    with pytest.raises(NoCapacity):
        await place(fleet)
    assert sorted(fleet.tried) == ["w-a", "w-b"]
    assert len(fleet.reads) == 1


async def test_reservations_per_request_are_bounded() -> None:
    board = board_with({f"w-{i:03d}": "eu-west-1" for i in range(MAX_RESERVATIONS + 20)})
    fleet = Fleet(board, taking=set())
    with pytest.raises(NoCapacity):
        await place(fleet)
    assert len(fleet.tried) == MAX_RESERVATIONS
    assert len(set(fleet.tried)) == MAX_RESERVATIONS  # never the same worker twice


class _BoardThatGrows:
    """The board's store: at the first read, one worker; from then on a second one that registered since, maybe via
    another hub (each answer is a whole read)."""

    def __init__(self) -> None:
        self.reads = 0

    async def read_board(self, changed_since_ms: int | None = None) -> BoardRead:
        self.reads += 1
        workers = {"w-dublin": "eu-west-1"} if self.reads == 1 else {"w-dublin": "eu-west-1", "w-new": "us-east-1"}
        return BoardRead(static={w: _static(r) for w, r in workers.items()},
                         status={w: json.dumps({"hb": NOW_MS}) for w in workers},
                         used={"w-dublin": "4" if self.reads > 1 else "0", "w-new": "0"}, now_ms=NOW_MS,
                         complete=True)


async def test_a_worker_that_registered_since_the_last_read_takes_the_session_rather_than_a_refusal() -> None:
    """The read a request asks for when the board it read offered no taker is one that begins after it looked, as the
    allocator asks for it: the board read before the request must not stand in for it (no false reject)."""
    store = _BoardThatGrows()
    board = RoutingBoard(store, ttl_ms=9000, retention_ms=3_600_000, policy=Policy.SPREAD,  # type: ignore[arg-type]
                         weights=Weights(), near_best_margin=0.0, rng=random.Random(3))
    await board.refresh()
    fleet = Fleet(board, taking={"w-new"})
    placed = await first_to_accept(board, USER.lat, USER.lon, None, fleet.attempt,
                                   lambda looked: board.refresh(unless_read_since=looked), max_dispatches=3)
    assert placed == "w-new" and fleet.tried == ["w-dublin", "w-new"]
    assert store.reads == 2


async def test_reservations_per_request_stay_within_the_bound_after_a_failed_dispatch() -> None:
    """The bound holds within a pass over the ranked candidates too: checked only before each ranking, a pass that
    began at 57 reservations (one failed dispatch, then passes of eight refusals) ended at 65, and could at 71."""
    workers = {"w-failing": "eu-west-1", **{f"w-{i:03d}": "us-east-1" for i in range(MAX_RESERVATIONS + 20)}}
    fleet = Fleet(board_with(workers), taking=set(), failing={"w-failing"})
    with pytest.raises(NoCapacity):
        await place(fleet)
    assert fleet.tried[0] == "w-failing"
    assert len(fleet.tried) == MAX_RESERVATIONS
