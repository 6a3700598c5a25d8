"""One node's open state: paths, config, trust, releases and blob store together."""

from __future__ import annotations

from pathlib import Path

from p2pupd.daemon.fsutil import FileLock
from p2pupd.daemon.state.membership import MembershipStore
from p2pupd.daemon.state.statedir import NodeConfig, StateDir
from p2pupd.daemon.state.trusted import CarriedStore, ReleaseStore, TrustStore
from p2pupd.daemon.store.packstore import PackStore
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import TrustChain, TrustedRoot


class Node:
    """Everything a command needs to act on one state directory.

    Mutating commands hold ``lock`` (an flock on STATE/lock) for their whole
    run, so the CLI and a daemon never interleave changes.
    """

    def __init__(self, root: Path) -> None:
        self.state = StateDir(root)
        self.config: NodeConfig = self.state.read_config()
        self.store = PackStore(root)
        self.trust_store = TrustStore(self.state)
        self.releases = ReleaseStore(self.state)
        self.carried = CarriedStore(self.state)  # other platforms' variants (carried.py)
        self.lock = FileLock(self.state.lock_path)
        self.membership = MembershipStore(self.state)

    @property
    def root(self) -> Path:
        return self.state.root

    def trusted_root(self) -> TrustedRoot:
        return self.trust_store.load()

    def trust_chain(self) -> TrustChain:
        """Every root this node accepted: what its stored releases verify under."""
        return self.trust_store.chain()

    def manifest(self, component: str, serial: int) -> Manifest:
        return self.releases.get(self.trust_chain(), component, serial)[0]
