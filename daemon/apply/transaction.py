"""The journalled transaction that changes a component's live version.

Theory of operation. Every change of the live version, whatever caused it (a
new release, an operator's rollback), is one transaction in the component's
journal (``Journal``, below). It makes version ``to`` live at the target, taking it
from ``src`` (a fresh stage, or a kept version: op ``apply`` or ``switch``)::

    begin ─► [stage] ─► [pre-apply] ─► staged ─► swap ─► swapped ─► [health] ─┬─► commit ─► done
       │                    │                                                 └─► undo ───► done
       └─────── abort ──────┴─► done (nothing was swapped)

Each record is appended and fsynced *before* its step acts. ``staged`` records
the identity of the new version and of the live one (targets.py), and the swap
is one system call, so afterwards the question "did the swap happen?" is
answered by looking at the target, not by trusting a record that a crash may
have cut off. Recovery (``recover``, run at the start of every command and of
the daemon) reads the open transaction and the target's identity and does what
the recovery table says (recovery.py: one entry per pair of what the journal
reached and what the target holds).

A self-update (``swap_and_commit(..., trial=...)``; docs/self-update.md)
tries the new version before the swap::

    ... staged ─► trial ─► (hand over: the daemon restarts into the stage) ─► healthy ─► swap ─► ...

``HandOver`` leaves the transaction open at ``trial``; the restarted daemon,
which inherits the node lock, claims it (``claim_trial``: recovery leaves it
alone), proves itself and ends it with ``finish_trial`` (or records why not
with ``fail_trial``). Anyone who recovers it later holds the lock, so its
trial run is over: recovery.py decides.

So after any crash the target is exactly the old or the new version. The
cleanup after a commit (dropping versions beyond ``retain``, scratch names,
stale cache records) is idempotent and runs before ``done``, so recovery
finishes it too.

The journal is an append-only, fsynced log of intent, one per component.
Records are framed as ``len:u32 | crc32:u32 | canonical msgpack``; a torn
tail (a crash mid-append) fails its length or CRC and is ignored, so the log
always reads as a prefix of what was written. A transaction ends with
``done``; the log is truncated once it grows past a bound while no
transaction is open.

``P2PUPD_CRASH_AT=<point>`` makes the process SIGKILL itself at that point
(``CRASH_POINTS``), for the crash tests.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pupd.daemon.apply.recovery import Action, Phase, decide, phase_of
from p2pupd.daemon.apply.targets import Identity, Target, lstat_or_none, target_for
from p2pupd.daemon.errors import DaemonError, NotFoundError, StorageError
from p2pupd.daemon.fsutil import fsync_dir, storage_error
from p2pupd.daemon.stage.statcache import Entry, StatCache, stat_key
from p2pupd.daemon.state import components
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import ComponentConfig
from p2pupd.protocol import encoding
from p2pupd.protocol.errors import CodecError
from p2pupd.protocol.manifest import Manifest

_HEADER = struct.Struct(">II")
_MAX_RECORD = 1 << 20
_COMPACT_BYTES = 1 << 20


def _scan(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The intact records at the start of ``data`` and the offset where they end."""
    out: list[dict[str, Any]] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if length > _MAX_RECORD or len(body) != length or zlib.crc32(body) != crc:
            break
        try:
            rec = encoding.decode(body)
        except CodecError:
            break
        if isinstance(rec, dict):
            out.append(rec)
        pos += _HEADER.size + length
    return out, pos


class JournalUncertainError(StorageError):
    """Appending failed and the journal could not be cut back: the record may be durable."""


