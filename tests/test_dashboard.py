"""The SRE dashboard: served by any hub without auth, driven for real in headless Chromium against a live hub.

The browser test needs Debian's chromium (scripts/ensure-chromium.sh) and the playwright package; it is skipped
without them. UPDATE_DASHBOARD_SCREENSHOT=1 also saves the screenshot as docs/dashboard.png.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, WORKER_AUTH, registration
from tests.harness import WorkerProcess
from tests.test_cli_admin import LiveHub, seed

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LIVEKIT = [{"region": r, "url": f"wss://lk-{r}.example.com", "lat": lat, "lon": lon, "api_key": "k",
            "api_secret": "s" * 32} for r, lat, lon in
           [("us-east-1", 38.9, -77.4), ("eu-central-1", 50.1, 8.7), ("ap-northeast-1", 35.7, 139.7)]]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


@pytest.fixture
def live_hub(redis_url: str) -> Iterator[LiveHub]:
    with LiveHub(redis_url, fake_workers=1, livekit_regions=json.dumps(LIVEKIT)) as hub:
        seed(hub)
        hub.register("gpu-apne1-a", region="ap-northeast-1", location={"lat": 35.7, "lon": 139.7}, max_streams=6,
                     heartbeat={"latency_ms": 55.0, "gpu_utilization": 12.0})
        hub.register("gpu-sae1-a", region="sa-east-1", location={"lat": -23.5, "lon": -46.6}, max_streams=4)
        with hub.admin() as client:
            client.post("/api/v1/workers/gpu-sae1-a/drain").raise_for_status()
            for lat, lon in [(52.5, 13.4), (40.4, -3.7)]:
                assert client.post("/api/v1/sessions", json={"location": {"lat": lat, "lon": lon},
                                                             "region": "eu-central-1"}).status_code == 201
        yield hub


def test_the_shell_and_assets_load_without_auth_and_data_needs_it(live_hub: LiveHub) -> None:
    with httpx.Client(base_url=live_hub.url, timeout=5) as client:
        page = client.get("/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert 'id="login-form"' in page.text and "frame-ancestors 'none'" in page.headers["content-security-policy"]
        for asset in ("dashboard.js", "dashboard.css", "vendor/topojson-client.min.js", "vendor/land-110m.json"):
            assert client.get(f"/dashboard/static/{asset}").status_code == 200, asset
        assert client.get("/dashboard/static/../main.py").status_code == 404
        assert client.get("/dashboard/static/%2e%2e/api/dashboard.py").status_code in (404, 422)
        assert client.get(f"/dashboard/static/{'a' * 300}.js").status_code == 422  # the OS would refuse the name
        assert client.get("/dashboard/api/livekit").status_code == 401
        regions = client.get("/dashboard/api/livekit", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert [r["region"] for r in regions["regions"]] == ["us-east-1", "eu-central-1", "ap-northeast-1"]
    assert "api_secret" not in json.dumps(regions) and "api_key" not in json.dumps(regions)


async def test_percent_encoded_dot_segments_cannot_reach_a_file_beside_the_assets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The asset pattern lets ``..`` through after the first segment, and the server decodes ``%2e%2e`` (and
    ``%2f``) only after the client's own dot-segment removal: the resolved-path check alone keeps a JSON, JS or HTML
    file next to hub/static (a config, a dump) from being served to anyone, without auth."""
    import hub.api.dashboard as dashboard
    from hub.main import create_app
    from hub.settings import HubSettings

    static = tmp_path / "static"
    (static / "vendor").mkdir(parents=True)
    (static / "vendor" / "ok.json").write_text("{}")
    (tmp_path / "private.json").write_text('{"secret": "outside-the-assets"}')
    monkeypatch.setattr(dashboard, "STATIC_DIR", static)
    app = create_app(HubSettings(worker_token="w" * 32, admin_token="a" * 32))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
        assert (await client.get("/dashboard/static/vendor/ok.json")).status_code == 200
        for path in ("vendor/%2e%2e/%2e%2e/private.json", "vendor/%2E%2E/%2E%2E/private.json",
                     "vendor/..%2f..%2fprivate.json", "vendor/%2e%2e%2f%2e%2e%2fprivate.json"):
            resp = await client.get(f"/dashboard/static/{path}")
            assert resp.status_code == 404 and "outside-the-assets" not in resp.text, (path, resp.text)


