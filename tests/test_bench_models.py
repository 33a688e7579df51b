"""The benches' models of the system: the baseline router's slots, the soak's offered load, the routing fleet."""

from __future__ import annotations

import random
from pathlib import Path

from bench.baselines.original_router import Slots, populate, route
from bench.routing import Sim, Worker, load_fleet
from bench.soak import hold_s
from shared.geo import AWS_REGIONS
from tests.conftest import async_redis
from worker.capacity import compute_capacity
from worker.engines.synthetic import DEFAULT_PROFILE
from worker.gpus import parse_simulated

FLEET = Path(__file__).resolve().parent.parent / "bench" / "fleet.yaml"
#: AWS's published figures: GPUs, vCPUs, memory (GiB).
INSTANCES = {"g4dn.xlarge": ("t4", 4, 16), "g5.xlarge": ("a10g", 4, 16), "g5.2xlarge": ("a10g", 8, 32),
             "g5.12xlarge": ("a10gx4", 48, 192)}


async def test_baseline_gives_back_the_slot_of_a_worker_that_was_full(redis_url: str) -> None:
    """Regression: ending a session re-ran the take script with +1, which refuses a full worker, so a worker that
    once reached max_streams kept its slots forever."""
    r = async_redis(redis_url, decode_responses=True)
    try:
        await populate(r, 1, ["eu-west-1"], max_streams=1)
        slots = Slots(r)
        user = {"lat": 51.5, "lon": -0.1}
        first = await route(r, slots, user, pipelined=False)
        assert first == "w00000"
        assert await route(r, slots, user, pipelined=False) is None  # full
        assert await slots.give(first)
        assert await route(r, slots, user, pipelined=False) == "w00000"
        assert await slots.give(first)
        assert not await slots.give(first), "a worker with every slot free has none to give back"
    finally:
        await r.aclose()


def test_soak_holds_average_the_documented_mean() -> None:
    """Regression: lognormvariate(0, 0.5) averages e^0.125 = 1.13, so a '10 s' hold was 11.3 s and the offered load
    1.36x capacity instead of 1.2x."""
    rng = random.Random(3)
    holds = [hold_s(rng, 10.0) for _ in range(200_000)]
    assert abs(sum(holds) / len(holds) - 10.0) < 0.1


def test_routing_fleet_streams_are_what_its_workers_would_register() -> None:
    """Regression: the fleet gave a g5.2xlarge (one A10G) 16 streams where the capacity formula gives 12."""
    fleet = load_fleet(FLEET)
    assert {x.itype for x in fleet} <= INSTANCES.keys()
    for x in fleet:
        gpus, vcpus, ram_gib = INSTANCES[x.itype]
        registered = compute_capacity(parse_simulated(gpus), DEFAULT_PROFILE, cpu_cores=vcpus, ram_mb=ram_gib * 1024)
        assert (x.itype, x.max_streams) == (x.itype, registered.max_streams)


def _worker(idx: int, region: str, max_streams: int) -> Worker:
    loc = AWS_REGIONS[region]
    return Worker(idx, f"{region}-{idx}", region, "g5.2xlarge", loc.lat, loc.lon, max_streams, 1, 40.0)


def _hub_sim(fleet: list[Worker], hubs: int) -> Sim:
    sim = Sim("hub-spread", fleet, hubs=hubs, refresh_s=1.0, heartbeat_s=3.0, cooldown_s=600.0, seed=1)
    for hub in sim.hubs:
        hub.phase_s = 0.0  # both refresh on the whole second
    return sim


DUBLIN = (53.35, -6.26)


def test_a_hub_that_missed_another_hubs_reservation_is_refused_and_re_ranks() -> None:
    ireland, virginia = _worker(0, "eu-west-1", 1), _worker(1, "us-east-1", 1)
    sim = _hub_sim([ireland, virginia], hubs=2)
    placed = sim.choose(10.2, *DUBLIN)  # the first hub
    assert placed is ireland
    sim.take(ireland, 10.2)
    # The second hub last read the board at 10.0: Ireland looks free, the reservation says full.
    assert sim.choose(10.5, *DUBLIN) is virginia
    assert sim.refused == 1 and sim.forced_refreshes == 0


def test_a_slot_returns_at_the_workers_next_heartbeat_and_a_hub_reads_the_board_when_it_finds_none() -> None:
    ireland = _worker(0, "eu-west-1", 1)
    sim = _hub_sim([ireland], hubs=1)
    ireland.heartbeat_phase_s = 0.5
    assert sim.choose(1.0, *DUBLIN) is ireland
    sim.take(ireland, 1.0)
    heartbeat = sim.end(ireland, 5.0)  # the user leaves; the worker reports it at its next heartbeat
    assert heartbeat == 6.5
    assert sim.choose(6.0, *DUBLIN) is None and sim.free_total == 0  # a full reject a heartbeat away from a slot
    sim.give(ireland, heartbeat)
    # The hub's periodic read (6.0) still had the worker full; finding no candidate, it reads the board again.
    assert sim.choose(6.7, *DUBLIN) is ireland
    assert sim.forced_refreshes == 2 and sim.refused == 0
