"""Crash-proof apply, proven by killing it: SIGKILL at every journal step and at
random moments, for the three target kinds, then check that the target is
exactly the old or the new tree (contents, modes, mtimes, symlinks, empty
dirs), that the recorded state agrees with it, that nothing is left beside the
target but kept versions, that the store passes fsck, and that the next apply
succeeds.

Real processes (children forked from the test, running ``_apply_driver.py``;
and the ``p2pupd`` CLI), real filesystem, real SIGKILL. A forked driver has
everything imported already, so every random kill lands in the engine, not
in interpreter start-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import selectors
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _apply_driver import serve
from _mounts import Ext4, ext4

from p2pupd.daemon import api
from p2pupd.daemon.apply.transaction import CRASH_POINTS, Journal
from p2pupd.daemon.state.statedir import StateDir
from p2pupd.daemon.store.packstore import PackStore
from p2pupd.tools.cli import main

KINDS = ("dir", "symlink", "file")
Snapshot = dict[str, tuple[Any, ...]]


def cli(*args: object) -> None:
    assert main([str(a) for a in args]) == 0, args


def write_tree(root: Path, files: dict[str, tuple[bytes, int, int]], links: dict[str, str],
               empty: tuple[str, ...]) -> Path:  # fmt: skip
    for rel, (data, mode, mtime) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)
        os.utime(p, (mtime, mtime))
    for rel, target in links.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / rel)
    for d in empty:
        (root / d).mkdir(parents=True, exist_ok=True)
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (1_600_000_000, 1_600_000_000))
    return root


def snapshot(path: Path) -> Snapshot:
    """Everything the tests compare: kind, mode, mtime, sha256 or link text, per entry."""
    if path.is_symlink() and not path.is_dir():
        return {"": ("dangling", os.readlink(path))}
    path = Path(os.path.realpath(path))
    if path.is_file():
        st = path.stat()
        return {"": ("file", st.st_mode & 0o7777, int(st.st_mtime), _sha(path))}
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, int(st.st_mtime))
            else:
                out[rel] = ("file", st.st_mode & 0o7777, int(st.st_mtime), _sha(p))
    return out


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@dataclass
class Releases:
    repo: Path
    bundle: Path
    trees: dict[str, dict[int, Snapshot]] = field(default_factory=dict)  # kind -> serial -> tree


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    base = tmp_path_factory.mktemp("releases")
    rnd = random.Random(7)
    cli("keygen", base / "k")
    cli("repo", "init", base / "repo", "--root-key", base / "k", "--release-key", base / "k")
    small = {f"lib/m{i:02}.so": (rnd.randbytes(rnd.randrange(1, 9000)), 0o644, 1_600_000_100 + i)
             for i in range(24)}  # fmt: skip
    # Content two releases share at different paths and the third lacks: with
    # retain 1, whichever is kept (and so recycled into the next stage) holds
    # the only trusted copy of something the release being staged needs.
    shared = {
        (k, n): rnd.randbytes(300 + 10 * k + n) for k in (1, 2, 3) for n in (1, 2, 3) if k != n
    }

    def pairs(i: int) -> dict[str, tuple[bytes, int, int]]:
        out = {}
        for (k, n), data in shared.items():
            if i in (k, n):
                out[f"{'a' if i == k else 'b'}/{k}{n}.dat"] = (data, 0o644, 1_600_000_400)
        return out

    big = rnd.randbytes(1_300_000)
    v1 = write_tree(base / "v1", {
        **small, **pairs(1),
        "bin/tool": (b"#!/bin/sh\necho v1\n", 0o755, 1_600_000_001),
        "etc/conf": (b"a=1\n", 0o600, 1_600_000_002),
        "data/big.bin": (big, 0o644, 1_600_000_003),
        "gone.txt": (b"removed in v2\n", 0o644, 1_600_000_004),
    }, {"current-conf": "etc/conf", "abs-link": "/usr/lib/libc.so"}, ("var/empty",))  # fmt: skip
    small2 = dict(small)
    small2["lib/m03.so"] = (b"changed", 0o644, 1_600_000_200)
    small2["lib/m07.so"] = (small["lib/m07.so"][0], 0o600, small["lib/m07.so"][2])
    v2 = write_tree(base / "v2", {
        **small2, **pairs(2),
        "bin/tool": (b"#!/bin/sh\necho v2\n", 0o750, 1_600_000_011),
        "etc/conf": (b"a=2\n", 0o600, 1_600_000_012),
        "data/big.bin": (big[:5000] + b"patched" + big[5007:], 0o644, 1_600_000_013),
        "renamed/conf.bak": (b"a=1\n", 0o640, 1_600_000_014),
    }, {"current-conf": "renamed/conf.bak"}, ("var/empty", "var/new-empty"))  # fmt: skip
    v3 = write_tree(base / "v3", {
        **small2, **pairs(3),
        "lib/m05.so": (b"v3 only", 0o755, 1_600_000_300),
        "bin/tool": (b"#!/bin/sh\necho v3\n", 0o750, 1_600_000_031),
        "etc/conf": (b"a=2\n", 0o644, 1_600_000_012),
        "data/big.bin": (big[:900_000] + b"v3" + big[900_002:], 0o644, 1_600_000_033),
    }, {"current-conf": "etc/conf", "var/empty": "lib"}, ("renamed/conf.bak",))  # fmt: skip
    image = rnd.randbytes(2_200_000)
    images = [image]
    for offsets in ((10, 900_000, 2_100_000), (500, 1_800_000)):
        nxt = bytearray(images[-1])
        for off in offsets:
            nxt[off : off + 64] = rnd.randbytes(64)
        images.append(bytes(nxt))
    imgs = [
        write_tree(
            base / f"i{k}", {"disk.img": (data, 0o640 - 0o40 * k, 1_600_000_020 + k)}, {}, ()
        )
        for k, data in enumerate(images, start=1)
    ]
    for comp, trees in (("app", (v1, v2, v3)), ("img", imgs)):
        for k, src in enumerate(trees, start=1):
            cli("publish", base / "repo", comp, f"{k}.0", src)
    cli("export", base / "repo", base / "usb", "--history", "3")
    rel = Releases(base / "repo", base / "usb")
    for kind in KINDS:
        srcs = [i / "disk.img" for i in imgs] if kind == "file" else [v1, v2, v3]
        rel.trees[kind] = {k: snapshot(src) for k, src in enumerate(srcs, start=1)}
    return rel


@dataclass
class Node:
    kind: str
    state: Path
    target: Path
    trees: dict[int, Snapshot]

    @property
    def component(self) -> str:
        return "img" if self.kind == "file" else "app"

    def journal(self) -> Journal:
        return Journal(self.state / "journal" / f"{self.component}.log")

    def installed(self) -> tuple[int | None, tuple[int, ...], set[int]]:
        st = StateDir(self.state).read_state(self.component)
        return st.installed, st.kept, set(st.bad)

    def interrupted(self) -> dict[int, int]:
        return dict(StateDir(self.state).read_state(self.component).interrupted)

    def live(self) -> int | None:
        """Which release the target holds right now; fails on anything else."""
        if not self.target.exists() and not self.target.is_symlink():
            return None
        snap = snapshot(self.target)
        for serial, tree in self.trees.items():
            if snap == tree:
                return serial
        raise AssertionError(f"{self.target} is neither release: {sorted(snap)[:8]}")

    def check_consistent(self) -> int | None:
        """After recovery: tree, state, journal, store and the target's neighbours agree."""
        serial = self.live()
        installed, kept, _ = self.installed()
        assert serial == installed
        assert self.journal().open_transaction() is None
        report = PackStore(self.state).fsck(full=True)
        assert report.clean, report
        allowed = {f".{self.target.name}.p2pupd-v{s}" for s in kept}
        if installed is not None:
            allowed.add(self.target.name)
            if self.kind == "symlink":
                allowed.add(f".{self.target.name}.p2pupd-v{installed}")
        beside = set(os.listdir(self.target.parent))
        assert beside == allowed, (beside, allowed)
        return serial


