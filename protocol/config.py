"""Protocol configuration: one frozen dataclass per machine, presets, and derived values.

Invariants:
- Every field documents its effect, its trade-off and, where it scales, its formula.
- Derived values (retransmit limit, suspicion timeouts, push-pull scaling) are pure functions of
  the config and the cluster size, tested table-driven in tests/protocol/test_config.py.
- Presets follow memberlist's DefaultLANConfig / DefaultLocalConfig, whose numbers come from
  years of production use; `sim()` is `lan()` so simulated figures compare with real LAN runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from protocol.errors import LocalProtocolError


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """Failure detection: SWIM probes with the Lifeguard refinements (Dadgar et al., 2018)."""

    probe_interval: float = 1.0
    """Seconds between probes of one random member (round-robin over a shuffled list).
    Lower detects failures sooner at the cost of more traffic; load per peer is one ping and one
    ack per interval, independent of cluster size."""

    probe_timeout: float = 0.5
    """Seconds to wait for a direct ack before asking `indirect_checks` members to probe.
    Should exceed the 99th-percentile round-trip time; too low causes needless indirect probes."""

    indirect_checks: int = 3
    """Members asked to probe on our behalf when a direct probe times out (SWIM's k). More
    lowers false positives from a lossy path at the cost of k extra pings per failed probe."""

    suspicion_mult: int = 4
    """Multiplier for the minimum suspicion timeout:
    min = suspicion_mult * max(1, log10(n)) * probe_interval. Higher tolerates slower refutation
    at the cost of slower failure declaration."""

    suspicion_max_timeout_mult: int = 6
    """Upper bound of the suspicion timeout as a multiple of the minimum. A fresh suspicion
    starts at max and shrinks toward min as independent confirmations arrive (Lifeguard)."""

    awareness_max_multiplier: int = 8
    """Cap on the local-health multiplier (Lifeguard's "awareness"). A peer that misses acks or
    must refute suspicions of itself scales its probe timeout and interval by up to this factor,
    so a struggling peer stops accusing healthy ones."""

    dead_retention: float = 3600.0
    """Seconds a dead member is kept (and still contacted by reconnect) before being forgotten.
    Longer lets longer partitions heal through dead members; seeds heal any partition."""

    gossip_to_the_dead: float = 30.0
    """Seconds after death during which a dead member still receives gossip, so it can learn of
    its own death and refute it."""

    stall_threshold: float = 5.0
    """If the host does not call the node for this many seconds (GC pause, suspended VM), the
    node distrusts its running timeouts on waking: suspicions restart, awareness rises, and no
    member is declared dead from the stale timers."""

    def validate(self) -> None:
        """Raise `LocalProtocolError` naming the first field with an impossible value."""
        _positive(self, "probe_interval", "probe_timeout", "dead_retention", "stall_threshold")
        _positive(self, "gossip_to_the_dead")
        if self.probe_timeout > self.probe_interval:
            raise LocalProtocolError("probe_timeout must not exceed probe_interval")
        _at_least(self, 0, "indirect_checks")
        _at_least(self, 1, "suspicion_mult", "suspicion_max_timeout_mult")
        _at_least(self, 1, "awareness_max_multiplier")


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Dissemination: piggybacked, transmit-limited broadcasts and push-pull anti-entropy."""

    gossip_interval: float = 0.2
    """Seconds between gossip rounds. Each round sends queued broadcasts to `gossip_fanout`
    random members; rounds with nothing queued send nothing. Lower spreads faster, costs more."""

    gossip_fanout: int = 3
    """Members contacted per gossip round. Dissemination takes about log_fanout(n) rounds."""

    retransmit_mult: int = 4
    """Each broadcast is sent retransmit_mult * ceil(log10(n + 1)) times by every peer that
    holds it. Higher makes delivery under loss more certain at linear cost in messages."""

    packet_budget: int = 8192
    """Bytes of broadcasts carried by one gossip message or piggybacked on one probe.
    memberlist uses 1400 to fit a UDP datagram; our hops are HTTP requests, where per-request
    cost dominates, so a larger batch moves the same facts in fewer requests (measured in the
    simulator: 1,000 peers joining reach a full view sooner with 5x fewer messages)."""

    backlog_packets: int = 8
    """Most packets one gossip round sends each target while broadcasts nobody was sent yet
    remain queued. memberlist sends one: membership news is small and rare. Tasks bring a
    steady stream (about five objects per task), and one 8 KiB packet per target per round
    fell behind: at 350 tasks/s among 3 peers, results took 12 s to reach every peer, most
    through push-pull. Extra packets go only while that backlog lasts; to one target they
    leave in one request (the transport merges what waits for the same address)."""

    push_pull_interval: float = 30.0
    """Seconds between full-state exchanges with one random member, scaled up for clusters above
    32 members (see `push_pull_interval_for`). Repairs whatever gossip missed."""

    reconnect_interval: float = 30.0
    """Seconds between attempts to push-pull with a random dead member or seed that is not known
    alive. This is what merges the two sides of a healed partition."""

    event_dedup: int = 1024
    """User events remembered per peer to suppress duplicates. Must exceed the events that can
    be in flight within one dissemination time."""

    def validate(self) -> None:
        """Raise `LocalProtocolError` naming the first field with an impossible value."""
        _positive(self, "gossip_interval", "push_pull_interval", "reconnect_interval")
        _at_least(self, 1, "gossip_fanout", "retransmit_mult", "event_dedup", "backlog_packets")
        _at_least(self, 256, "packet_budget")


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """Claims, takeover and replication of tasks (docs/design.md section 5)."""

    standby_delay: float = 3.0
    """Seconds each standby waits per rank, while a peer ranked before it looks free, before it
    asks the task's primary for a grant (docs/tasks.md, rule 3). Should exceed the time a claim
    takes to reach every peer (about 1 s on a LAN at 1,000 peers): sooner, standbys ask about
    tasks already claimed (harmless: the primary answers with its claim). Also the quiet time
    after a stall or a restart. When every peer before a standby looks full it asks at once."""

    replication: int = 2
    """Other peers that must hold a task record durably before its submission is acknowledged
    (every other live member when there are fewer). A task's replica set is the top
    `replication + 1` live members by HRW score for its id. Higher survives more simultaneous
    crashes at the cost of a slower acknowledgement and k more copies of every task object."""

    retention: float = 24 * 3600.0
    """Seconds a final task (an accepted result or a cancel, and every child held here final)
    is kept whole before it is compacted to a tombstone (`protocol.tasks.retention`). Longer
    keeps results, trees and execution logs readable for longer; a peer holds about
    `retention * task rate * k / N` whole tasks, so shorter bounds memory and disk more
    tightly. The peer's `--task-retention` sets it."""

    tombstone_grace: float = 24 * 3600.0
    """Seconds a tombstone is kept after compaction before it is forgotten. While it is held,
    late objects of the task (a replica back from a partition, a delayed send) are dropped
    instead of resurrecting it; once it is gone they would be taken for a new task. So it must
    exceed the longest time a peer may be away and come back with its old copies: a peer whose
    data is older than `retention + tombstone_grace` discards them on return (decision 22).
    Longer costs memory and disk for every task compacted in the window (measured about 1 KB
    of each per tombstone). The peer's `--tombstone-grace` sets it, and defaults it to the
    retention (decision 37)."""

    def validate(self) -> None:
        """Raise `LocalProtocolError` naming the first field with an impossible value."""
        _positive(self, "standby_delay")
        _at_least(self, 0, "replication")
        _positive(self, "retention")
        _positive(self, "tombstone_grace")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything one `protocol.node.Node` needs, composed from the per-machine configs."""

    network_id: bytes = b"grapevine-dev"
    """Identifies the network; signed into every object so objects cannot cross networks."""

    swim: SwimConfig = field(default_factory=SwimConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)

    def validate(self) -> None:
        """Raise `LocalProtocolError` if any part of the configuration is impossible."""
        if not self.network_id or len(self.network_id) > 64:
            raise LocalProtocolError("network_id must be 1 to 64 bytes")
        self.swim.validate()
        self.gossip.validate()
        self.tasks.validate()


def lan() -> NodeConfig:
    """memberlist's LAN profile: probe 1 s / 500 ms, gossip 200 ms to 3, push-pull 30 s."""
    return NodeConfig()


def local() -> NodeConfig:
    """memberlist's Local profile, for peers on one host: tighter timeouts, less redundancy."""
    return NodeConfig(
        swim=SwimConfig(
            probe_interval=1.0,
            probe_timeout=0.2,
            indirect_checks=1,
            suspicion_mult=3,
            gossip_to_the_dead=15.0,
        ),
        gossip=GossipConfig(
            gossip_interval=0.1,
            retransmit_mult=2,
            push_pull_interval=15.0,
            reconnect_interval=10.0,
        ),
    )


def wan() -> NodeConfig:
    """memberlist's WAN profile, for slow or overloaded links: probe 5 s / 3 s, suspicion mult
    6, gossip 500 ms to 4, push-pull 60 s; claims wait 6 s before a standby steps in. Also the
    profile for many peers crowded on one small host, whose processes stall for seconds."""
    return NodeConfig(
        swim=SwimConfig(
            probe_interval=5.0,
            probe_timeout=3.0,
            suspicion_mult=6,
            gossip_to_the_dead=60.0,
        ),
        gossip=GossipConfig(
            gossip_interval=0.5,
            gossip_fanout=4,
            push_pull_interval=60.0,
        ),
        tasks=TaskConfig(standby_delay=6.0),
    )


def sim() -> NodeConfig:
    """The simulator's default: LAN timings, so simulated figures compare with LAN clusters."""
    return lan()


def with_network(config: NodeConfig, network_id: bytes) -> NodeConfig:
    """Return `config` bound to `network_id`."""
    return replace(config, network_id=network_id)


# Derived values. memberlist/util.go holds the originals of these formulas.


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """Times each peer sends one broadcast: mult * ceil(log10(n + 1)); at least 1 per peer."""
    return retransmit_mult * max(1, math.ceil(math.log10(n + 1)))


def suspicion_min_timeout(suspicion_mult: int, n: int, probe_interval: float) -> float:
    """Lifeguard's minimum suspicion timeout: mult * max(1, log10(n)) * probe_interval."""
    return suspicion_mult * max(1.0, math.log10(max(1, n))) * probe_interval


def suspicion_confirmations_wanted(suspicion_mult: int, n: int) -> int:
    """Independent confirmations that shrink a suspicion from max to min: mult - 2, but 0 in
    clusters too small to supply them (n - 2 < mult - 2)."""
    k = suspicion_mult - 2
    return 0 if n - 2 < k else max(0, k)


def suspicion_timeout(min_timeout: float, max_timeout: float, wanted: int, got: int) -> float:
    """Current suspicion timeout after `got` confirmations: shrinks logarithmically from max to
    min, reaching min at `wanted` confirmations (Lifeguard section IV-B)."""
    if wanted <= 0:
        return min_timeout
    frac = math.log(got + 1.0) / math.log(wanted + 1.0)
    return max(min_timeout, max_timeout - frac * (max_timeout - min_timeout))


def push_pull_interval_for(interval: float, n: int) -> float:
    """Push-pull interval scaled so full-state traffic stays bounded as clusters grow: unchanged
    up to 32 members, then multiplied by ceil(log2(n) - log2(32)) + 1."""
    if n <= 32:
        return interval
    return interval * (math.ceil(math.log2(n) - math.log2(32.0)) + 1)


def _positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise LocalProtocolError(f"{name} must be positive, got {value!r}")


def _at_least(cfg: object, low: int, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < low:
            raise LocalProtocolError(f"{name} must be an integer >= {low}, got {value!r}")