async def test_the_map_of_livekit_deployments_holds_neither_their_keys_nor_their_secrets(make_hub) -> None:
    """The dashboard's map needs each deployment's name, URL and place; a LiveKit API key and secret would let
    anyone holding the admin token (or reading the page's traffic) mint tokens for every room."""
    deployment = {"region": "eu", "url": "wss://lk-eu.example", "lat": 50.1, "lon": 8.7,
                  "api_key": "APIkey-not-for-the-map", "api_secret": "secret-not-for-the-map-0123456789abcdef"}
    hub = await make_hub(livekit_regions=json.dumps([deployment]))
    assert (await hub.get("/dashboard/api/livekit")).status_code == 401
    resp = await hub.get("/dashboard/api/livekit", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.json() == {"regions": [{"region": "eu", "url": "wss://lk-eu.example", "lat": 50.1, "lon": 8.7}]}
    assert "not-for-the-map" not in resp.text


def test_dashboard_in_chromium_logs_in_shows_the_fleet_and_drains(live_hub: LiveHub, tmp_path: Path) -> None:
    """The fleet on screen includes a real `fleet worker` process (synthetic engine, simulated T4) that registered
    and heartbeats on its own, beside workers registered through the API."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("no /usr/bin/chromium: run scripts/ensure-chromium.sh")
    real = WorkerProcess([live_hub.url], "wp-usw2-real", region="us-west-2").spawn()  # starts while Chromium does
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                real.wait_ready()
                page = browser.new_page(viewport={"width": 1400, "height": 1250})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"{live_hub.url}/dashboard")
                sync_api.expect(page.locator("#app")).to_be_hidden()  # regression: CSS's display: grid beat `hidden`

                page.fill("#token", "not-the-token")
                page.click("#login-button")
                sync_api.expect(page.locator("#login-error")).to_contain_text("refused")

                page.fill("#token", ADMIN_TOKEN)
                page.click("#login-button")
                rows = page.locator("#workers tbody tr")
                sync_api.expect(rows).to_have_count(6)
                sync_api.expect(page.locator('#workers tr[data-worker="gpu-sae1-a"] .state')).to_have_text("draining")
                the_real_one = page.locator('#workers tr[data-worker="wp-usw2-real"]')
                sync_api.expect(the_real_one.locator(".state")).to_have_text("ready")
                sync_api.expect(the_real_one).to_contain_text("us-west-2")
                sync_api.expect(the_real_one).to_contain_text("T4")
                sync_api.expect(page.locator("#sessions tbody tr")).to_have_count(3)
                sync_api.expect(page.locator("#worker-count")).to_have_text("6 registered")  # one page: all
                sync_api.expect(page.locator("#session-count")).to_have_text("3 held")
                sync_api.expect(page.locator("#workers-layer circle")).to_have_count(6)
                sync_api.expect(page.locator("#sessions-layer circle")).to_have_count(3)
                sync_api.expect(page.locator("#livekit rect")).to_have_count(3)
                sync_api.expect(page.locator("#land path")).to_have_count(3)
                sync_api.expect(page.locator('#capacity [data-region="eu-central-1"]')).to_contain_text("3/4 streams")

                page.click('#workers th[data-key="used_streams"]')  # sortable: ascending then descending
                page.click('#workers th[data-key="used_streams"]')
                sync_api.expect(rows.first).to_have_attribute("data-worker", "gpu-euc1-a")

                page.once("dialog", lambda dialog: dialog.accept())  # the drain is asked for first
                page.click('#workers tr[data-worker="gpu-use1-a"] button.drain')
                with live_hub.admin() as client:
                    deadline = time.monotonic() + 5
                    while client.get("/api/v1/workers/gpu-use1-a").json()["state"] != "draining":
                        assert time.monotonic() < deadline, "the drain click did not reach the hub"
                        time.sleep(0.05)
                sync_api.expect(page.locator('#workers tr[data-worker="gpu-use1-a"] button')).to_have_text("Resume")

                page.reload()  # the token survives a reload (sessionStorage), the refresh loop restarts
                sync_api.expect(rows).to_have_count(6)
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                if os.environ.get("UPDATE_DASHBOARD_SCREENSHOT"):
                    shutil.copy(shot, SCREENSHOT)

                page.click("#logout")  # regression: the fleet stayed on screen after signing out
                sync_api.expect(page.locator("#app")).to_be_hidden()
                sync_api.expect(page.locator("#login")).to_be_visible()
                sync_api.expect(rows).to_have_count(0)
                sync_api.expect(page.locator("#sessions-layer circle")).to_have_count(0)
                assert errors == []
            finally:
                browser.close()
    finally:
        real.stop()


def test_the_dashboard_shows_each_figure_and_says_why_a_drain_was_refused(live_hub: LiveHub) -> None:
    """The page's counts, loads and GPU names are the hub's; the newest session is listed first; a worker leaving on
    its own cannot be drained; a drain the hub refuses is reported, not lost under the refresh that follows; and once
    signed out the page asks the hub nothing more."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("no /usr/bin/chromium: run scripts/ensure-chromium.sh")
    live_hub.heartbeat("gpu-apne1-a", state="draining")  # leaving on its own account, not drained by an SRE
    live_hub.register("gpu-use1-none", max_streams=0)  # a GPU too small for one stream
    with live_hub.admin() as client:
        newest = client.get("/api/v1/sessions").json()["sessions"][-1]["session_id"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1250})
            page.clock.install()  # the page refreshes only when this test moves its clock on
            page.goto(f"{live_hub.url}/dashboard")
            page.fill("#token", ADMIN_TOKEN)
            page.click("#login-button")
            rows = page.locator("#workers tbody tr")
            sync_api.expect(rows).to_have_count(6)
            sync_api.expect(page.locator("#token")).to_have_value("")  # the token is not left in the form
            sync_api.expect(page.locator("#worker-count")).to_have_text("6 registered")
            sync_api.expect(page.locator("#session-count")).to_have_text("3 held")
            euc1 = page.locator('#workers tr[data-worker="gpu-euc1-a"] td')
            sync_api.expect(euc1.nth(2)).to_have_text("NVIDIA A10G")  # one GPU: its name alone
            sync_api.expect(euc1.nth(4)).to_have_text("3/4")
            sync_api.expect(euc1.nth(5)).to_have_text("75%")
            sync_api.expect(page.locator('#workers tr[data-worker="gpu-use1-none"] td').nth(5)).to_have_text("0%")
            sync_api.expect(page.locator('#capacity [data-region="eu-central-1"] .bar span')).to_have_class("hot")
            sync_api.expect(page.locator("#sessions tbody tr").first.locator("td").first).to_have_text(newest)
            leaving = page.locator('#workers tr[data-worker="gpu-apne1-a"] button')
            sync_api.expect(leaving).to_have_text("Leaving")
            sync_api.expect(leaving).to_be_disabled()

            page.route(f"{live_hub.url}/api/v1/workers/gpu-use1-b/drain", lambda route: route.fulfill(
                status=409, content_type="application/json", body=json.dumps({"error": "conflict", "message": "no"})))
            page.once("dialog", lambda dialog: dialog.accept())
            page.click('#workers tr[data-worker="gpu-use1-b"] button.drain')
            # enabled again: the refresh after the drain has drawn the table; the refusal is still what it says
            sync_api.expect(page.locator('#workers tr[data-worker="gpu-use1-b"] button')).to_be_enabled()
            sync_api.expect(page.locator("#status")).to_have_text("drain gpu-use1-b failed: 409 conflict: no")

            page.click("#logout")
            sync_api.expect(page.locator("#login")).to_be_visible()
            asked: list[str] = []
            page.on("request", lambda request: asked.append(request.url))
            page.clock.run_for(10_000)  # three refresh periods
            page.evaluate("() => fetch('/dashboard/static/dashboard.css').then((resp) => resp.status)")
            assert [url for url in asked if "/api/" in url] == []
            sync_api.expect(page.locator("#login-error")).to_have_text("")
        finally:
            browser.close()