class Journal:
    """Append-only step log of one component's applies.

    An append writes its frame at the end of the last intact record (not
    blindly at the end of the file: a torn tail left by a crash, or by a write
    the disk could not hold, is cut off first, or every later record would sit
    behind it, unseen by ``records``), loops over short writes, and fsyncs. If
    the write or the fsync fails, the file is cut back to where it was and
    synced, so a failed append leaves no trace (``StorageError``); only if
    that too fails is the outcome unknown (``JournalUncertainError``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._end: int | None = None  # where the intact records end, if known

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` and fsync before returning (the step may then act)."""
        body = encoding.encode(record)
        frame = _HEADER.pack(len(body), zlib.crc32(body)) + body
        new = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise storage_error(exc, "write journal", self.path) from None
        try:
            try:
                end = self._intact_end(fd)
            except OSError as exc:
                raise storage_error(exc, "repair journal", self.path) from None
            try:
                view = memoryview(frame)
                pos = end
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
                os.fsync(fd)
            except OSError as exc:
                self._end = None
                try:
                    os.ftruncate(fd, end)
                    os.fsync(fd)
                except OSError:
                    raise JournalUncertainError(
                        f"cannot write journal {self.path}: {exc.strerror}; "
                        "nor cut it back (the record may or may not be durable)"
                    ) from None
                raise storage_error(exc, "write journal", self.path) from None
            self._end = end + len(frame)
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.path.parent)

    def _intact_end(self, fd: int) -> int:
        """Where the intact records end in the open journal ``fd``; cut off anything after.

        Raises ``OSError``.
        """
        size = os.fstat(fd).st_size
        if self._end is not None and self._end == size:
            return size
        data = os.pread(fd, size, 0) if size else b""
        end = _scan(data)[1]
        if end != size:
            os.ftruncate(fd, end)  # a torn or corrupt tail: nothing after it is readable
            os.fsync(fd)
        self._end = end
        return end

    def records(self) -> list[dict[str, Any]]:
        """Return every intact record, stopping at the first torn or corrupt one."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot read journal {self.path}: {exc.strerror}") from None
        return _scan(data)[0]

    def last_transaction(self) -> list[dict[str, Any]]:
        """Return the records of the newest transaction (from its ``begin``)."""
        recs = self.records()
        for i in range(len(recs) - 1, -1, -1):
            if recs[i].get("step") == "begin":
                return recs[i:]
        return []

    def open_transaction(self) -> list[dict[str, Any]] | None:
        """Return the newest transaction if it has not reached ``done``."""
        tx = self.last_transaction()
        if tx and tx[-1].get("step") != "done":
            return tx
        return None

    def compact(self) -> None:
        """Drop finished transactions once the log is large (never an open one)."""
        try:
            if self.path.stat().st_size < _COMPACT_BYTES or self.open_transaction():
                return
            self.path.unlink()
            fsync_dir(self.path.parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot compact journal {self.path}: {exc.strerror}") from None


# -- the transaction ------------------------------------------------------------

CRASH_POINTS = (
    "begin",  # begin record durable, nothing staged
    "prepare",  # stage complete, old version kept (file kind: linked), no staged record
    "staged",  # staged record durable, swap not done
    "swap",  # swap done, not yet journalled
    "swapped",
    "health",  # about to run the checks
    "undo",  # undo record durable, old version not yet back
    "undo-swap",  # old version back, state not yet updated
    "commit",  # commit record durable, state not yet updated
    "commit-state",  # state updated, replaced version not yet moved to its kept name
    "done",
)
# A self-update's own points (not met by other applies, so kept apart).
TRIAL_CRASH_POINTS = (
    "trial",  # trial record durable, not yet handed over
    "healthy",  # healthy record durable, swap not done
)
_CRASH_AT = os.environ.get("P2PUPD_CRASH_AT")
# A test's fault injector, called at every point (fill the disk, remount, cut the power).
FAULT: Callable[[str], None] | None = None

Checks = Callable[[ComponentConfig, Target, Manifest, "Tx"], None]
# The self-update trial this process runs (its ``trial`` transaction id), set
# by the restarted daemon (``claim_trial``): recovery must not judge it.
_OWN_TRIAL: set[str] = set()


def crash_point(point: str) -> None:
    """SIGKILL this process if ``P2PUPD_CRASH_AT`` names ``point`` (crash tests)."""
    if FAULT is not None:
        FAULT(point)
    if point == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


class UnfinishedTransactionError(DaemonError):
    """A transaction failed after its swap and the new version is (or may be) live.

    Its journal stays open: the next command (or ``p2pupd recover``) settles it
    as the recovery table says. The CLI's exit code 4, never 1: exit 1 means
    the old version is live.
    """


def claim_trial(tx_id: str | None) -> None:
    """This process is the trial run of transaction ``tx_id`` (None: no longer)."""
    _OWN_TRIAL.clear()
    if tx_id is not None:
        _OWN_TRIAL.add(tx_id)


class HandOver(Exception):
    """Raised by ``swap_and_commit`` at the ``trial`` point of a self-update.

    The transaction stays open; the caller must run ``tx.src`` (the staged new
    version) for its trial, handing it the node lock. Not a ``P2pupdError``:
    nothing failed.
    """

    def __init__(self, tx: Tx) -> None:
        super().__init__(f"{tx.component}: serial {tx.to} staged at {tx.src}, trial pending")
        self.tx = tx


@dataclass
class Tx:
    """An open transaction: its ``begin`` record plus the identities from ``staged``."""

    tx: str
    component: str
    to: int
    frm: int | None
    src: Path
    # "apply" (src is a fresh stage), "switch" (src is a kept version) or "reshape"
    # (src is a kept version being rebuilt in place: never removed, stays kept)
    op: str
    checked: bool  # whether health checks decide (False for an operator's rollback)
    event: str  # history event on commit
    new_id: Identity = None
    old_id: Identity = None
    swap_ns: int = 0
    live_at: float = 0.0  # time.monotonic() when the swap returned
    steps: list[str] = field(default_factory=list)  # steps this process made durable
    reason: str = ""  # why the checks failed (the ``undo`` record's reason)

    def begin_record(self) -> dict[str, Any]:
        return {
            "step": "begin",
            "tx": self.tx,
            "component": self.component,
            "to": self.to,
            "from": self.frm,
            "src": str(self.src),
            "op": self.op,
            "checked": self.checked,
            "event": self.event,
        }

    @classmethod
    def from_records(cls, recs: list[dict[str, Any]]) -> Tx:
        b = recs[0]
        t = cls(
            b["tx"], b["component"], b["to"], b["from"], Path(b["src"]), b["op"],
            bool(b.get("checked")), str(b.get("event", "applied")),
        )  # fmt: skip
        for r in recs:
            if r.get("step") == "staged":
                t.new_id, t.old_id = r.get("new_id"), r.get("old_id")
        return t


class Transactions:
    """Runs and recovers the transactions of one node's components (caller holds the lock)."""

    def __init__(self, node: Node, manifest: Callable[[str, int], Manifest]) -> None:
        self.node = node
        self.manifest = manifest
        self._caches: dict[str, StatCache] = {}
        self._journals: dict[str, Journal] = {}

    def journal(self, component: str) -> Journal:
        if component not in self._journals:
            self._journals[component] = Journal(self.node.state.journal_dir / f"{component}.log")
        return self._journals[component]

    def cache(self, component: str) -> StatCache:
        if component not in self._caches:
            self._caches[component] = StatCache(self.node.state.cache_dir / f"{component}.stats")
        return self._caches[component]

    def begin(
        self, cfg: ComponentConfig, to: int, frm: int | None, src: Path, op: str, checked: bool,
        event: str,
    ) -> Tx:  # fmt: skip
        """Journal a new transaction; nothing has changed yet."""
        tx = Tx(secrets.token_hex(8), cfg.name, to, frm, src, op, checked, event)
        self.journal(cfg.name).append(tx.begin_record())
        crash_point("begin")
        return tx

    def step(self, tx: Tx, step: str, **fields: Any) -> None:
        """Journal ``step`` of ``tx`` (durable on return); ``StorageError`` if it cannot."""
        self.journal(tx.component).append({"step": step, "tx": tx.tx, **fields})
        tx.steps.append(step)

    def abort(self, cfg: ComponentConfig, tx: Tx) -> None:
        """End ``tx`` before its swap: discard the stage, journal ``done``, tidy up.

        Tidying drops versions the state no longer keeps (one taken out of the
        kept list to be recycled, say, before it could be renamed).
        """
        target_for(cfg).discard(tx.src, tx.op, tx.frm)
        self.step(tx, "done", outcome="aborted")
        # Best effort: the error that caused the abort (a full disk, say)
        # matters more, and the next commit or recovery tidies up again.
        with contextlib.suppress(StorageError):
            self.cleanup(cfg)

    def abort_quietly(self, cfg: ComponentConfig, tx: Tx) -> None:
        """``abort`` as far as it can go: the error that caused it matters more, and
        recovery aborts again (the recovery table) whatever this left undone."""
        with contextlib.suppress(StorageError):
            self.abort(cfg, tx)

    def swap_and_commit(
        self, cfg: ComponentConfig, man: Manifest, tx: Tx, checks: Checks,
        trial: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Swap ``tx.src`` in, run ``checks`` (if ``tx.checked``), then commit or undo.

        Raises whatever ``checks`` raised after the old version is back and
        the release is marked bad; ``StorageError``/``ApplyError`` when the
        transaction failed with the old version live (never replaced, or put
        back); ``UnfinishedTransactionError`` when it failed with the new
        version live (``_settle``). With ``trial`` (a checked self-update: the
        fields of its ``trial`` record), raises ``HandOver`` before the swap
        instead (see the module docstring).
        """
        target = target_for(cfg)
        try:
            target.prepare(tx.frm)
            self.follow(cfg, target)
            crash_point("prepare")
            tx.new_id, tx.old_id = target.new_identity(tx.src), target.identity()
            self.step(tx, "staged", new_id=tx.new_id, old_id=tx.old_id)
        except BaseException:
            # Nothing was swapped: whether ``staged`` is durable or not,
            # recovery would abort (the recovery table), so abort now.
            self.abort_quietly(cfg, tx)
            raise
        crash_point("staged")
        if trial is not None and tx.checked:
            self.step(tx, "trial", **trial)
            crash_point("trial")
            raise HandOver(tx)
        self._finish(cfg, man, tx, target, checks)

    def _finish(
        self, cfg: ComponentConfig, man: Manifest, tx: Tx, target: Target, checks: Checks
    ) -> None:
        try:
            self._swap_check_commit(cfg, man, tx, target, checks)
        except Exception as exc:
            self._settle(cfg, target, tx, exc)
            raise
        crash_point("done")
        with contextlib.suppress(StorageError):  # done: a large log is compacted next time
            self.journal(cfg.name).compact()

    def open_trial(self, cfg: ComponentConfig, tx_id: str) -> Tx:
        """The open self-update transaction ``tx_id`` of ``cfg``, stopped at ``trial``.

        Raises ``NotFoundError`` if the journal holds no such transaction (it
        was settled, or never reached its trial).
        """
        recs = self.journal(cfg.name).open_transaction() or []
        steps = [r.get("step") for r in recs]
        if (
            not recs
            or recs[0].get("tx") != tx_id
            or "trial" not in steps
            or {"healthy", "unhealthy"} & set(steps)
        ):
            raise NotFoundError(f"{cfg.name}: no open trial {tx_id} in the journal")
        tx = Tx.from_records(recs)
        tx.steps = [str(s) for s in steps]
        return tx

    def finish_trial(self, cfg: ComponentConfig, man: Manifest, tx: Tx) -> None:
        """The trial run proved ``tx.to`` healthy: journal it, swap, commit.

        Raises as ``swap_and_commit`` does after its swap.
        """
        self.step(tx, "healthy")
        crash_point("healthy")
        self._finish(cfg, man, tx, target_for(cfg), lambda *_: None)
        with contextlib.suppress(StorageError):
            self.journal(cfg.name).compact()

    def fail_trial(self, tx: Tx, reason: str) -> None:
        """Record why the trial run of ``tx`` did not prove it healthy; whoever
        recovers the transaction (recovery.py) then marks the release bad with it."""
        self.step(tx, "unhealthy", reason=reason)

    def _swap_check_commit(
        self, cfg: ComponentConfig, man: Manifest, tx: Tx, target: Target, checks: Checks
    ) -> None:
        target.swap(tx.src)
        tx.swap_ns, tx.live_at = target.swap_ns, time.monotonic()
        self.follow(cfg, target)
        crash_point("swap")
        self.step(tx, "swapped")
        crash_point("swapped")
        if tx.checked:
            self.step(tx, "health")
            crash_point("health")
            try:
                checks(cfg, target, man, tx)
            except Exception as exc:
                reason = tx.reason = str(exc)
                self.step(tx, "undo", reason=reason)
                crash_point("undo")
                self._undo(cfg, target, tx, reason, verdict=True, recorded=False)
                self.cleanup(cfg)
                raise
        self.step(tx, "commit")
        crash_point("commit")
        self._commit(cfg, target, tx, "")
        self.cleanup(cfg)
        self.step(tx, "done", outcome="committed")

    def _settle(self, cfg: ComponentConfig, target: Target, tx: Tx, exc: Exception) -> None:
        """After a failure past ``staged`` (a full or read-only disk, a failing
        check): leave the target whole, and raise ``UnfinishedTransactionError``
        if that is the new version, so that an error always tells which is live.

        Until ``commit`` is durable the old version may go back at once, as
        recovery would put it (the recovery table), with no record needed:
        found live, it makes recovery abort. Not after ``commit``, nor when
        the journal cannot say whether a record is durable.
        """
        if "done" in tx.steps:
            return  # the transaction finished before the failure
        if not isinstance(exc, JournalUncertainError) and "commit" not in tx.steps:
            with contextlib.suppress(StorageError):
                if "undo" in tx.steps:  # a failed check: its verdict is durable, finish it
                    recorded = "recorded" in tx.steps
                    self._undo(cfg, target, tx, tx.reason, verdict=True, recorded=recorded)
                else:
                    target.undo(tx.src, tx.new_id, tx.old_id, tx.frm, tx.op)
                    self.follow(cfg, target)
                    self.step(tx, "done", outcome="aborted")
                self.cleanup(cfg)
        try:
            live: Identity | object = target.identity()
        except StorageError:
            live = object()  # cannot tell
        if live == tx.old_id and tx.old_id != tx.new_id:
            return
        what = "is live" if live == tx.new_id else "may be live"
        raise UnfinishedTransactionError(
            f"{cfg.name}: serial {tx.to} {what} but its transaction could not finish ({exc}); "
            "`p2pupd recover` (or any command) settles it"
        ) from None

    def follow(self, cfg: ComponentConfig, target: Target) -> None:
        """Let the stat cache follow files whose ctime the target's renames changed."""
        cache = self.cache(cfg.name)
        for old, new in target.rekeys:
            cache.rekey(old, new)
        target.rekeys.clear()

    # -- commit, undo, cleanup: each idempotent, for recovery ------------------------

    def _label(self, component: str, serial: int | None) -> str | None:
        if serial is None:
            return None
        with contextlib.suppress(NotFoundError, StorageError):
            return self.manifest(component, serial).version
        return None

    def _commit(self, cfg: ComponentConfig, target: Target, tx: Tx, detail: str) -> None:
        if self.node.state.read_state(cfg.name).installed != tx.to:
            components.committed(
                self.node, cfg.name, to=tx.to, frm=tx.frm, retain=cfg.retain, event=tx.event,
                version=self._label(cfg.name, tx.to), detail=detail,
            )  # fmt: skip
        crash_point("commit-state")
        target.finish(tx.src, tx.frm)
        self.follow(cfg, target)

    def _undo(
        self, cfg: ComponentConfig, target: Target, tx: Tx, reason: str, verdict: bool,
        recorded: bool,
    ) -> None:  # fmt: skip
        """Put the old version back if the new one is live; record why; journal ``done``.

        ``verdict``: a check failed (the release is marked bad); otherwise the
        transaction was cut off between swap and commit, which is counted, and
        marks an applied release bad only the ``INTERRUPTIONS_BEFORE_BAD``-th
        time (state/components.py). ``recorded``: the journal says the state already
        holds it.
        """
        target.undo(tx.src, tx.new_id, tx.old_id, tx.frm, tx.op)
        self.follow(cfg, target)
        crash_point("undo-swap")
        if not recorded:
            components.undone(
                self.node, cfg.name, serial=tx.to, version=self._label(cfg.name, tx.to),
                reason=reason, verdict=verdict, counts=tx.checked,
            )  # fmt: skip
            self.step(tx, "recorded")
        self.step(tx, "done", outcome="undone")

    def cleanup(self, cfg: ComponentConfig) -> None:
        """Drop versions beyond ``retain``, scratch names and stale cache records.

        Idempotent; runs before a commit's ``done`` (so a crash here is
        finished by recovery) and after an undo.
        """
        st = self.node.state.read_state(cfg.name)
        target = target_for(cfg)
        cache = self.cache(cfg.name)
        keep = {*st.kept, *([st.installed] if st.installed is not None else [])}
        survivors = self._sharing_with_doomed(target, cache, keep, st.installed)
        target.prune(set(st.kept), st.installed)
        for serial, rel, path, old in survivors:
            # Removing a hard-linked twin changed only the ctime of this file.
            now = lstat_or_none(Path(path))
            if now is not None and (key := stat_key(now))[:2] + key[3:] == old[:2] + old[3:5]:
                cache.put(serial, rel, key, old[5])
        cache.retain(keep)
        cache.save()

    @staticmethod
    def _sharing_with_doomed(
        target: Target, cache: StatCache, keep: set[int], installed: int | None
    ) -> list[tuple[int, str, str, Entry]]:
        """Trusted files of surviving versions that share an inode with a version to drop."""
        doomed = {
            (e[3], e[4])
            for s in cache.serials()
            if s not in keep
            for e in cache.entries(s).values()
        }
        out: list[tuple[int, str, str, Entry]] = []
        if not doomed:
            return out
        for s in keep:
            root = str(target.version_root(s, installed))
            for rel, e in cache.entries(s).items():
                path = target.file_at(root, rel)
                if (e[3], e[4]) in doomed and cache.trusted(s, rel, path, e[5]) is not None:
                    out.append((s, rel, path, e))
        return out

    # -- recovery ------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Finish or undo every open transaction; return one line per action."""
        out = []
        for name, cfg in self.node.config.components.items():
            recs = self.journal(name).open_transaction()
            if recs and recs[0].get("tx") in _OWN_TRIAL:
                continue  # this process is its trial run: not over, not ours to judge
            if recs:
                out.append(self._recover_one(cfg, recs))
            else:
                # What a process killed outside a transaction may leave: a
                # probe's scratch, a version dropped from the state just before
                # it was to be recycled.
                st = self.node.state.read_state(name)
                target_for(cfg).prune(set(st.kept), st.installed)
        return out

    def pending(self) -> dict[str, dict[str, Any]]:
        """Return, per component with an open transaction, its op, serials and last step."""
        out = {}
        for name in self.node.config.components:
            recs = self.journal(name).open_transaction()
            if recs:
                b = recs[0]
                out[name] = {
                    "tx": b.get("tx"),
                    "op": b.get("op"),
                    "to": b.get("to"),
                    "from": b.get("from"),
                    "step": recs[-1].get("step"),
                }
        return out

    def _recover_one(self, cfg: ComponentConfig, recs: list[dict[str, Any]]) -> str:
        """Carry out what the recovery table (recovery.py) says for this transaction."""
        tx = Tx.from_records(recs)
        target = target_for(cfg)
        live = target.identity() if phase_of(recs) is not Phase.BEGUN else None
        action = decide(recs, live, tx.new_id, tx.old_id)
        if action is Action.FINISH_COMMIT:
            self._commit(cfg, target, tx, "completed after an interruption")
            self.cleanup(cfg)
            self.step(tx, "done", outcome="committed")
            return f"{cfg.name}: finished the interrupted commit of serial {tx.to}"
        if action is Action.ABORT:
            self.abort(cfg, tx)
            return (
                f"{cfg.name}: discarded an interrupted {tx.op} of serial {tx.to}; old version kept"
            )
        verdict = action in (Action.FINISH_UNDO, Action.TRIAL_FAILED)
        default = {
            Phase.TRIAL: "its trial run was cut off before a verdict (a crash, a power cut, "
            "the service stopped)",
            Phase.PROVEN: "interrupted between its healthy trial run and the swap",
        }.get(phase_of(recs), "interrupted between swap and commit")
        reason = next(
            (str(r["reason"]) for r in recs if r.get("step") in ("undo", "unhealthy")), default
        )
        recorded = any(r.get("step") == "recorded" for r in recs)
        self._undo(cfg, target, tx, reason, verdict=verdict, recorded=recorded)
        self.cleanup(cfg)
        return f"{cfg.name}: rolled back serial {tx.to} ({reason})"
