"""Four peers in network namespaces: a 2|2 partition is detected on both sides and heals.

Needs root and iproute2; skipped otherwise. Builds only gv-test-<pid>-* namespaces with
10.250.0.0/24 addresses inside them, and deletes them even when the test fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.netns_cluster import NetnsCluster, NetnsUnavailable, check_available, run_scenario

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def test_a_two_two_partition_is_seen_from_both_sides_and_heals(tmp_path: Path) -> None:
    try:
        check_available()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    with NetnsCluster(tmp_path, hosts=4, profile="local") as cluster:
        try:
            took = run_scenario(cluster, timeout=45)
        except (TimeoutError, RuntimeError) as exc:
            logs = "\n".join(f"--- {h.netns}:\n{cluster.log_tail(h)}" for h in cluster.members)
            raise AssertionError(f"{exc}\n{logs}") from exc
    assert set(took) == {"converge", "partition_detected", "healed"}
    assert not list(Path("/var/run/netns").glob(f"{cluster.prefix}-*"))