class Questions:
    """The questions a page asks (window.confirm), each answered as the test says next: ``questions.answer(yes)``
    before the click."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.asked: list[str] = []

    def answer(self, yes: bool, *, every_time: bool = False) -> None:
        def reply(dialog: Any) -> None:
            self.asked.append(dialog.message)
            dialog.accept() if yes else dialog.dismiss()

        (self.page.on if every_time else self.page.once)("dialog", reply)


def signed_in(browser: Any, hub_url: str) -> Any:
    """A dashboard page of ``hub_url``, signed in with the admin token."""
    page = browser.new_page()
    page.goto(f"{hub_url}/dashboard")
    page.fill("#token", ADMIN_TOKEN)
    page.click("#login-button")
    return page


def test_dashboard_forgets_a_stale_worker(redis_url: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("no /usr/bin/chromium: run scripts/ensure-chromium.sh")
    with LiveHub(redis_url, worker_ttl_s=1.0, heartbeat_interval_s=0.3) as hub, \
            sync_api.sync_playwright() as pw:
        hub.register("gpu-use1-gone")
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = signed_in(browser, hub.url)
            row = page.locator('#workers tr[data-worker="gpu-use1-gone"]')
            deadline = time.monotonic() + 15
            while (row.count() == 0 or row.locator("button").text_content() != "Drain"):  # live: no Forget
                assert time.monotonic() < deadline, "the live worker was never offered Drain"
                hub.heartbeat("gpu-use1-gone")
                time.sleep(0.2)
            sync_api.expect(row.locator(".state")).to_have_text("stale", timeout=10_000)  # heartbeats stopped
            sync_api.expect(row.locator("button")).to_have_text("Forget")
            asked: list[str] = []
            page.on("request", lambda request: asked.append(request.url))
            questions = Questions(page)
            questions.answer(False)  # an SRE who clicked the wrong row
            row.locator("button.forget").click()
            page.wait_for_timeout(500)
            assert questions.asked == [
                "Forget gpu-use1-gone? Its registration and the sessions it held are removed."]
            assert not [url for url in asked if url.endswith("/forget")], asked
            sync_api.expect(row).to_have_count(1)
            questions.answer(True)
            row.locator("button.forget").click()
            sync_api.expect(page.locator("#workers tbody tr")).to_have_count(0)
            with hub.admin() as client:
                assert client.get("/api/v1/workers/gpu-use1-gone").status_code == 404
        finally:
            browser.close()


async def test_a_missing_asset_is_a_json_404_and_the_shell_cannot_be_framed(make_hub) -> None:
    """A stale page asking for an asset a new release renamed gets a clean 404, not a 500; the shell forbids being
    framed by another site (clickjacking an SRE into a drain) and is revalidated, so a release reaches the browser."""
    hub = await make_hub()
    for name in ("gone.js", "vendor/gone.json", "vendor/nested/gone.css"):
        resp = await hub.get(f"/dashboard/static/{name}")
        assert resp.status_code == 404 and resp.json()["error"] == "not_found", (name, resp.text)
    page = await hub.get("/dashboard")
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-cache"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    slash = await hub.get("/dashboard/")
    assert slash.status_code in (302, 307) and slash.headers["location"] == "/dashboard"


async def test_a_file_of_a_type_the_dashboard_does_not_serve_is_a_404(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the page's own kinds of asset (HTML, JS, CSS, JSON, SVG) are served: a note or a source map left beside
    them is a 404, not a 500 for want of a media type."""
    import hub.api.dashboard as dashboard
    from hub.main import create_app
    from hub.settings import HubSettings

    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "notes.txt").write_text("kept out")
    (tmp_path / "dashboard.map").write_text("{}")
    (tmp_path / "ok.css").write_text("body {}")
    monkeypatch.setattr(dashboard, "STATIC_DIR", tmp_path)
    app = create_app(HubSettings(worker_token="w" * 32, admin_token="a" * 32))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
        assert (await client.get("/dashboard/static/ok.css")).headers["content-type"].startswith("text/css")
        for name in ("vendor/notes.txt", "dashboard.map"):
            resp = await client.get(f"/dashboard/static/{name}")
            assert resp.status_code == 404 and "kept out" not in resp.text, (name, resp.text)


