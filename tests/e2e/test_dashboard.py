"""The dashboard in a real browser (issue 12): headless Chromium, driven by selenium, against
three peer processes running a delegation tree with the offline model.

Peer p0 hosts a boss, p1 an admin, p2 a worker (tests/e2e/test_agents_cluster.py's team). The
browser opens the one-time login URL p1 printed at start and must land on `/` without the
token in the address; the page must show the three members alive, the network totals (then
move them live, with no reload, when a second tree runs) and a finished task's delegation
tree with peer and agent on each node; at 390 px wide it must fit the screen. Screenshots go
to docs/img/ (the README shows them).

Skipped, saying why, only where no browser can be had: selenium or chromedriver missing
(scripts/test installs Debian's `chromium` and `chromium-driver` when it runs as root). Every
wait is bounded; the cluster fixture ends every process it started, by pid.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from peer.agents.ports import AgentInput
from scripts.local_cluster import LocalCluster, Peer, wait_for
from tests.e2e.cluster_helpers import add_configured, run_showing_logs, wait_team_known
from tests.e2e.test_agents_cluster import CONFIGS, TREE

pytestmark = pytest.mark.e2e

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "docs" / "img"
LOGIN_LINE = re.compile(r"dashboard: (http://\S+/\?token=\S+)")
PAGE_WAIT = 20.0
STALE_RETRIES = 10
"""Reads of a selector's texts while the page keeps replacing its elements (`_texts`)."""
"""Seconds the browser may take to show what the peers already know (polls run every 2 s)."""


def chromedriver() -> str:
    path = shutil.which("chromedriver") or shutil.which("chromedriver", path="/usr/lib/chromium")
    if path is None:
        pytest.skip("chromedriver is not installed (Debian: apt-get install chromium-driver)")
    return path


@contextmanager
def browser(driver_path: str) -> Iterator[Any]:
    """Headless Chromium, 1280×900, its console captured; quit whatever happens."""
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to sandbox as root
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    except WebDriverException as exc:
        pytest.skip(f"Chromium could not start: {exc.msg}")
    try:
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        driver.quit()


def login_url(peer: Peer) -> str:
    match = LOGIN_LINE.search(peer.log_path.read_text(errors="replace"))
    assert match is not None, f"{peer.name} printed no dashboard login URL"
    return match.group(1)


def test_the_dashboard_shows_the_fleet_a_tree_and_live_counters(tmp_path: Path) -> None:
    driver_path = chromedriver()
    SHOTS.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "cluster"
    root.mkdir()
    with LocalCluster(root, profile="local", extra_args=()) as cluster:
        peers = add_configured(cluster, [(f"{name}.toml", text) for name, text in CONFIGS.items()])
        first_root = _run_tree(peers, "r0", expected=TREE)
        with browser(driver_path) as driver:
            _check_page(driver, peers, first_root)


def _run_tree(peers: list[Peer], key: str, expected: int) -> str:
    """Submit one root at p1 and wait until p1 holds `expected` tasks, all done."""
    root_id = ""

    async def run() -> None:
        nonlocal root_id
        await wait_team_known(peers)
        async with peers[1].client() as client:
            request = AgentInput(f"Draft a policy brief on urban tree cover, {key}")
            root_id = (await client.submit("boss", request.encode().decode(), idempotency_key=key))[
                "id"
            ]

        async def all_done() -> tuple[bool, object]:
            async with peers[1].client() as client:
                states = [t["state"] for t in await client.tasks(limit=1000)]
            return len(states) == expected and set(states) == {"done"}, states

        await wait_for("the tree done at p1", all_done, timeout=25, interval=0.3)

    run_showing_logs(run(), peers)
    return root_id


def _texts(driver: Any, css: str) -> list[str]:
    # The page re-renders its tables as news comes (after every task and member event): an
    # element found may be replaced before its text is read. Read them all again then.
    for _ in range(STALE_RETRIES):
        try:
            return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]
        except StaleElementReferenceException:
            time.sleep(0.05)
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]


