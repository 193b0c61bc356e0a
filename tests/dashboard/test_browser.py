"""The dashboard in a real browser: headless Chromium (the distribution's package) driven by
Playwright opens the page while a job runs, sees the loss curve gain points, sees a killed
worker turn dead, and saves a screenshot (test-artifacts/, and docs/dashboard.png with
SHARDGRAD_UPDATE_SCREENSHOT=1).

`make test-browser` installs Chromium and Playwright; Playwright's own browser download is
never used (this must work without network access)."""

import os
import shutil
import signal
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SHARDGRAD_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # we run as root in CI containers, where the sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "!!! NO BROWSER: `chromium` is not installed (make test-browser installs it with "
        "apt-get install chromium); the dashboard browser test did NOT run"
    )


@pytest.fixture
def browser():
    exe = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(
            "!!! NO PLAYWRIGHT: the `playwright` package is missing (pip install "
            "'shardgrad[browser]', or make test-browser); the browser test did NOT run"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def test_dashboard_follows_a_running_job_and_a_dying_worker(browser, dash_cluster, dash):
    # The default liveness (0.5 s x 5 = 2.5 s without a heartbeat: dead): shorter ones see
    # false deaths on a busy 2-core machine running a browser beside the cluster.
    cluster = dash_cluster(workers=3)
    url = cluster.http_url
    victim = cluster.workers[0]
    with cluster.client() as c:
        wid = dash.wait_for(
            lambda: next(
                (w["id"] for w in c.status()["workers"] if w.get("pid") == victim.pid), None
            ),
            f"worker pid {victim.pid} in status",
            timeout=30,
        )
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    foreign = []
    page.on(
        "request",
        lambda r: None if r.url.startswith(url) else foreign.append(r.url),
    )
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    with cluster.client() as c:
        # Thousands of rounds: still running while the page is looked at (cancelled below).
        job = c.submit({**dash.LONG_SPEC, "name": "browser-digits"})
        page.goto(url, timeout=30_000)
        page.wait_for_selector(f'#jobs tr[data-job="{job}"]', timeout=30_000)

        def points() -> int:
            return int(page.get_attribute("#loss-chart", "data-points") or 0)

        page.wait_for_function(
            "() => +document.querySelector('#loss-chart').dataset.points > 0", timeout=30_000
        )
        before = points()
        page.wait_for_function(
            f"() => +document.querySelector('#loss-chart').dataset.points > {before}",
            timeout=30_000,
        )
        assert points() > before
        page.wait_for_function(
            "() => document.querySelectorAll('#workers tr[data-state=alive]').length === 3",
            timeout=30_000,
        )
        # Kill a worker the hard way: no BYE, only missed heartbeats tell.
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        page.wait_for_function(
            f"() => document.querySelector('#workers tr[data-worker=\"{wid}\"]')"
            "?.dataset.state === 'dead'",
            timeout=15_000,  # 2.5 s to be declared dead, then at most a poll and a snapshot
        )
        # The job goes on with the two others, and the curve with it.
        after_kill = points()
        page.wait_for_function(
            f"() => +document.querySelector('#loss-chart').dataset.points > {after_kill}",
            timeout=30_000,
        )
        state = page.get_attribute(f'#jobs tr[data-job="{job}"]', "data-state")
        assert state in ("running", "paused")  # paused only if the others look dead a moment
        assert page.text_content("#time-chart").count("compute") == 1
        shot = page.screenshot(full_page=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "dashboard.png").write_bytes(shot)
        if os.environ.get("SHARDGRAD_UPDATE_SCREENSHOT"):
            (ROOT / "docs" / "dashboard.png").write_bytes(shot)
        c.cancel(job)
    assert not foreign, f"the page loaded something from elsewhere: {foreign}"
    assert not errors, f"JavaScript errors on the page: {errors}"