def test_a_drain_is_asked_for_first_and_a_resume_is_not(redis_url: str) -> None:
    """An SRE who clicked Drain on the wrong row and answers no leaves the worker taking sessions; a yes drains it,
    and Resume, which only undoes that, is sent without a question."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("no /usr/bin/chromium: run scripts/ensure-chromium.sh")
    with LiveHub(redis_url) as hub, sync_api.sync_playwright() as pw:
        hub.register("gpu-use1-a")
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = signed_in(browser, hub.url)
            button = page.locator('#workers tr[data-worker="gpu-use1-a"] button')
            sync_api.expect(button).to_have_text("Drain")
            asked: list[str] = []
            page.on("request", lambda request: asked.append(request.url))
            questions = Questions(page)
            questions.answer(False)
            button.click()
            page.wait_for_timeout(500)
            assert questions.asked == [
                "Drain gpu-use1-a? It takes no new session until it is resumed; its sessions run on."]
            assert not [url for url in asked if url.endswith("/drain")], asked
            with hub.admin() as client:
                assert client.get("/api/v1/workers/gpu-use1-a").json()["drain_requested"] is False

            questions.answer(True)
            button.click()
            sync_api.expect(button).to_have_text("Resume")
            with hub.admin() as client:
                assert client.get("/api/v1/workers/gpu-use1-a").json()["drain_requested"] is True

            questions.answer(True, every_time=True)  # none expected: counted below
            button.click()
            sync_api.expect(button).to_have_text("Drain")
            assert len(questions.asked) == 2, questions.asked
            with hub.admin() as client:
                assert client.get("/api/v1/workers/gpu-use1-a").json()["drain_requested"] is False
        finally:
            browser.close()


def test_a_large_fleet_is_shown_a_page_at_a_time_and_says_so(redis_url: str) -> None:
    """Each refresh asks for one page of workers and of sessions, so that a dashboard left open on a fleet of
    thousands costs its hub a bounded read every 3 s; the counts then say that the tables hold a part."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("no /usr/bin/chromium: run scripts/ensure-chromium.sh")
    with LiveHub(redis_url) as hub, sync_api.sync_playwright() as pw:
        with httpx.Client(base_url=hub.url, headers=WORKER_AUTH, timeout=5) as client:
            for i in range(501):  # registration alone makes a worker live
                assert client.post("/api/v1/workers", json=registration(
                    f"w-{i:03d}", "http://127.0.0.1:9", max_streams=2)).status_code == 200
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            asked: list[str] = []
            page.on("request", lambda request: asked.append(request.url))
            # A session page with more to come, as a fleet holding more sessions than a page answers.
            page.route("**/api/v1/sessions?limit=200", lambda route: route.fulfill(json={"sessions": [{
                "session_id": "w-000-s1", "session_key": None, "worker_id": "w-000", "worker_region": "us-east-1",
                "livekit_region": "us-east-1", "room": "r", "status": "active", "created_at": time.time(),
                "location": None}], "next_cursor": "w-000"}))
            page.goto(f"{hub.url}/dashboard")
            page.fill("#token", ADMIN_TOKEN)
            page.click("#login-button")
            sync_api.expect(page.locator("#workers tbody tr")).to_have_count(500)
            sync_api.expect(page.locator("#worker-count")).to_have_text("the first 500 by region (fleet workers "
                                                                       "lists all)")
            sync_api.expect(page.locator("#session-count")).to_have_text("1 shown of 0 streams in use")
            listings = [url for url in asked if "/api/v1/workers" in url or "/api/v1/sessions" in url]
            assert listings and all("limit=" in url for url in listings), listings
        finally:
            browser.close()


