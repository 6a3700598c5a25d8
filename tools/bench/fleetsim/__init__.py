"""A fleet simulator: thousands of p2pupd nodes on a virtual clock, one process.

Each simulated node runs the project's own policy objects -- ``Session`` and
``wire`` for every byte on every connection, ``PeerView`` (protocol/fleet/view.py),
``Admission`` (protocol/fleet/admission.py), ``Gossip`` and ``ReleaseSwarm``
(protocol/fleet/swarm.py) -- and ``node.SimNode`` carries out their actions the
way the daemon's trio services do. What is modelled rather than run:

* links (``net``): per node an uplink and a downlink of a given rate and a
  one-way latency; frames are serialised on the sender's uplink (one FIFO
  per node) and the receiver's downlink; TCP/IP/Ethernet headers and ACKs,
  connection set-up and teardown, and TCP keepalive probes on idle links
  are counted in bytes;
* mDNS (``mdns``): queries, answers and registrations as multicast or
  unicast packets with their sizes; every node receives every multicast
  packet, which is what makes mDNS grow with N;
* CPU: manifest verification and blob handling as fixed delays.

``run.simulate`` runs one scenario (cold boot, one release from one seed,
an idle period, a node joining the full site) and returns the figures
``tools/bench/fleet.py`` prints.
"""
