"""Rules for a site of many nodes, as pure objects the daemon and the fleet simulator share.

* ``identity``: node id = hash of the node key, proven on each connection;
* ``admission``: which connections get in, per-address caps, bans;
* ``view``: the partial view -- which few peers a node keeps links to;
* ``swarm`` (with ``bitfield``): who offers which blobs of a release, what to
  ask whom, super-seeding by the first holder.

Gossip of manifests (``protocol.gossip``) and the wire (``protocol.session``)
are the other two objects a fleet simulator drives.
"""