def _wait(driver: Any, what: str, check: Any) -> Any:
    return WebDriverWait(
        driver,
        PAGE_WAIT,
        poll_frequency=0.2,
        ignored_exceptions=(StaleElementReferenceException,),
    ).until(check, message=f"the page did not show {what} within {PAGE_WAIT:g} s")


def _check_page(driver: Any, peers: list[Peer], first_root: str) -> None:
    api = peers[1].api
    driver.get(login_url(peers[1]))
    assert driver.current_url == f"http://{api}/", "the token must not stay in the address"
    assert driver.get_cookies()[0]["httpOnly"] is True

    def fleet_alive(d: Any) -> bool:
        rows = d.find_elements(By.CSS_SELECTOR, "#fleet-rows tr")
        return len(rows) == 3 and all(r.get_attribute("data-status") == "alive" for r in rows)

    _wait(driver, "three members alive", fleet_alive)
    shown = {
        r.get_attribute("data-member")
        for r in driver.find_elements(By.CSS_SELECTOR, "#fleet-rows tr")
    }
    assert shown == {p.node_id for p in peers}
    # "last seen" is the serving peer's last contact with each member (`last_seen`), which
    # gossip keeps within a few seconds: never "never" for a live member.
    seen = [
        c.text
        for c in driver.find_elements(By.CSS_SELECTOR, '#fleet-rows td[data-label="last seen"]')
    ]
    assert len(seen) == 3 and all(t == "now" or t.endswith(" ago") for t in seen), seen
    # Every member's agents come from its signed peer state (decision 47): one agent each.
    _wait(
        driver,
        "each member's agent in the fleet",
        lambda d: _texts(d, '#fleet-rows td[data-label="agents"]') == ["1", "1", "1"],
    )
    assert " · 3 agents · " in driver.find_element(By.ID, "fleet-summary").text
    # Each member's models ride its peer state too (decision 54): the network's spend by
    # model is plotted from them, and no breaker is tripped anywhere.
    assert _texts(driver, '#fleet-rows td[data-label="breakers"]') == ["–", "–", "–"]
    _wait(
        driver,
        "the network's spend by model",
        lambda d: "network: grapevine/offline" in _texts(d, "#spend-legend span"),
    )
    # And each one's tokens and rate-limit waits (decision 59): one row per model, summed
    # over the three members.
    _wait(
        driver,
        "the offline model across the network",
        lambda d: (
            _texts(d, '#network-model-rows td[data-label="model"]') == ["grapevine/offline"]
            and _texts(d, '#network-model-rows td[data-label="peers"]') == ["3"]
        ),
    )
    [tokens] = _texts(driver, '#network-model-rows td[data-label="tokens"]')
    assert tokens.isdigit() and int(tokens) > 0, tokens
    assert _texts(driver, '#network-model-rows td[data-label="breakers"]') == ["all closed"]
    fleet_text = driver.find_element(By.ID, "fleet").text
    for role in ("boss", "admin", "worker"):
        assert role in fleet_text
    tasks_value = '[data-stat="tasks"] .value'
    _wait(driver, f"{TREE} tasks in the totals", lambda d: _texts(d, tasks_value) == [str(TREE)])
    _wait(
        driver,
        "the agent of this peer",
        lambda d: _texts(d, "#agent-rows tr td:first-child") == ["admin"],
    )

    # Live: a second tree moves the counters and the feed without a reload.
    driver.execute_script("window.sameDocument = true;")
    second_root = _run_tree(peers, "r1", expected=2 * TREE)
    _wait(
        driver,
        f"{2 * TREE} tasks in the totals",
        lambda d: _texts(d, tasks_value) == [str(2 * TREE)],
    )
    _wait(
        driver,
        "the second tree's result in the live feed",
        lambda d: d.find_elements(By.CSS_SELECTOR, f'#feed-items a[href="#task/{second_root}"]'),
    )
    _wait(
        driver,
        "throughput plotted",
        lambda d: d.find_elements(By.CSS_SELECTOR, "#plot-throughput polyline"),
    )
    assert driver.execute_script("return window.sameDocument === true;"), "the page reloaded"
    _wait(
        driver,
        "both roots listed",
        lambda d: len(d.find_elements(By.CSS_SELECTOR, '#task-rows tr[data-role="boss"]')) == 2,
    )
    driver.save_screenshot(str(SHOTS / "dashboard-fleet.png"))

    # The peer filter is applied by the peers before the row limit (`owner=`): the workers'
    # peer ran the eight worker tasks of the two trees, and only those are listed.
    Select(driver.find_element(By.ID, "f-peer")).select_by_value(peers[2].node_id)
    _wait(
        driver,
        "only the worker tasks of the workers' peer",
        lambda d: (
            _texts(d, "#task-rows tr td:nth-child(2)") == ["worker"] * (2 * 4)
            and _texts(d, "#task-note") == ["8 shown"]
        ),
    )
    Select(driver.find_element(By.ID, "f-peer")).select_by_value("")
    _wait(
        driver,
        "both roots listed again",
        lambda d: len(d.find_elements(By.CSS_SELECTOR, '#task-rows tr[data-role="boss"]')) == 2,
    )

    # A finished task's delegation tree, opened by clicking its row.
    driver.find_element(By.CSS_SELECTOR, f'#task-rows tr[data-task="{first_root}"]').click()
    _wait(
        driver,
        "the tree's seven nodes, each with its duration",
        lambda d: (
            [t.endswith(" s") for t in _texts(d, "#tree .node-row .duration")] == [True] * TREE
        ),
    )
    nodes = driver.find_elements(By.CSS_SELECTOR, "#tree li.node")
    assert nodes[0].get_attribute("data-task") == first_root
    assert all(n.get_attribute("data-state") == "done" for n in nodes)
    agents = _texts(driver, "#tree .node-row .agent")
    assert sorted(agents) == sorted(["agent boss"] + ["agent admin"] * 2 + ["agent worker"] * 4)
    owner_of = {"boss": peers[0], "admin": peers[1], "worker": peers[2]}
    for row in driver.find_elements(By.CSS_SELECTOR, "#tree .node-row"):
        role = row.find_element(By.CSS_SELECTOR, ".role").text
        assert owner_of[role].node_id[:10] in row.find_element(By.CSS_SELECTOR, ".peer").text
        assert row.find_element(By.CSS_SELECTOR, ".tokens").text.split()[0].isdigit()
    totals = driver.find_element(By.ID, "tree-totals").text
    assert "7 tasks" in totals and "(0 repeated after a takeover)" in totals, totals
    # Every agent of the tree called the offline model at least once.
    calls = driver.find_elements(By.CSS_SELECTOR, "#tree .calls")
    assert len(calls) == TREE, [c.text for c in calls]
    assert all(re.fullmatch(r"\d+ model calls?", c.text) for c in calls), [c.text for c in calls]
    driver.set_window_size(1280, 1200)  # the whole detail in view: a picture shows no more
    detail = driver.find_element(By.ID, "task-detail")
    driver.execute_script("arguments[0].scrollIntoView();", detail)
    detail.screenshot(str(SHOTS / "dashboard-task-tree.png"))

    # A phone's width: one column, every table row a card, nothing wider than the screen.
    driver.set_window_size(390, 844)
    _wait(
        driver, "a 390 px viewport", lambda d: d.execute_script("return window.innerWidth") <= 390
    )
    driver.execute_script("window.scrollTo(0, 0);")
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth;"
    )
    assert overflow <= 0, f"the page is {overflow} px wider than a phone's screen"
    assert not driver.find_element(By.CSS_SELECTOR, "#fleet thead").is_displayed()
    row = driver.find_element(By.CSS_SELECTOR, "#fleet-rows tr")
    assert row.value_of_css_property("display") == "block"
    assert row.rect["width"] <= 390
    driver.execute_script("document.getElementById('fleet').scrollIntoView();")
    time.sleep(0.3)  # let the layout settle before the picture
    driver.save_screenshot(str(SHOTS / "dashboard-phone.png"))

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"the page logged errors: {errors}"
