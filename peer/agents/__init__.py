"""The agent host: litellm-backed agents, the offline model, tools, pools and limits.

The modules meet only through `peer.agents.ports`: the model layer (`llm`, `offline`,
`limits`) produces `Completion`s, the runtime (`runtime`, `tools`, `tree`) runs one task as
an agent loop against a `Model` and a `TaskPort`, and the host (`host`) turns agent specs into
executor roles. docs/design.md section 6 and docs/agents.md describe the behaviour.
"""
