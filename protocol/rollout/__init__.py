"""Fleet-wide rollouts without a server: node reports, waves, the brake (pure).

Every node gossips a signed report of what it runs (``report``); each holds
the newest report of every node of its site (``table``), remembers what the
rollout of each release has seen -- failures, operator halts, resumes, skipped
waves (``ledger``, fed by signed ``actions``; who may sign which is ``site``)
-- and decides *for itself* whether to apply a release now (``decide``), from
the policy the publisher signed into the release (``policy``) and its place in
that release's waves (``waves``). The safety properties are stated in
``decide``. Nothing here does I/O or reads a clock: ``now`` (monotonic) and
``wall`` (seconds) are passed in.
"""
