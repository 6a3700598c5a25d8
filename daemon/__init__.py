"""p2pupd.daemon: the I/O shell around p2pupd.protocol, in rooms.

The layout is the map. Each folder is a room with one job; arrows point down
this list, so a room imports only itself and the rooms below it (the table
is enforced by tests/unit/test_layering.py, with no import cycle anywhere):

    api.py      the one door for tools/: routes a command to a running daemon
                (ctl.py, the control socket's client) or calls ops
    service/    the trio daemon: node service, overlay (the partial view),
                gossip, offers and fetch (the swarm), lifecycle (the one
                coordinator above gossip and fetch), rollout/ (this node's
                report, the site view, the apply gate, report gossip), serving,
                site gate and collection, control socket, auto-import,
                metrics, app wiring
    ops.py      node operations on an open, locked node (init, import, apply,
                rollback, recover, status, history, gc, fsck, config, request)
    bundles/    USB sticks: read (bounded, untrusted), verify, import, watch,
                site requests and a node's releases as an export source
    apply/      making a version live: engine, plan, transaction + journal and
                the recovery table, the three target kinds, health checks,
                hooks, gc and fsck
    stage/      building a release's tree beside its target: stager, file
                builder, in-place rewrite of large files, binary deltas,
                recycling, stat cache, cheap staging file ops
    state/      the state dir and node config, the open node, trusted roots and
                releases, the gate every release enters a node through, the
                node's own rollout report
    store/      bytes named by sha256: packs and loose blobs, the one spool of incoming blobs,
                state-dir members opened without following links
    ground      errors.py, events.py (log lines), offload.py (blocking work off
                the event loop), fsutil.py (real system calls), config.py
                (the daemon's options and config file)

net/ (transport, peers, dialer, discovery, ranged transfers, rate limit) talks
to peers and holds no node policy: it sees only store/ and the ground, and
reaches the node service through small ``typing.Protocol`` seams.
"""