def test_the_region_and_state_filters_ask_the_hub_for_the_workers_that_match(redis_url: str) -> None:
    """In a fleet larger than a page, the workers of one region or the stale ones are found by the hub's own
    filters, not hidden in the first page: choosing a region (or clicking its capacity box) or a state lists those,
    and the session table follows the region."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("no /usr/bin/chromium: run scripts/ensure-chromium.sh")
    with LiveHub(redis_url, fake_workers=1) as hub, sync_api.sync_playwright() as pw:
        seed(hub)  # gpu-use1-a, gpu-use1-b (us-east-1), gpu-euc1-a (eu-central-1) with one session
        with hub.admin() as client:
            client.post("/api/v1/workers/gpu-use1-b/drain").raise_for_status()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = signed_in(browser, hub.url)
            asked: list[str] = []
            page.on("request", lambda request: asked.append(request.url))
            rows = page.locator("#workers tbody tr")
            sync_api.expect(rows).to_have_count(3)
            sync_api.expect(page.locator("#sessions tbody tr")).to_have_count(1)

            page.select_option("#filter-region", "us-east-1")
            sync_api.expect(rows).to_have_count(2)
            sync_api.expect(page.locator("#worker-count")).to_have_text("2 registered: us-east-1")
            sync_api.expect(page.locator("#sessions tbody tr")).to_have_count(0)  # the session runs in Frankfurt
            assert any("region=us-east-1" in url and "/api/v1/workers" in url for url in asked), asked

            page.select_option("#filter-state", "draining")
            sync_api.expect(rows).to_have_count(1)
            sync_api.expect(rows.first).to_have_attribute("data-worker", "gpu-use1-b")

            page.select_option("#filter-state", "")
            page.click('#capacity [data-region="eu-central-1"]')
            sync_api.expect(rows).to_have_count(1)
            sync_api.expect(rows.first).to_have_attribute("data-worker", "gpu-euc1-a")
            sync_api.expect(page.locator("#filter-region")).to_have_value("eu-central-1")
            sync_api.expect(page.locator("#sessions tbody tr")).to_have_count(1)
            page.click('#capacity [data-region="all"]')
            sync_api.expect(rows).to_have_count(3)
        finally:
            browser.close()
