"""The `grapevine` command, one module per command group."""
