"""The Python API of a peer: roles served by async functions, agents defined in code, and a
peer started from Python with the command line's settings (docs/python.md).

- `roles`: `@role("name")` turns an async function into a `Role`.
- `task`: the `Task` a role's function receives (input, delegate, progress, budget).
- `agents`: `Agent(...)`, an LLM agent declared in code (tools as typed Python functions).
- `serving`: what a peer serves from Python (`Served`), found in modules (`--handlers`),
  checked against the configured agents, and turned into executor roles.
- `running`: `run` and `serve`, `grapevine agent` from Python.

`peer/__init__.py` re-exports the public names lazily, so `import peer` imports none of this.
"""
