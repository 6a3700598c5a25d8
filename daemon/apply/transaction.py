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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from p2pupd.daemon.apply.recovery import Action, Phase, decide, phase_of
from p2pupd.daemon.apply.targets import Identity, Target, lstat_or_none, target_for
from p2pupd.daemon.errors import NotFoundError, StorageError
from p2pupd.daemon.fsutil import fsync_dir
from p2pupd.daemon.stage.statcache import Entry, StatCache, stat_key
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import ComponentConfig, HistoryEntry, now_seconds
from p2pupd.protocol import encoding
from p2pupd.protocol.errors import CodecError
from p2pupd.protocol.manifest import Manifest

_HEADER = struct.Struct(">II")
_MAX_RECORD = 1 << 20
_COMPACT_BYTES = 1 << 20


class Journal:
    """Append-only step log of one component's applies."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` and fsync before returning (the step may then act)."""
        body = encoding.encode(record)
        frame = _HEADER.pack(len(body), zlib.crc32(body)) + body
        new = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, frame)
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise StorageError(f"cannot write journal {self.path}: {exc.strerror}") from None

    def records(self) -> list[dict[str, Any]]:
        """Return every intact record, stopping at the first torn or corrupt one."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot read journal {self.path}: {exc.strerror}") from None
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
        return out

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
_CRASH_AT = os.environ.get("P2PUPD_CRASH_AT")

Checks = Callable[[ComponentConfig, Target, Manifest, "Tx"], None]


def crash_point(point: str) -> None:
    """SIGKILL this process if ``P2PUPD_CRASH_AT`` names ``point`` (crash tests)."""
    if point == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Tx:
    """An open transaction: its ``begin`` record plus the identities from ``staged``."""

    tx: str
    component: str
    to: int
    frm: int | None
    src: Path
    op: str  # "apply" (src is a fresh stage) or "switch" (src is a kept version)
    checked: bool  # whether health checks decide (False for an operator's rollback)
    event: str  # history event on commit
    new_id: Identity = None
    old_id: Identity = None
    swap_ns: int = 0
    live_at: float = 0.0  # time.monotonic() when the swap returned

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

    def journal(self, component: str) -> Journal:
        return Journal(self.node.state.journal_dir / f"{component}.log")

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

    def swap_and_commit(self, cfg: ComponentConfig, man: Manifest, tx: Tx, checks: Checks) -> None:
        """Swap ``tx.src`` in, run ``checks`` (if ``tx.checked``), then commit or undo.

        Raises whatever ``checks`` raised after the old version is back and
        the release is marked bad; ``StorageError``/``ApplyError`` if the swap
        itself fails (then nothing changed and the transaction is aborted).
        """
        target = target_for(cfg)
        try:
            target.prepare(tx.frm)
        except BaseException:
            self.abort(cfg, tx)
            raise
        self.follow(cfg, target)
        crash_point("prepare")
        tx.new_id, tx.old_id = target.new_identity(tx.src), target.identity()
        self.step(tx, "staged", new_id=tx.new_id, old_id=tx.old_id)
        crash_point("staged")
        try:
            target.swap(tx.src)
        except BaseException:
            if target.identity() != tx.new_id:
                self.abort(cfg, tx)
            raise
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
                reason = str(exc)
                self.step(tx, "undo", reason=reason)
                crash_point("undo")
                self._undo(cfg, target, tx, reason, recorded=False)
                self.cleanup(cfg)
                raise
        self.step(tx, "commit")
        crash_point("commit")
        self._commit(cfg, target, tx, "")
        self.cleanup(cfg)
        self.step(tx, "done", outcome="committed")
        crash_point("done")
        self.journal(cfg.name).compact()

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
        st = self.node.state.read_state(cfg.name)
        if st.installed != tx.to:
            kept = [s for s in st.kept if s not in (tx.to, tx.frm)]
            if tx.frm is not None:
                kept.insert(0, tx.frm)
            bad = {s: r for s, r in st.bad.items() if s != tx.to}
            entry = HistoryEntry(
                now_seconds(), tx.event, tx.to, self._label(cfg.name, tx.to), detail
            )
            st = replace(
                st, installed=tx.to, kept=tuple(kept[: cfg.retain]), bad=bad, last_error=None
            ).with_event(entry)
            self.node.state.update_state(cfg.name, st)
        crash_point("commit-state")
        target.finish(tx.src, tx.frm)
        self.follow(cfg, target)

    def _undo(
        self, cfg: ComponentConfig, target: Target, tx: Tx, reason: str, recorded: bool
    ) -> None:
        """Put the old version back if the new one is live; record why; journal ``done``.

        ``recorded``: the journal says the state already holds the failure.
        """
        target.undo(tx.src, tx.new_id, tx.old_id, tx.frm, tx.op)
        self.follow(cfg, target)
        crash_point("undo-swap")
        if not recorded:
            st = self.node.state.read_state(cfg.name)
            version = self._label(cfg.name, tx.to)
            event = "health-failed" if tx.checked else "interrupted"
            bad = dict(st.bad)
            if tx.checked:
                bad[tx.to] = reason
            what = "rolled back" if tx.checked else "not applied"
            st = replace(st, bad=bad, last_error=f"{version or tx.to} {what}: {reason}")
            st = st.with_event(HistoryEntry(now_seconds(), event, tx.to, version, reason))
            self.node.state.update_state(cfg.name, st)
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
        reason = next(
            (r["reason"] for r in recs if r.get("step") == "undo"),
            "interrupted between swap and commit",
        )
        recorded = any(r.get("step") == "recorded" for r in recs)
        self._undo(cfg, target, tx, reason, recorded=recorded)
        self.cleanup(cfg)
        return f"{cfg.name}: rolled back serial {tx.to} ({reason})"
