"""The asyncio shell around protocol.Node: transport, sealing, storage, agents, API."""
