"""gpufleet on a Ray cluster: the ``cluster=`` argument of ``run``, ``GPUExecutor``, ``spawn`` and
``Pipeline.gpu``, ``gpufleet run --cluster`` and ``gpufleet info --cluster``. Ray (the ``ray`` extra)
is imported by this package only, and only when a ``cluster=`` is given (Note [Optional extras]).

Note [Cluster runs]
~~~~~~~~~~~~~~~~~~~
``gpufleet.run(tasks, cluster=...)`` splits the dispatcher in two (_driver.py, _agent.py):

- The **driver** is the caller's process. It keeps everything a run owns: the lazy task stream, the
  queue, the SQLite journal (resume works as locally), output collision claims, retries with
  backoff, quarantine, the halt condition, the callbacks, the progress display and the report.
- On every node with GPUs one **agent**: a Ray actor holding all of that node's GPUs as Ray
  resources, pinned to the node (NodeAffinitySchedulingStrategy, not soft), which runs the C++
  dispatcher there with an open input (Note [Open input] in csrc/dispatch/scheduler.cpp). So process
  groups, the kill sequence, timeouts, atomic outputs, memory-aware admission and the supervisor that
  leaves no orphan (Note [No process outlives the dispatcher]) work on every node as on one machine.
  An agent runs what it is given once (no retries, no quarantine of its own: the driver decides).

Feeding (Note [Feeding the nodes]) is the driver's: it models every GPU of the cluster (slots in
use, the memory its tasks declared, the last free-memory sample its agent sent) and sends a task
to a node only where it can start now, to the least loaded node, naming the GPU it planned (the
agent's dispatcher prefers it, and its own admission has the last word). Tasks that need no memory
may also wait at an agent, one per slot, so that a short task's successor starts without a round
trip to the driver; an agent hands such a task to its dispatcher only when a slot is free, and the
driver takes waiting tasks back for an idle node when its own queue has nothing for it. No GPU
idles while a task that fits it waits anywhere.

Faults: a node whose agent dies (its raylet or process killed, the node gone) fails the driver's
call to it at once (Ray's ActorDiedError); every task it held goes back to the driver's queue, a
running one as a new attempt recorded in the journal ("lost with its node"), which does not use one
of the task's ``retries``; a task whose outputs were renamed into place after its attempt started
counts as succeeded (Note [Re-runs after a crash]). A task that was running on three nodes that
died fails (it may be what kills them). When no node is left the run ends and says so. The driver's
own death ends the agents (Ray ends the actors of a dead owner) and with them, through their
supervisors, every task; ``resume=True`` with the journal then runs what had not succeeded.
Ctrl-C drains (agents start nothing new, running tasks finish) and a second Ctrl-C cancels (the
kill sequence on every node), as locally.

Records name their node (``TaskRecord.node``), devices are ``"<node>/cuda:N"`` and the journal's
device column says the same (Note [Reports by node] in _dispatch_report.py). A task's
CUDA_VISIBLE_DEVICES names a GPU of its own node, and ``GPUFLEET_NODE`` names the node.
"""
