"""What a peer tells its operator: Prometheus metrics and task lifecycle logs
(docs/observability.md)."""
