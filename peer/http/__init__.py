"""The local HTTP API of one peer: `app.PeerApi` assembles one module per resource (members,
events, keys, tasks, watch, tree, blobs, agents) over what they share (`common`), every request
first passing the boundary checks of `guard` (Host, Origin, bearer token, JSON bodies)."""
