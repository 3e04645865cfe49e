"""The task plane: task records, claim tokens and results, and the rules that make work run once.

Theory of operation (docs/design.md section 5 is the specification)
- Per task each peer keeps a state-based CRDT: the signed task record, every claim (one per
  run: epoch, owner, owner incarnation), the arbiter's signed grants of takeover epochs, every
  signed result and a cancel flag. A claim is a run's start and a result its end; there is no
  separate execution log (decision 23). Every part merges by set union or by max, so the
  order, loss and duplication of messages do not matter (`state`, `merge`).
- A task lives on its replica set, the top k live members by rendezvous hash of its id; its
  objects go directly to its audience (replicas, origin, current owner, and while it waits for
  an owner the first in line and its grantee) and nowhere else, so a task costs O(k), not O(N)
  (`placement`).
- Claims are ordered by (epoch, HRW score of the owner for this task). The HRW score depends
  only on the task id and the owner id, not on anyone's view, so two claims always compare the
  same way everywhere.
- The task's primary for epoch 1 is the live member able to run it (its gossiped roles) with
  the highest HRW score. With a free slot it claims at once; a full primary hands its turn to
  the first standby with a free slot, with a durable grant, and nobody else claims without the
  primary's grant (`claim_rule`, `grants`). Conflicting grants resolve to the grantee ranked
  first by HRW.
- Takeover: only when the claim's owner is dead (or left) by this peer's own failure detector
  (`confirmed_down`; a death declaration from another peer alone is not enough), and only with
  the signed grant of the task's arbiter (first live member of its home, the top k by HRW over
  every known member), which every receiver checks, does a peer claim epoch + 1. The epoch is
  the fencing token (decision 25).
- A keyed task's id is its key in the scope of its parent, so the same key names the same task
  at every peer (`idempotency`).
- Suspension and self-fencing (`execution`): a suspended execution holds no slot but stays
  running for every other rule; an executing owner that sees a greater claim, an accepted
  result other than its own, a cancel, or its own isolation from every peer, cancels its
  execution.
- The accepted result is the completed result whose claim ranks highest; a change of it is a
  "flip" and is counted. Objects that skip an epoch, or whose signature fails, are dropped and
  counted; early ones are kept aside until what they build on arrives (`merge`).
- Anti-entropy by shard digests, replica sync, audience repair, relay and a joining peer's
  pull bring lost objects back (`repair`, decision 31).
- Retention: a final task tree is compacted to tombstones `retention` after its last task
  became final; a tombstone dominates every merge (late objects are dropped and counted) and is
  forgotten after a grace period (`retention`, `tombstone`).

Modules: `messages` (wire messages, signature domains), `state` (the per-task CRDT, the order of
claims), `placement` (replica sets, audiences, candidate order), `claim_rule` (the pure claim
rule), `idempotency` (keyed ids, conflicting specs), `core` (shared state and helpers),
`repair`, `retention` and `tombstone`, `merge`, `grants`, `execution`, `listing` (pages of a
network listing), and `plane` (`Tasks`, assembled from them). This package's face imports
nothing, so that `protocol.codec` and `protocol.wire` can import `messages` without loading the
rules (which use the codec).
"""
