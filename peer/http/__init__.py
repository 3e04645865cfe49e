"""The local HTTP API of one peer, one module per resource."""
