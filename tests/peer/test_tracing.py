"""Traces (docs/observability.md "Traces", peer/observability/tracing.py): configured by the
`OTEL_*` environment as a user sets it; a delegation tree run by agents on two peers is one
trace whose spans nest; log lines carry its trace id; OTLP export; nothing when unset."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp.test_utils import TestClient, TestServer

from peer.agents.ports import AgentInput
from peer.agents.spec import AgentSpec
from peer.build import Peer, build_peer
from peer.http.app import PeerApi
from peer.observability.tracing import PeerTracing, trace_id_of
from peer.runtime.executor import Work, builtin_roles
from peer.runtime.keyring import Keyring
from peer.settings import AgentSettings
from protocol.identity import short_id
from scripts.local_cluster import LocalCluster, query, wait_ready, wait_views
from tests.peer.inprocess import API_HEADERS, API_TOKEN, MemoryStore, in_process_peer

KEY = bytes(range(160, 192))
Span = dict[str, Any]


def spans_in(text: str) -> list[Span]:
    """The spans the console exporter wrote (one JSON object per line) among other lines."""
    found = []
    for line in text.splitlines():
        if line.startswith("{") and '"span_id"' in line:
            found.append(json.loads(line))
    return found


def span_id(span: Span) -> str:
    return str(span["context"]["span_id"])


def attr(span: Span, name: str) -> Any:
    return span["attributes"].get(name)


@asynccontextmanager
async def agent_peer(index: int, *agents: AgentSpec) -> AsyncIterator[Peer]:
    """An in-process peer hosting `agents` (the offline model), its tracing from the env."""
    with tempfile.TemporaryDirectory() as scratch:
        settings = AgentSettings(
            bind="127.0.0.1:0", data_dir=Path(scratch), profile="local", agents=agents
        )
        async with build_peer(settings, keyring=Keyring(KEY), store=MemoryStore()) as peer:
            yield peer


async def until(check: Any, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "not within the limit"
        await asyncio.sleep(0.02)


LEAD = AgentSpec(
    "lead",
    ("report",),
    system="Delegate to: section\nParts: 2",
    tools=("delegate", "final_answer"),
)
WRITER = AgentSpec("writer", ("section",))


async def test_a_delegation_tree_on_two_peers_is_one_trace_whose_spans_nest(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    caplog.set_level(logging.INFO, logger="grapevine.tasks")
    async with agent_peer(1, LEAD) as a, agent_peer(2, WRITER) as b:
        assert a.driver.tracing.enabled and b.driver.tracing.enabled
        assert await b.driver.join([a.node.addr], timeout=5.0) is not None
        await until(lambda: a.node.capable("section"))
        request = AgentInput("A short report on city parks").encode()
        root = a.driver.submit("report", request, nonce=os.urandom(16))
        result = await a.driver.wait_result(root, timeout=30)
        assert result is not None and result.outcome == "ok", result
        children = [c.task_id for c in a.driver.children_of(root)]
        assert len(children) == 2
        peers = {short_id(a.node.node_id), short_id(b.node.node_id)}
        record = a.node.task(root)
        assert record is not None and record.record is not None
        trace_id = trace_id_of(record.record.traceparent)
        # The children's results reach B's spans' ends before A has the root's; wait for B's.
        await until(lambda: all(b.node.task(c) and b.node.task(c).accepted for c in children))  # type: ignore[union-attr]
    spans = spans_in(capsys.readouterr().out)
    assert spans, "the console exporter wrote nothing"
    by_id = {span_id(s): s for s in spans}
    tree_ids = {root.hex()} | {c.hex() for c in children}
    tree = [s for s in spans if s["context"]["trace_id"] == "0x" + trace_id]

    # One trace: every span naming a task of the tree is in it, and both peers wrote some.
    named = [s for s in spans if attr(s, "grapevine.task.id") in tree_ids]
    assert named and all(s in tree for s in named)
    assert {attr(s, "grapevine.peer") for s in tree} == peers
    assert {s["resource"]["attributes"]["service.name"] for s in tree} == {"grapevine"}

    def parent(span: Span) -> Span | None:
        return by_id.get(str(span["parent_id"])) if span["parent_id"] else None

    def ancestors(span: Span) -> list[str]:
        chain, node = [], parent(span)
        while node is not None:
            chain.append(node["name"])
            node = parent(node)
        return chain

    def one(name: str, task: bytes) -> Span:
        found = [
            s for s in tree if s["name"] == name and attr(s, "grapevine.task.id") == task.hex()
        ]
        assert len(found) == 1, (name, found)
        return found[0]

    submit = one("submit report", root)
    assert submit["parent_id"] is None and submit["kind"] == "SpanKind.PRODUCER"
    claim, execute = one("claim report", root), one("execute report", root)
    assert parent(claim) is submit and parent(execute) is submit
    assert attr(execute, "grapevine.task.epoch") == 1
    assert attr(execute, "gen_ai.agent.name") == "lead"
    assert attr(execute, "grapevine.task.outcome") == "ok"
    assert attr(execute, "grapevine.peer") == short_id(a.node.node_id)

    chats = [s for s in tree if s["name"] == "chat grapevine/offline" and parent(s) is execute]
    assert chats and all(attr(s, "gen_ai.request.model") == "grapevine/offline" for s in chats)
    assert all(attr(s, "gen_ai.usage.input_tokens") > 0 for s in chats)
    assert all(attr(s, "gen_ai.usage.output_tokens") > 0 for s in chats)
    assert all(attr(s, "grapevine.cost_usd") == 0.0 for s in chats)
    delegates = [s for s in tree if s["name"] == "execute_tool delegate"]
    assert len(delegates) == 2 and all(parent(s) is execute for s in delegates)
    # The agent is named on its model and tool spans too.
    assert all(attr(s, "gen_ai.agent.name") == "lead" for s in chats + delegates)
    assert any(s["name"] == "execute_tool final_answer" for s in tree)

    for child in children:
        child_submit = one("submit section", child)
        assert parent(child_submit) in delegates
        child_execute = one("execute section", child)
        assert attr(child_execute, "grapevine.peer") == short_id(b.node.node_id)
        assert attr(child_execute, "gen_ai.agent.name") == "writer"
        assert parent(child_execute) is child_submit
        assert ancestors(child_execute)[:4] == [
            "submit section",
            "execute_tool delegate",
            "execute report",
            "submit report",
        ]
        child_chat = [
            s for s in tree if s["name"] == "chat grapevine/offline" and parent(s) is child_execute
        ]
        assert child_chat and all(attr(s, "gen_ai.agent.name") == "writer" for s in child_chat)

    # The lifecycle log lines of every task of the tree, on both peers, carry its trace id.
    lines = [vars(r) for r in caplog.records if vars(r).get("task_id") in tree_ids]
    assert {line["peer"] for line in lines} == peers
    assert {line["trace_id"] for line in lines} == {trace_id}
    assert {line["event"] for line in lines} >= {"submitted", "claimed", "started", "ended"}
    # The text format (the default) shows it in the line itself.
    assert all(
        r.getMessage().endswith(f" trace={trace_id}")
        for r in caplog.records
        if vars(r).get("task_id") in tree_ids
    )


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": " Console "}, True),
        ({"OTEL_TRACES_EXPORTER": "console,none"}, False),  # "none" wins, as the spec says
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, False),  # unknown: logged and left out
        ({"OTEL_TRACES_EXPORTER": "zipkin,console"}, True),
    ],
)
def test_the_exporter_comes_from_otel_traces_exporter(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], enabled: bool
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    tracing = PeerTracing.from_environment("peer")
    try:
        assert tracing.enabled is enabled
    finally:
        tracing.shutdown()


def test_unset_nothing_is_traced_and_the_sdk_is_never_imported() -> None:
    script = (
        "import sys\n"
        "from peer.observability.tracing import PeerTracing\n"
        "tracing = PeerTracing.from_environment('peer')\n"
        "with tracing.submission('echo', '') as traced:\n"
        "    traced.submitted(b'x')\n"
        "tracing.execution_started(b'x', 'echo', 1, '')\n"
        "assert traced.traceparent == '' and tracing.execution_context(b'x', 1) is None\n"
        "assert not tracing.enabled\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr


async def test_a_peer_that_does_not_trace_passes_its_parents_trace_context_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    drivers = []

    async def relay(work: Work) -> bytes:
        """Delegates to `echo` from the untraced peer, as an agent would."""
        child = drivers[1].submit("echo", work.input, parent=work.task_id, nonce=os.urandom(16))
        result = await drivers[1].wait_result(child, timeout=10)
        assert result is not None
        return result.output

    async with in_process_peer(1, KEY, roles=builtin_roles()) as a:
        monkeypatch.delenv("OTEL_TRACES_EXPORTER")
        async with in_process_peer(2, KEY, roles={"relay": relay}) as b:
            assert a.driver.tracing.enabled and not b.driver.tracing.enabled
            drivers += [a.driver, b.driver]
            assert await b.driver.join([a.node.addr], timeout=5.0) is not None
            await until(lambda: a.node.capable("relay"))
            root = a.driver.submit("relay", b"via b", nonce=os.urandom(16))
            assert await a.driver.wait_result(root, timeout=10) is not None
            (child,) = b.driver.children_of(root)
            parent_record, child_record = b.node.task(root), child.record
            assert parent_record is not None and parent_record.record is not None
            assert child_record is not None
            assert child_record.traceparent == parent_record.record.traceparent != ""
            # A root submitted at the untraced peer carries no trace context.
            alone = b.driver.submit("echo", b"alone", nonce=os.urandom(16))
            held = b.node.task(alone)
            assert held is not None and held.record is not None
            assert held.record.traceparent == ""
    # The child's spans at the traced peer join the tree's trace, under the root's submit.
    spans = spans_in(capsys.readouterr().out)
    trace_id = "0x" + trace_id_of(child_record.traceparent)
    executed = [s for s in spans if attr(s, "grapevine.task.id") == child.task_id.hex()]
    assert {s["name"] for s in executed} >= {"claim echo", "execute echo"}
    assert {s["context"]["trace_id"] for s in executed} == {trace_id}


async def test_a_submission_over_http_joins_the_clients_trace(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    caller = "00-" + "5e" * 16 + "-" + "7a" * 8 + "-01"
    async with in_process_peer(1, KEY) as a, in_process_peer(2, KEY) as b:
        assert await b.driver.join([a.node.addr], timeout=5.0) is not None
        await until(lambda: len(a.node.capable("echo")) == 2)
        api = PeerApi(a.driver, a.transport, tmp_path, lambda: None, token=API_TOKEN)
        client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
        await client.start_server()
        try:
            ids = []
            for header in (caller, caller.upper(), ""):  # an invalid header is ignored
                headers = {"traceparent": header} if header else {}
                body = {"role": "echo", "input": "hi", "wait": True}
                answer = await client.post("/v1/tasks", json=body, headers=headers)
                assert answer.status in (200, 202), await answer.text()
                ids.append(str((await answer.json())["id"]))
        finally:
            await client.close()
        records = [a.node.task(bytes.fromhex(task_id)) for task_id in ids]
        traceparents = [st.record.traceparent for st in records if st and st.record]
    spans = spans_in(capsys.readouterr().out)
    submits = {attr(s, "grapevine.task.id"): s for s in spans if s["name"] == "submit echo"}
    joined, fresh, plain = (submits[task_id] for task_id in ids)
    assert joined["context"]["trace_id"] == "0x" + trace_id_of(caller)
    assert joined["parent_id"] == "0x" + "7a" * 8
    assert trace_id_of(traceparents[0]) == trace_id_of(caller) != trace_id_of(traceparents[1])
    assert fresh["parent_id"] is None and plain["parent_id"] is None


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps each request's path, content type and body."""

    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    received: ClassVar[list[tuple[str, str, bytes]]] = []
    handler = type("Receiver", (Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


async def test_spans_are_exported_over_otlp_http(
    monkeypatch: pytest.MonkeyPatch, collector: tuple[str, list[tuple[str, str, bytes]]]
) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    endpoint, received = collector
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "fleet-a")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    async with in_process_peer(1, KEY, roles=builtin_roles()) as peer:
        task_id = peer.driver.submit("echo", b"hi", nonce=os.urandom(16))
        assert await peer.driver.wait_result(task_id, timeout=10) is not None
    # The peer's exit flushed its spans (`PeerTracing.shutdown`).
    assert received and {(path, kind) for path, kind, _ in received} == {
        ("/v1/traces", "application/x-protobuf")
    }
    names, services = set(), set()
    for _, _, body in received:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for kv in resource_spans.resource.attributes:
                if kv.key == "service.name":
                    services.add(kv.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                names |= {span.name for span in scope_spans.spans}
    assert {"submit echo", "claim echo", "execute echo"} <= names
    assert services == {"fleet-a"}


def test_agent_processes_trace_to_the_console_as_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three `grapevine agent` processes: a submission is acknowledged once two others hold it.
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    with LocalCluster(tmp_path, extra_args=("--log-format", "json")) as cluster:
        seed = cluster.add()
        peers = [seed, cluster.add(join=[seed]), cluster.add(join=[seed])]

        async def run() -> str:
            await wait_ready(peers, timeout=30)
            await wait_views(peers, {p.node_id: "alive" for p in peers}, timeout=30)
            answer = await query(seed, lambda c: c.submit("echo", "traced"))
            done = await query(seed, lambda c: c.wait_task(str(answer["id"])))
            assert done["state"] == "done", done
            return str(answer["id"])

        task_id = asyncio.run(run())

        def logged() -> tuple[list[Span], list[dict[str, Any]]]:
            text = "\n".join(p.log_path.read_text() for p in peers)
            spans = [s for s in spans_in(text) if attr(s, "grapevine.task.id") == task_id]
            lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
            return spans, [r for r in lines if r.get("task_id") == task_id]

        for _ in range(100):  # a line may reach the file a moment after the API answered
            spans, lines = logged()
            if {"submit echo", "claim echo", "execute echo"} <= {s["name"] for s in spans}:
                break
            time.sleep(0.1)
    assert {"submit echo", "claim echo", "execute echo"} <= {s["name"] for s in spans}
    trace_ids = {s["context"]["trace_id"] for s in spans}
    assert len(trace_ids) == 1
    assert lines and {"0x" + r["trace_id"] for r in lines} == trace_ids
