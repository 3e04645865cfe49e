"""Joining a network: seed addresses, the initial join with backoff, periodic re-resolution."""
