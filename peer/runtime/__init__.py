"""The asyncio runtime of one peer: driver, transport, sealing, store, blobs, executor."""
