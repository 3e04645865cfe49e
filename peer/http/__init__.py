"""The local HTTP API of one peer: `app.PeerApi` assembles one module per resource (members,
events, keys, tasks, watch, tree, blobs, agents) over what they share (`common`)."""
