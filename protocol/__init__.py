"""Grapevine's pure protocol core.

Everything in this package is sans-IO: no sockets, clocks, threads, randomness sources or
environment access. Time arrives as the ``now`` argument (seconds, monotonic), randomness as an
injected ``random.Random``-compatible object, and every entry point returns
:class:`protocol.effects.Effects` for the host to apply.
"""
