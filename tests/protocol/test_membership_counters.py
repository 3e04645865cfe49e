"""The failure detector's event counters (`Node.membership_counters`, exported as metrics by
peer/observability): each counts its event once, and nothing else moves it."""

from __future__ import annotations

from protocol.wire import Ack, Suspect
from tests.protocol.fakes import Link, addr, alive, membership, node_id, probe


def test_a_probe_round_counts_one_probe_and_an_indirect_one_only_when_helpers_are_asked() -> None:
    m, port = membership(members=4)
    seq, _ = probe(m, port, 10.0)
    m.probes.on_ack(Ack(seq))
    assert (m.probes.probes_sent, m.probes.indirect_probes) == (1, 0)
    seq, _ = probe(m, port, 11.0)
    m.probes.on_probe_timeout(11.5, seq)
    assert (m.probes.probes_sent, m.probes.indirect_probes) == (2, 1)


def test_a_suspicion_counts_once_and_its_end_by_an_alive_record_counts_as_refuted() -> None:
    m, _ = membership(members=4)
    target = node_id(1)
    m.apply_suspect(10.0, Suspect(target, 0, node_id(2)), None)
    m.apply_suspect(10.5, Suspect(target, 0, node_id(3)), None)  # a confirmation, not a new one
    assert (m.suspicions, m.suspicions_refuted) == (1, 0)
    m.apply_alive(11.0, alive(1, 1), addr(1), None)
    assert (m.suspicions, m.suspicions_refuted) == (1, 1)
    m.apply_alive(12.0, alive(1, 2), addr(1), None)  # alive to alive refutes nothing
    assert m.suspicions_refuted == 1
    assert m.false_refutations == 0


def test_node_reports_the_counters_under_their_names() -> None:
    link = Link(2)
    counters = link.node(0).membership_counters()
    assert set(counters) == {
        "probes",
        "indirect probes",
        "suspicions",
        "suspicions refuted",
        "refutations",
    }
    assert all(value == 0 for value in counters.values())