def make_node(
    releases: Releases, base: Path, kind: str, retain: int, state: Path | None = None
) -> Node:
    """A node whose target is under ``base`` and state in ``state`` (default: ``base``)."""
    node = Node(kind, (state or base) / "state",
                base / "srv" / ("disk.img" if kind == "file" else "app"),
                releases.trees[kind])  # fmt: skip
    node.target.parent.mkdir(parents=True)
    cli("init", "--state-dir", node.state, "--trust", releases.repo / "root.msgpack",
        "--component", f"{node.component}={node.target}", "--kind", kind,
        "--retain", retain)  # fmt: skip
    cli("import", releases.bundle, "--state-dir", node.state)
    return node


class Driver:
    """A forked child running ``_apply_driver.serve``: a real process, killed for real."""

    def __init__(self, node: Node) -> None:
        cmd_r, cmd_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.close(cmd_w)
                os.close(rep_r)
                with os.fdopen(cmd_r) as commands, os.fdopen(rep_w, "w") as replies:
                    serve(node.state, node.component, commands, replies)
                code = 0
            finally:
                os._exit(code)
        os.close(cmd_r)
        os.close(rep_w)
        self.pid = pid
        self.commands = os.fdopen(cmd_w, "w")
        self.replies = os.fdopen(rep_r)
        self.status: int | None = None
        assert self.line() == "ready\n"

    def line(self, timeout: float = 60.0) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.replies, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.kill()
            raise AssertionError("driver did not answer in time")
        return self.replies.readline()

    def send(self, cmd: str) -> None:
        self.commands.write(cmd + "\n")
        self.commands.flush()

    def call(self, cmd: str) -> dict[str, Any]:
        self.send(cmd)
        text = self.line()
        if not text:
            raise AssertionError(f"driver died: {self.wait()}")
        reply: dict[str, Any] = json.loads(text)
        return reply

    def wait(self) -> int:
        """Reap the child; return its exit code, or minus the signal that killed it."""
        if self.status is None:
            _, status = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                self.commands.close()
        return self.status

    def kill(self) -> str:
        """SIGKILL; return what it had written but we had not read."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait()
        rest = self.replies.read() if not self.replies.closed else ""
        self.replies.close()
        return rest


@pytest.fixture
def drivers() -> Iterator[list[Driver]]:
    live: list[Driver] = []
    yield live
    for d in live:
        d.kill()


# What a crash at each point leaves after recovery, per scenario: the serial
# live afterwards, or ``INTERRUPTED`` (the old version put back, the
# interruption counted against the release, which stays eligible) or ``BAD``
# (put back, the release marked bad: a check failed). Points a scenario never
# reaches let it finish (``finished``).
INTERRUPTED, BAD = -1, -2


@dataclass(frozen=True)
class Scenario:
    start: int  # live before
    op: str
    to: int  # what the op makes live
    outcomes: dict[str, int]
    finished: int


BEFORE_SWAP = ("begin", "prepare", "staged")
SCENARIOS = {
    "apply": Scenario(
        1,
        "apply 2 ok",
        2,
        {
            **dict.fromkeys(BEFORE_SWAP, 1),
            **dict.fromkeys(("swap", "swapped", "health"), INTERRUPTED),
            **dict.fromkeys(("commit", "commit-state", "done"), 2),
        },
        2,
    ),
    "fail": Scenario(
        1,
        "apply 2 fail",
        2,
        {
            **dict.fromkeys(BEFORE_SWAP, 1),
            **dict.fromkeys(("swap", "swapped", "health"), INTERRUPTED),
            **dict.fromkeys(("undo", "undo-swap"), BAD),
        },
        BAD,
    ),
    # No health check on a rollback: an interruption is not a failure.
    "rollback": Scenario(
        2,
        "rollback",
        1,
        {
            **dict.fromkeys((*BEFORE_SWAP, "swap", "swapped"), 2),
            **dict.fromkeys(("commit", "commit-state", "done"), 1),
        },
        1,
    ),
}


def setup(d: Driver, node: Node, sc: Scenario) -> None:
    """Make ``sc.start`` live, with ``sc.to`` kept for a rollback and not kept for an apply.

    Through ``d``, which must not be armed to crash. With ``retain`` 1 an
    apply then always recycles the one kept version into its stage.
    """

    def go(serial: int) -> None:
        r = d.call(f"apply {serial} ok")
        assert r["ok"], r

    other = ({1, 2, 3} - {sc.start, sc.to}).pop()
    kept = node.installed()[1]
    if sc.op == "rollback":
        if sc.to not in kept:
            go(sc.to)
        go(sc.start)
    else:
        if sc.to in kept:
            go(other)
        if node.installed()[0] != sc.start:
            go(sc.start)
    assert node.installed()[0] == sc.start


@pytest.mark.parametrize("retain", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_at_every_journal_step(
    releases: Releases, tmp_path: Path, drivers: list[Driver], kind: str, retain: int
) -> None:
    node = make_node(releases, tmp_path, kind, retain)
    drivers.append(Driver(node))
    crashed = 0
    for name, sc in SCENARIOS.items():
        for point in CRASH_POINTS:
            d = drivers[-1]
            drivers.append(Driver(node))
            assert d.call("recover")["ok"]
            assert d.call("forget")["ok"]  # each point counts its own interruption
            setup(d, node, sc)
            try:
                node.check_consistent()
            except AssertionError as exc:
                raise AssertionError(f"{name} {point}: setup: {exc}") from None
            d.call(f"crash {point}")
            expect = sc.outcomes.get(point)
            d.send(sc.op)
            if expect is None:  # not reached: the op completes
                reply = json.loads(d.line())
                assert reply["ok"] == (sc.finished > 0), reply
                d.kill()
                expect = sc.finished
            else:
                assert d.wait() == -signal.SIGKILL, f"{name} did not reach {point}"
                crashed += 1
                assert node.live() in (1, 2, 3)  # before recovery, too: never a mix
            assert drivers[-1].call("recover")["ok"]
            try:
                serial = node.check_consistent()
            except AssertionError as exc:
                raise AssertionError(f"after {name} crashed at {point}: {exc}") from None
            assert serial == (expect if expect > 0 else sc.start), (name, point)
            assert (sc.to in node.installed()[2]) == (expect == BAD), (name, point)
            counted = expect == INTERRUPTED and sc.op != "rollback"
            assert node.interrupted() == ({sc.to: 1} if counted else {}), (name, point)
    assert crashed == sum(len(sc.outcomes) for sc in SCENARIOS.values())
    # And the next apply succeeds.
    assert drivers[-1].call("apply 3 ok")["ok"]
    assert node.check_consistent() == 3


RANDOM_KILLS = {"dir": 110, "file": 110, "symlink": 60}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_at_random_moments(
    releases: Releases, tmp_path: Path, drivers: list[Driver], kind: str
) -> None:
    """Cycle 1 -> 2 -> 3 -> 1 with retain 1 (so every apply recycles the kept version
    into its stage), with some failing health checks and rollbacks, killing at
    random moments of the operation or of the recovery after it."""
    rnd = random.Random(f"crash-{kind}")
    node = make_node(releases, tmp_path, kind, retain=1)
    drivers.append(Driver(node))
    durations: dict[str, list[float]] = {}
    phases: dict[str, int] = {}  # last journal step at each kill
    mid_op = mid_recovery = 0
    deadline = time.monotonic() + 90

    def covered() -> bool:  # enough kills, and some around the short commit window
        return mid_op >= RANDOM_KILLS[kind] and {"begin", "commit"} <= set(phases)

    while not covered():
        assert time.monotonic() < deadline, f"only {mid_op} kills landed in time: {phases}"
        d = drivers[-1]
        drivers.append(Driver(node))
        if rnd.random() < 0.15:  # sometimes kill recovery itself
            d.send("recover")
            time.sleep(rnd.uniform(0, 0.01))
            mid_recovery += not d.kill().strip()
            assert node.live() in (None, 1, 2, 3)
            continue
        assert d.call("recover")["ok"]
        serial = node.check_consistent()
        _, kept, _ = node.installed()
        x = rnd.random()
        if serial is not None and x < 0.2 and any(k < serial for k in kept):
            op = "rollback"
        else:
            op = f"apply {(serial or 0) % 3 + 1} {'fail' if x > 0.85 else 'ok'}"
        est = statistics.median(durations.get(op.split()[0], [0.05]))
        d.send(op)
        # Staging takes most of an apply: half the kills aim at its last part
        # (swap, checks, commit), the rest anywhere.
        time.sleep(est * (rnd.uniform(0.6, 1.2) if rnd.random() < 0.5 else rnd.uniform(0, 1.3)))
        rest = d.kill()
        if rest.strip():  # it had finished
            reply = json.loads(rest.splitlines()[0])
            durations.setdefault(op.split()[0], []).append(reply["seconds"])
        else:
            mid_op += 1
            tx = node.journal().open_transaction()
            step = tx[-1]["step"] if tx else "no transaction"
            phases[step] = phases.get(step, 0) + 1
        assert node.live() in (None, 1, 2, 3)  # at the kill: one release whole, never a mix
    d = drivers[-1]
    assert d.call("recover")["ok"]
    node.check_consistent()
    assert d.call("apply 3 ok")["ok"]
    assert node.check_consistent() == 3
    assert mid_op >= RANDOM_KILLS[kind]
    print(f"{kind}: kills by last journal step {phases}, {mid_recovery} during recovery")
    # Kills landed in the stage and around the commit, and in more places
    # (every point is also hit deterministically by the test above).
    assert {"begin", "commit"} <= set(phases) and len(phases) >= 4, phases


def test_cli_crash_then_any_command_recovers(releases: Releases, tmp_path: Path) -> None:
    """Through the real CLI: `p2pupd apply` SIGKILLed between swap and commit; the
    next `status` recovers (the old version back, the interruption counted), and
    the next `apply` retries the same release."""
    node = make_node(releases, tmp_path, "dir", retain=2)

    def p2pupd(*args: object, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "p2pupd.tools.cli", *map(str, args)],
            capture_output=True, text=True, timeout=120, env={**os.environ, **env}, check=False,
        )  # fmt: skip

    r = p2pupd("apply", "app", "--state-dir", node.state, "--version", "1.0")
    assert r.returncode == 0, r.stderr
    r = p2pupd("apply", "app", "--state-dir", node.state, P2PUPD_CRASH_AT="swapped")
    assert r.returncode == -signal.SIGKILL
    assert node.live() == 3  # swapped in, not committed
    assert node.installed()[0] == 1
    r = p2pupd("status", "--state-dir", node.state, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["recovered"] == ["app: rolled back serial 3 (interrupted between swap and commit)"]
    app = doc["components"]["app"]
    assert app["version"] == "1.0" and app["transaction"] is None
    # An interruption is not a verdict on the release: counted, and retried.
    assert app["bad"] == {} and app["interrupted"] == {"3": 1}
    assert node.check_consistent() == 1
    hist = json.loads(p2pupd("history", "app", "--state-dir", node.state, "--json").stdout)
    last = hist["history"][-1]
    assert (last["event"], last["serial"]) == ("interrupted", 3)
    assert last["detail"] == "interrupted between swap and commit (1 of 3)"
    r = p2pupd("apply", "app", "--state-dir", node.state)
    assert r.returncode == 0 and r.stdout == "app 3.0 is live\n", r.stderr
    assert node.check_consistent() == 3
    assert node.interrupted() == {}
    r = p2pupd("fsck", "--state-dir", node.state, "--full")
    assert r.returncode == 0, r.stdout


# -- faults other than SIGKILL: a full disk, a read-only target, a power cut ---------------

FAULTS = ("full", "ro", "shutdown")
# Each journal step once per fault kind, with an operation that reaches it: an
# update (retain 1: the kept version, which shares content with the release,
# is recycled into the stage), a rollback to a kept version someone touched, or
# an apply whose health check fails (the only one that reaches ``undo``).
# The second fault kind swaps update and rollback where both reach the step;
# target kinds rotate, so each step meets every kind across the three faults.
STEP_OPS = {
    "begin": "rollback", "prepare": "update", "staged": "rollback", "swap": "update",
    "swapped": "rollback", "health": "update", "undo": "fail", "undo-swap": "fail",
    "commit": "rollback", "commit-state": "update", "done": "rollback",
}  # fmt: skip
assert tuple(STEP_OPS) == CRASH_POINTS


def op_for(fault: str, step: str) -> str:
    op = STEP_OPS[step]
    if fault == "ro" and step != "health":
        op = {"update": "rollback", "rollback": "update"}.get(op, op)
    return op


def arrange(d: Driver, node: Node, op: str) -> tuple[int, int]:
    """Bring the node (retain 1) to a live version L with one kept K that ``op`` needs:
    K < L for a rollback, any K for an update; return (L, what ``op`` makes live)."""
    for _ in range(4):
        live, kept, _ = node.installed()
        k = kept[0] if kept else None
        if live is not None and k is not None and (k < live if op == "rollback" else k != live):
            to = k if op == "rollback" else ({1, 2, 3} - {live, k}).pop()
            return live, to
        if live is None:
            nxt = 1
        elif op == "rollback" and k is not None:
            nxt = k  # k > live: make k live, live becomes the older kept one
        else:
            nxt = max({1, 2, 3} - {live})
        assert d.call(f"apply {nxt} ok")["ok"]
    raise AssertionError(f"cannot arrange {op} on {node.installed()}")


def command(op: str, to: int) -> str:
    return {"rollback": "rollback", "update": f"apply {to} ok", "fail": f"apply {to} fail"}[op]


def touch_kept(node: Node, serial: int) -> None:
    kept = node.target.parent / f".{node.target.name}.p2pupd-v{serial}"
    os.utime(kept if node.kind == "file" else kept / "lib/m00.so")


def clear_fault(fs: Ext4, fault: str) -> None:
    if fault == "full":
        fs.free()
    elif fault == "ro":
        assert fs.set_readonly(False)
    else:
        fs.remount()  # the journal replays: what was durable at the cut


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_at_every_journal_step(
    releases: Releases, tmp_path: Path, drivers: list[Driver], fault: str
) -> None:
    """At every journal step: the disk fills (state and target on it), the target's
    filesystem turns read-only (state elsewhere), or the power is cut
    (``EXT4_IOC_SHUTDOWN`` without a journal flush, then the process dies, and the
    filesystem is mounted again). Then: the target is byte-exactly the old or the
    new version; a failed command's exit code says which (1: old, 4: new); a
    read-only ``status`` works while the fault lasts and shows any disagreement
    as an open transaction; once the fault is gone, recovery leaves state and
    target agreeing, ``fsck --full`` agrees, and re-running the same command
    reaches the new version."""
    with ext4(tmp_path) as fs:
        nodes = {
            kind: make_node(releases, fs.where / kind, kind, retain=1,
                            state=tmp_path / kind if fault == "ro" else None)
            for kind in KINDS
        }  # fmt: skip
        fired = 0
        outcomes: dict[str, list[str]] = {}  # what each fault left, by step
        for i, step in enumerate(CRASH_POINTS):
            node = nodes[KINDS[(i + FAULTS.index(fault)) % len(KINDS)]]
            op = op_for(fault, step)
            where = f"{fault} at {step}, {op} of {node.kind}"
            d = Driver(node)
            drivers.append(d)
            for verb in ("recover", "forget"):
                reply = d.call(verb)
                assert reply["ok"], f"{where}: {verb} before the fault: {reply}"
            start, to = arrange(d, node, op)
            if op == "rollback":
                touch_kept(node, to)
            assert d.call(f"fault {fault} {step} {fs.where}")["ok"]
            d.send(command(op, to))
            text = d.line()
            if not text:  # the power was cut
                assert fault == "shutdown" and d.wait() == -signal.SIGKILL, where
                fired += 1
                outcome = "cut"
            else:
                reply = json.loads(text)
                assert reply["fired"], f"{where}: the fault did not happen"
                fired += 1
                live = node.live()
                assert live in (start, to), where
                if reply["ok"]:
                    assert live == to and op != "fail", (where, reply)
                    outcome = "exit 0"
                elif reply["exit"] == 1:
                    assert live == start, (where, reply)  # exit 1: the old version is live
                    outcome = "exit 1"
                else:
                    assert reply["exit"] == 4 and live == to, (where, reply)
                    outcome = "exit 4"
                doc = api.status(node.state)  # never needs to write
                app = doc["components"][node.component]
                if app["serial"] != live:
                    assert app["transaction"] is not None, (where, app)
                d.kill()
            clear_fault(fs, fault)
            assert node.live() in (start, to), where  # before recovery too: never a mix
            before = (node.installed(), node.journal().last_transaction())
            d = Driver(node)
            drivers.append(d)
            recovered = d.call("recover")
            assert recovered["ok"], where
            try:
                serial = node.check_consistent()
            except AssertionError as exc:
                raise AssertionError(
                    f"{where}: after recovery: {exc}; before it: state {before[0]}, "
                    f"journal {before[1]}; it did {recovered}"
                ) from None
            assert serial in (start, to), where
            outcome += ", recovered to " + ("new" if serial == to else "old")
            outcomes.setdefault(outcome, []).append(step)
            report = api.fsck(node.state, full=True)
            assert report["ok"], (where, report)
            assert report["components"][node.component]["serial"] == serial, where
            if serial != to:  # the same command again (with a passing check)
                reply = d.call(command("update" if op == "fail" else op, to))
                assert reply["ok"], (where, reply)
                assert node.check_consistent() == to, where
            d.kill()
        assert fired == len(CRASH_POINTS)
        print(f"{fault}: {outcomes}")


def test_status_gc_and_apply_on_a_full_state_disk(releases: Releases, tmp_path: Path) -> None:
    """Every block in use on the filesystem holding state and target: `status` and
    `gc` still run (the lock's pid is best effort), an apply fails with exit 1 and
    the old version live, and works once there is room."""
    with ext4(tmp_path) as fs:
        node = make_node(releases, fs.where / "n", "symlink", retain=1)
        cli("apply", "app", "--state-dir", node.state, "--version", "1.0")
        cli("apply", "app", "--state-dir", node.state, "--version", "2.0")
        (node.state / "lock").unlink()  # a lock file made on the full disk: no block yet
        fs.fill()
        assert main(["status", "--state-dir", str(node.state)]) == 0
        assert main(["gc", "--state-dir", str(node.state)]) == 0
        assert main(["apply", "app", "--state-dir", str(node.state), "--version", "3.0"]) == 1
        assert node.live() == 2
        fs.free()
        cli("apply", "app", "--state-dir", node.state, "--version", "3.0")
        assert node.check_consistent() == 3
