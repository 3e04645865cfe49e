"""What a peer tells its operator: Prometheus metrics, task lifecycle logs and OpenTelemetry
traces (docs/observability.md)."""
