"""Elastic gossip training: survivors go on when a rank dies, and a replacement joins from a
live peer, without a restart and without a checkpoint.

    store = torch.distributed.TCPStore(host, port, is_master=False)   # outlives the workers
    elastic = ElasticGossip(module, store, world_size=4, timeout=timedelta(seconds=10))
    optimizer = torch.optim.SGD(elastic.model.parameters(), lr=0.05)
    sampler = GossipShuffleSampler(train_set)
    elastic.start(optimizer, sampler=sampler)          # a replacement gets its replica here
    batches = elastic.batches(DataLoader(train_set, batch_size=32, sampler=sampler))
    while elastic.step < steps:                         # bounded by steps, not epochs
        x, y = next(batches)
        loss_fn(elastic.model(x), y).backward()
        optimizer.step()                                # a membership change happens in here
        optimizer.zero_grad()
    elastic.model.average_replicas()
    elastic.close()

**Mechanism: torch's own pieces.** Membership is agreed through a ``torch.distributed`` store
(a ``TCPStore`` hosted by a process that outlives the workers: the ``gossipgrad train
--elastic`` launcher, or ``python -m gossipgrad.elastic store`` on a machine of its own), and
each membership *generation* ``n`` gossips in a process group of its own, made afresh with
``init_process_group(backend, store=PrefixStore(f"gossipgrad/elastic/g{n}/pg", store), ...)``
(gloo or NCCL). No transport or rendezvous of our own; torchft's Manager and Lighthouse would
do the same job with a per-step quorum, at the cost of a Rust server and a heavy dependency.

**Failure detection.** A partner that dies (SIGKILL, machine gone) breaks its TCP
connections: the ranks exchanging with it get a ``PeerError`` at once. A partner that stops
answering (SIGSTOP, a hung host) is named after the exchange timeout (``timeout``: keep it
short, 10-30 s). The rank that sees the failure asks for a new generation in the store; every
rank checks that key once per step (one store round trip, inside ``optimizer.step()``), and a
rank blocked on a receive from one that moved on gets a connection error, since a member
destroys its groups when it leaves a generation. See ``gossipgrad.elastic._membership`` for
how a generation forms (``settle``: how long it waits for more members after the last one
came).

**What a change does.**

- *Steps.* Training resumes at the fewest steps any surviving member had ended; a member one
  step ahead takes its last step again (no member loses a step). The schedule is re-planned
  over the new ranks (every schedule but ``hypercube`` plans any size).
- *The replicas' mean.* The exchanges in flight are dropped unmixed on every member, so the
  survivors' replicas are those they held when the change began, and their mean is kept from
  then on by the new group's gossip exactly as before. The departed replica's contribution is
  lost: the mean over survivors differs from the mean over all ranks by about the consensus
  distance (the departed replica's own deviation from the mean, divided by the survivors'
  number), which is small once the replicas have mixed; what the departed rank learnt in its
  last steps reaches the survivors only through the mixes it made before. For accuracy, this
  acts like dropping one worker's last few gradients.
- *Data.* A ``GossipShuffleSampler`` given to ``start`` is re-sharded over the new members: a
  fresh strided shard each, at the epoch and share of the epoch the lowest rank had reached.
  The departed rank's samples are spread over the survivors (every sample has an owner again);
  the rest of that epoch may visit some samples twice or miss some. ``GossipShuffleDataset``
  (samples that live only on their rank) is not supported: a dead rank's rows are gone.
- *Joins.* A process that comes after the job started (restarted by the launcher, or started
  by hand) registers as a joiner; the members see it at their next step's end and form a new
  generation with it, and the lowest rank sends it the model's ``state_dict``, the optimizer's
  state and each object of ``start(state=...)`` over the new group
  (``send_object_list``): the joiner starts from a bit-identical replica and is in the
  schedule from the next exchange.
- *Gradient tracking, outer steps* restart from zero trackers and the current replica on every
  member, as when wrapping.

**Checkpoints.** ``elastic.save_checkpoint(folder)`` (every member, between steps, at the
same step: a condition on ``elastic.step``, which the members agree on) writes each member's
replica, optimizer state, engine state (``gossip_state()``: the exchange in flight, waited for
and not mixed), sampler position and ``start``'s ``state`` objects, with the generation and the
step, in ``gossipgrad.checkpoint``'s format (atomic; loading runs no code from the files). It
works in any generation: a member lost during the write is a membership change like any other,
after which the survivors write the checkpoint again at the same step. A new job resumes from
it with ``elastic.load_checkpoint(path)`` after ``start`` (every member of its start; a process
that joined a running job has its replica from a peer and does not load). *Exactly* means: on
the number of ranks that saved it, rank ``r`` gets back bit for bit what rank ``r`` saved, so
the job goes on as the saved one would have with the same members (same replicas, same
optimizer states, same exchange in flight, same step and data position); on another number,
every rank starts from the exact mean of the saved replicas, optimizer and engine states (summed
in float64), at the saved step, with the sampler re-sharded at the saved position (the data
order then differs from the saved run's). ``gossipgrad train --elastic --checkpoint-every N``
and ``--resume auto`` use them.

**Measured** (``python benchmarks/elastic.py --seeds 0 1 2 --out
benchmarks/results/elastic.json``, then the same with ``--world 8 --kills 2``: the digits MLP on
loopback gloo, 600 steps paced to 50 ms, exchange timeout 10 s, ``settle`` 1 s; the first kill
at 30% of the steps, the second at 50%, each replacement started 10 s after its kill, forked
from a process that had imported torch already; mean over 3 seeds):

| ranks, kills | steps lost | retaken | s to next step | s to join | accuracy | uninterrupted |
|---|---|---|---|---|---|---|
| 4, 1 | 0 | 1.3 | 1.13 | 0.27 | 0.9750 ± 0.0068 | 0.9722 ± 0.0045 |
| 8, 2 | 0 | 1.3 | 1.21 | 0.50 | 0.9731 ± 0.0047 | 0.9731 ± 0.0047 |

The job without elasticity under the same kill (``python benchmarks/elastic.py --rows restart
--seeds 0 1 2 --out benchmarks/results/elastic.json``: ``gossipgrad train --max-restarts 1
--resume auto --checkpoint-every 50``, torch elastic restarting every worker from the last
checkpoint) loses the 30 steps since that checkpoint (computed again: 1.5 s more at this pace);
its first step after the kill ends 1.08 s after it, and its accuracy, 0.9722 ± 0.0039, is that
of its own uninterrupted runs (the resume is bit-exact).

"s to next step": from the kill to the first step a survivor ends after it, mostly ``settle``
(a generation that lost a member waits that long for more). "s to join": from a replacement's
start to the end of its first step. "Retaken": a survivor one or two steps ahead when the
change came takes those step numbers again, its update kept. Accuracy: the replicas' exact
average on the held-out split, mean ± standard deviation.

Collectives outside the training step (``average_replicas``, ``consensus_distance``) are not
elastic: a rank that fails there raises ``PeerError`` as without elasticity. If the store's
host dies, training goes on with the current members (a warning says so) and a later failure
raises ``MembershipError`` naming both causes.
"""

from __future__ import annotations

from gossipgrad.elastic._membership import MembershipError
from gossipgrad.elastic._session import ElasticGossip, MembershipChange

__all__ = ["ElasticGossip", "MembershipChange", "MembershipError"]
