"""Traces: OpenTelemetry spans of a task's life, one trace per delegation tree across peers.

Theory of operation. A task's record carries the W3C `traceparent` of the span that submitted
it (`protocol.tasks.messages.TaskRecord.traceparent`, signed with the record), so every peer
that claims or runs the task parents its spans on that one:

    submit <role>                  the origin; the record's traceparent names this span
    ├── claim <role>               the peer whose claim became the greatest (an instant)
    └── execute <role>             each execution, from its start to its end or fence
        ├── chat <model>           each model call of the agent loop (GenAI conventions)
        └── execute_tool <tool>    each tool call; `delegate` submits the child in here
            └── submit <role>      the child's record carries this span: the tree goes on

An execution runs in an asyncio task whose context holds its span and this peer's tracer
(`PeerTracing.execution_context`, which the driver hands the executor), so the agent loop's
hooks (`model_call`, `tool_call`, `annotate_agent`) and the child submissions made inside it
descend from the execution without being handed anything.

Invariants:
- Configured by the standard environment only: `OTEL_TRACES_EXPORTER` (`console`, `otlp`, or
  `none`, the default; a comma-separated list is allowed) and `OTEL_SDK_DISABLED`; the SDK and
  the exporters read the rest themselves (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
  `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_*`, `OTEL_BSP_*`). The service name defaults to
  "grapevine"; `service.instance.id` is the peer's short id.
- Unconfigured, nothing is exported and the SDK is never imported: every hook is a test of
  None. A record then carries the trace context of its parent's record, when that has one, so
  a tree keeps one trace id (in spans and logs) through peers that do not trace.
- Each peer has a `TracerProvider` of its own, never OpenTelemetry's global one, and the hooks
  take the tracer from the execution's context: two peers in one process never mix spans.
- Tracing never changes what the peer does: an exporter that cannot be loaded is logged and
  left out; one that fails to export is the SDK's to log.
- Every execution span started is ended: at the execution's end, at its fence, or at
  `shutdown` (outcome "interrupted").
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

EXPORTERS = ("console", "otlp", "none")
"""The values `OTEL_TRACES_EXPORTER` may list."""
DEFAULT_SERVICE_NAME = "grapevine"
OTLP_PROTOCOLS = {"http/protobuf": "http", "grpc": "grpc"}
"""`OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` → the exporter package's module (`proto.<name>`)."""
FAILED_OUTCOMES = ("failed", "timeout")
"""Execution outcomes that mark the span as an error (a fence or a cancel is not one)."""

_PROPAGATOR = TraceContextTextMapPropagator()
_FIELD = "traceparent"


@dataclass(frozen=True, slots=True)
class Scope:
    """What the hooks of a running execution need: its peer's tracer and short id."""

    tracer: Tracer
    peer: str


_SCOPE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("grapevine_trace_scope")
_AGENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("grapevine_trace_agent")
"""The agent running the current execution (`annotate_agent`): its model and tool spans name
it too."""


class Provider(Protocol):
    """The SDK's `TracerProvider`, as far as a peer uses it after building its tracer."""

    def shutdown(self) -> None: ...


@dataclass(slots=True)
class Run:
    """An execution's open span."""

    epoch: int
    span: Span


def trace_id_of(traceparent: str) -> str:
    """The trace id (32 hex digits) of a record's `traceparent`, or "" without one."""
    return traceparent[3:35]


def parent_context(traceparent: str) -> Context:
    """A context whose current span is the (remote) one `traceparent` names; an empty one for
    "" (its spans start a trace)."""
    if not traceparent:
        return Context()
    return _PROPAGATOR.extract({_FIELD: traceparent}, context=Context())


