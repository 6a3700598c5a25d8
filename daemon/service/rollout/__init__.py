"""The site's rollouts in the daemon: the pure rules of ``protocol.rollout``, fed and obeyed.

``service`` keeps this node's signed report, the site view (report table and
release ledger) and the apply gate; ``gossip`` carries reports and operator
actions over the peer links (wire feature "report": pushed on, pulled by
digest, rate-limited per peer); ``members`` says whose documents count where
the node belongs to a site (credentials bound to node ids and keys).
"""