def traceparent_of(span: Span) -> str:
    """The W3C `traceparent` naming `span`, or "" for a span without a valid context."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span, Context()))
    return carrier.get(_FIELD, "")


@dataclass(slots=True)
class Submission:
    """A submission in progress: the trace context its record carries, and its span."""

    traceparent: str
    span: Span | None = None

    def submitted(self, task_id: bytes) -> None:
        """Name the task the submission made (or found, for a repeated idempotency key)."""
        if self.span is not None:
            self.span.set_attribute("grapevine.task.id", task_id.hex())


class PeerTracing:
    """One peer's tracer and the spans of its executions (see the module docstring).

    Args:
        tracer: this peer's tracer; None traces nothing (`from_environment` decides).
        peer: the peer's short id, an attribute of every span.
        provider: the tracer's provider, shut down (flushing its spans) by `shutdown`.
    """

    def __init__(self, tracer: Tracer | None, peer: str, provider: Provider | None = None) -> None:
        self._scope = None if tracer is None else Scope(tracer, peer)
        self._peer = peer
        self._provider = provider
        self._runs: dict[bytes, Run] = {}

    @classmethod
    def from_environment(cls, peer: str) -> PeerTracing:
        """The tracing `OTEL_TRACES_EXPORTER` asks for (none by default), for the peer `peer`.

        The SDK is imported only when some exporter is configured.
        """
        environ = os.environ
        names = _exporter_names(environ)
        if not names:
            return cls(None, peer)
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        resource = Resource.create({"service.instance.id": peer, "grapevine.peer": peer})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for name in names:
            if name == "console":
                # One span per line, written as it ends: a debugging aid, like the JSON logs.
                console = ConsoleSpanExporter(
                    out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n"
                )
                provider.add_span_processor(SimpleSpanProcessor(console))
            else:
                exporter = _otlp_exporter(environ)
                if exporter is not None:
                    provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider.get_tracer("grapevine"), peer, provider)

    @property
    def enabled(self) -> bool:
        """Whether this peer records spans."""
        return self._scope is not None

    @contextmanager
    def submission(self, role: str, inherited: str) -> Iterator[Submission]:
        """Trace one submission here: a "submit" span under the context current here (an
        agent's execution or tool call) or else under `inherited`, the trace context of the
        parent task's record ("" for a root task). Yields what the record carries.

        Untraced, the record carries `inherited` as it is.
        """
        scope = self._scope
        if scope is None:
            yield Submission(inherited)
            return
        current = trace.get_current_span()
        parent = None if current.get_span_context().is_valid else parent_context(inherited)
        span = scope.tracer.start_span(
            f"submit {role}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={"grapevine.task.role": role, "grapevine.peer": scope.peer},
        )
        with trace.use_span(span, end_on_exit=True):
            yield Submission(traceparent_of(span), span)

    def claimed(self, task_id: bytes, role: str, epoch: int, traceparent: str) -> None:
        """This peer's claim of `epoch` became the task's greatest: an instant "claim" span."""
        scope = self._scope
        if scope is None:
            return
        scope.tracer.start_span(
            f"claim {role}",
            context=parent_context(traceparent),
            attributes=self._task_attributes(task_id, role, epoch)
            | {"grapevine.task.takeover": epoch > 1},
        ).end()

    def execution_started(self, task_id: bytes, role: str, epoch: int, traceparent: str) -> None:
        """An execution of the task started here: open its "execute" span (a repeated start
        of the same epoch keeps the span it has)."""
        scope = self._scope
        if scope is None:
            return
        run = self._runs.get(task_id)
        if run is not None:
            if run.epoch == epoch:
                return
            self.execution_ended(task_id, run.epoch, "fenced", "superseded")
        span = scope.tracer.start_span(
            f"execute {role}",
            context=parent_context(traceparent),
            kind=SpanKind.CONSUMER,
            attributes=self._task_attributes(task_id, role, epoch),
        )
        self._runs[task_id] = Run(epoch, span)

    def execution_ended(self, task_id: bytes, epoch: int, outcome: str, reason: str = "") -> None:
        """The execution of `epoch` ended with `outcome` (a fence gives `reason`)."""
        run = self._runs.get(task_id)
        if run is None or run.epoch != epoch:
            return
        del self._runs[task_id]
        run.span.set_attribute("grapevine.task.outcome", outcome)
        if reason:
            run.span.set_attribute("grapevine.task.fence_reason", reason)
        if outcome in FAILED_OUTCOMES:
            run.span.set_status(Status(StatusCode.ERROR, outcome))
        run.span.end()

    def execution_context(self, task_id: bytes, epoch: int) -> contextvars.Context | None:
        """The context an execution's asyncio task runs in: a copy of the current one with the
        execution's span current and this peer's tracer for the hooks; None when untraced."""
        scope = self._scope
        run = self._runs.get(task_id)
        if scope is None or run is None or run.epoch != epoch:
            return None
        ctx = contextvars.copy_context()
        ctx.run(_enter, run.span, scope)
        return ctx

    def shutdown(self) -> None:
        """End the spans of executions still open and flush every span to the exporters."""
        for task_id, run in list(self._runs.items()):
            self.execution_ended(task_id, run.epoch, "interrupted")
        if self._provider is not None:
            self._provider.shutdown()

    def _task_attributes(
        self, task_id: bytes, role: str, epoch: int
    ) -> dict[str, str | int | bool]:
        return {
            "grapevine.task.id": task_id.hex(),
            "grapevine.task.role": role,
            "grapevine.task.epoch": epoch,
            "grapevine.peer": self._peer,
        }


def _enter(span: Span, scope: Scope) -> None:
    """Make `span` and `scope` current in the running context (one built to be discarded with
    its task, so nothing is detached)."""
    otel_context.attach(trace.set_span_in_context(span))
    _SCOPE.set(scope)


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = environ.get("OTEL_TRACES_EXPORTER", "none")
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown:
        log.error(
            "OTEL_TRACES_EXPORTER: unknown exporter %s (known: %s); left out",
            ", ".join(unknown),
            ", ".join(EXPORTERS),
        )
    if "none" in names:
        return []
    return [name for name in dict.fromkeys(names) if name in EXPORTERS]


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter | None:
    """The OTLP span exporter for the configured protocol (http/protobuf by default, as the
    specification says), or None, logged, when its package is not installed."""
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    module_name = OTLP_PROTOCOLS.get(protocol)
    if module_name is None:
        known = ", ".join(OTLP_PROTOCOLS)
        log.error("OTLP protocol %r is not one of %s; traces are not exported", protocol, known)
        return None
    package = f"opentelemetry-exporter-otlp-proto-{module_name}"
    try:
        module = importlib.import_module(
            f"opentelemetry.exporter.otlp.proto.{module_name}.trace_exporter"
        )
    except ImportError:
        log.error(
            "OTEL_TRACES_EXPORTER=otlp needs %s: pip install 'grapevine-agents[otlp]' "
            "(grpc: pip install %s); traces are not exported over OTLP",
            package,
            package,
        )
        return None
    exporter: SpanExporter = module.OTLPSpanExporter()
    return exporter


def annotate_agent(name: str) -> None:
    """Name the agent running the current execution on its span (`gen_ai.agent.name`), and on
    the model and tool spans it opens from now on."""
    if _SCOPE.get(None) is not None:
        trace.get_current_span().set_attribute("gen_ai.agent.name", name)
        _AGENT.set(name)


def _with_agent(attributes: dict[str, str]) -> dict[str, str]:
    agent = _AGENT.get(None)
    return attributes if agent is None else {**attributes, "gen_ai.agent.name": agent}


class ModelCall:
    """A model call in progress; `completed` records what the provider answered."""

    __slots__ = ("span",)

    def __init__(self, span: Span | None) -> None:
        self.span = span

    def completed(self, model: str, input_tokens: int, output_tokens: int, cost_micro: int) -> None:
        """The call answered: the model that did, its tokens and its cost (millionths of $)."""
        if self.span is None:
            return
        self.span.set_attributes(
            {
                "gen_ai.response.model": model,
                "gen_ai.usage.input_tokens": input_tokens,
                "gen_ai.usage.output_tokens": output_tokens,
                "grapevine.cost_usd": cost_micro / 1_000_000,
            }
        )


_UNTRACED_CALL = ModelCall(None)


@contextmanager
def model_call(model: str) -> Iterator[ModelCall]:
    """Trace one model call of the current execution: a "chat <model>" client span following
    the OpenTelemetry GenAI conventions. An exception raised inside marks it as an error."""
    scope = _SCOPE.get(None)
    if scope is None:
        yield _UNTRACED_CALL
        return
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": model,
        "grapevine.peer": scope.peer,
    }
    with scope.tracer.start_as_current_span(
        f"chat {model}", kind=SpanKind.CLIENT, attributes=_with_agent(attributes)
    ) as span:
        yield ModelCall(span)


@contextmanager
def tool_call(name: str, call_id: str) -> Iterator[None]:
    """Trace one tool call of the current execution: an "execute_tool <name>" span (GenAI
    conventions), current while the tool runs, so a child it submits descends from it."""
    scope = _SCOPE.get(None)
    if scope is None:
        yield
        return
    attributes = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": name,
        "gen_ai.tool.call.id": call_id,
        "grapevine.peer": scope.peer,
    }
    with scope.tracer.start_as_current_span(
        f"execute_tool {name}", attributes=_with_agent(attributes)
    ):
        yield
