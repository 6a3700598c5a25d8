"""Maintenance: garbage collection and consistency checks of a node.

Theory of operation. The store only grows by itself (imports, fetches); ``gc``
shrinks it. A blob survives if any release a node may still need names it:

* the installed release of every component (peers fetch its chunks from us,
  and a locally modified file is rebuilt from them),
* every kept release (``rollback`` may need to re-stage it),
* every stored release newer than the installed one (not applied yet), and the
  newest stored release of every component, configured or not (what this node
  announces to its peers),
* the other platforms' variants this node carries of any of those releases
  (state/carried.py): kept exactly as long as its own release of that serial,
  and their manifests dropped with it (a carried variant is a neighbour's
  update, never worth more room than the node's own).

If any of those stored manifests cannot be read (damaged, or signed by keys
no longer trusted), gc refuses to delete anything: guessing would risk a
blob a kept version needs. gc runs under the node lock
after recovery, so no transaction is open and no stage is half-built; it also
removes versions beside the targets that the state no longer keeps and the
store's crash debris. On a full disk, where recovery cannot write, gc still
runs (it is how room is made): the releases of open transactions are kept and
their targets left for the recovery that follows.

``fsck`` checks the store (every packed blob against its checksum, or its
sha256 with ``full``; every loose file re-hashed) and compares every live
target with its manifest: types, modes, symlink targets, empty directories,
no extra entries, and contents (through the stat cache, or re-hashed with
``full``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pupd.daemon.apply.engine import Applier
from p2pupd.daemon.apply.targets import Target, target_for
from p2pupd.daemon.errors import NoSpaceError, NotFoundError, StorageError
from p2pupd.daemon.fsutil import hash_file
from p2pupd.daemon.stage.stagefs import walk_tree
from p2pupd.daemon.stage.statcache import StatCache
from p2pupd.daemon.state import carried
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import LEGACY_DIRS
from p2pupd.daemon.store import members
from p2pupd.protocol.errors import RevokedKeyError
from p2pupd.protocol.manifest import Manifest

MAX_PROBLEMS = 50


@dataclass
class GcResult:
    blobs_removed: int = 0
    bytes_freed: int = 0
    blobs_kept: int = 0
    temp_files_removed: int = 0
    blobs_packed: int = 0  # small blobs moved from their own files into a pack
    packs_rewritten: int = 0
    variants_dropped: int = 0  # carried variants of releases gc no longer keeps
    recovered: list[str] = field(default_factory=list)
    dry_run: bool = False


def wanted_serials(node: Node, component: str) -> set[int]:
    """The releases of ``component`` whose blobs gc must keep (see module doc)."""
    serials = node.releases.serials(component)
    st = node.state.read_state(component)
    out = set(st.kept)
    if st.installed is not None:
        out.add(st.installed)
    out.update(s for s in serials if st.installed is None or s > st.installed)
    if serials:
        out.add(serials[-1])
    # A release whose envelope is gone names no blobs we could know of.
    return out & set(serials)


def keep_set(node: Node, applier: Applier) -> set[bytes]:
    """Return every blob digest a wanted release names (chunks, patches, hooks).

    Raises ``StorageError`` naming the release whose manifest cannot be read.
    """
    keep: set[bytes] = set()
    comps = set(node.config.components) | set(node.releases.components())
    for comp in sorted(comps):
        for serial in sorted(wanted_serials(node, comp)):
            try:
                man = applier.manifest(comp, serial)
            except RevokedKeyError:
                continue  # signed by a compromised key: never used again, nothing to keep
            except (NotFoundError, StorageError) as exc:
                raise StorageError(
                    f"cannot read release {comp}/{serial} ({exc}); refusing to collect garbage"
                ) from None
            keep.update(man.blob_sizes())
        keep |= carried.keep_blobs(node, comp, wanted_serials(node, comp))
    return keep


def collect(node: Node, dry_run: bool = False) -> GcResult:
    """Recover, then delete every blob no wanted release names. Caller holds the lock.

    With ``dry_run`` nothing is deleted and the result says what would be.
    Raises ``StorageError`` (nothing deleted if the keep set cannot be built).
    """
    applier = Applier(node)
    try:
        res = GcResult(recovered=applier.recover(), dry_run=dry_run)
    except NoSpaceError as exc:
        # Recovery must write; gc is what frees the room for it. The open
        # transactions' releases are kept, their targets left to recovery.
        res = GcResult(recovered=[f"recovery deferred: {exc}"], dry_run=dry_run)
    pending = applier.pending()
    keep = keep_set(node, applier)
    for name, tx in pending.items():
        for serial in (tx.get("to"), tx.get("from")):
            if isinstance(serial, int) and node.releases.has(name, serial):
                keep.update(applier.manifest(name, serial).blob_sizes())
    res.blobs_kept = sum(1 for d in node.store.iter_digests() if d in keep)
    if dry_run:
        for digest in node.store.iter_digests():
            if digest not in keep:
                res.blobs_removed += 1
                res.bytes_freed += node.store.size(digest)
        return res
    report = node.store.gc(keep)
    res.blobs_removed, res.bytes_freed = report.removed, report.bytes_freed
    res.temp_files_removed = node.store.clean_tmp()
    for legacy in LEGACY_DIRS:  # the spool directories of format 1
        if members.check(node.root, legacy, members.DIR):
            res.temp_files_removed += members.clear(node.root, legacy)
            with contextlib.suppress(OSError):
                (node.root / legacy).rmdir()
    res.blobs_packed, res.packs_rewritten = report.packed, report.repacked
    for comp in sorted(set(node.config.components) | set(node.releases.components())):
        res.variants_dropped += carried.prune(node, comp, wanted_serials(node, comp))
    # Decoded manifests of releases whose blobs are gone: rebuilt on demand.
    shutil.rmtree(node.state.cache_dir / "manifests", ignore_errors=True)
    for cfg in node.config.components.values():
        if cfg.name not in pending:
            applier.tx.cleanup(cfg)
    return res


def fsck(node: Node, repair: bool = False, full: bool = False) -> dict[str, Any]:
    """Check the store and every live target; return a report (``ok`` says if all is well).

    Caller holds the lock (recovery runs first). ``repair`` removes corrupt
    blobs and temp files; targets are only reported.
    """
    applier = Applier(node)
    doc: dict[str, Any] = {"recovered": applier.recover()}
    rep = node.store.fsck(repair=repair, full=full)
    doc["store"] = {
        "checked": rep.checked,
        "corrupt": [d.hex() for d in rep.corrupt],
        "stray": rep.stray,
        "temp_files": rep.temp_files,
        "repaired": rep.repaired,
    }
    ok = rep.clean or (repair and not rep.stray)
    comps: dict[str, Any] = {}
    for name, cfg in sorted(node.config.components.items()):
        st = node.state.read_state(name)
        if st.installed is None:
            comps[name] = {"serial": None, "problems": []}
            continue
        target = target_for(cfg)
        cache = applier.tx.cache(name)
        man = applier.manifest(name, st.installed)
        root = target.version_root(st.installed, st.installed)
        problems = target.live_problems(st.installed)
        if not problems:
            problems = verify_version(target, man, root, cache, full)
        comps[name] = {"serial": st.installed, "version": man.version, "problems": problems}
        ok = ok and not problems
    doc["components"] = comps
    doc["ok"] = ok
    return doc


def verify_version(
    target: Target, man: Manifest, root: Path, cache: StatCache, full: bool
) -> list[str]:
    """Return what differs between the version at ``root`` and ``man`` (empty: identical)."""
    problems: list[str] = []
    if target.kind == "file":
        f = man.files[0]
        _check_file(problems, f.path, root, f.mode, f.size, f.sha256, man.serial, cache, full)
        return problems[:MAX_PROBLEMS]
    want: dict[str, tuple[str, Any]] = {}
    for d in man.dirs:
        want[d.path] = ("dir", d.mode)
    for f in man.files:
        want[f.path] = ("file", f)
    for s in man.symlinks:
        want[s.path] = ("symlink", s.target)
    implied: set[str] = set()
    for rel in list(want):
        parent = rel.rpartition("/")[0]
        while parent and parent not in implied:  # each directory once, however deep
            implied.add(parent)
            want.setdefault(parent, ("dir", None))
            parent = parent.rpartition("/")[0]
    seen: set[str] = set()
    for rel in walk_tree(root):
        seen.add(rel)
        if rel not in want:
            problems.append(f"{rel}: not in the release")
    for rel, (kind, what) in want.items():
        p = root / rel
        if rel not in seen:
            problems.append(f"{rel}: missing")
            continue
        st = os.lstat(p)
        if kind == "dir":
            if not stat.S_ISDIR(st.st_mode):
                problems.append(f"{rel}: not a directory")
            elif what is not None and stat.S_IMODE(st.st_mode) != what:
                problems.append(f"{rel}: mode {stat.S_IMODE(st.st_mode):o}, expected {what:o}")
        elif kind == "symlink":
            if not stat.S_ISLNK(st.st_mode) or os.readlink(p) != what:
                problems.append(f"{rel}: symlink does not point to {what}")
        else:
            f = what
            _check_file(problems, rel, p, f.mode, f.size, f.sha256, man.serial, cache, full)
        if len(problems) >= MAX_PROBLEMS:
            break
    return problems[:MAX_PROBLEMS]


def _check_file(
    problems: list[str],
    rel: str,
    p: Path,
    mode: int,
    size: int,
    sha: bytes,
    serial: int,
    cache: StatCache,
    full: bool,
) -> None:
    try:
        st = os.lstat(p)
    except OSError:
        problems.append(f"{rel}: missing")
        return
    if not stat.S_ISREG(st.st_mode):
        problems.append(f"{rel}: not a regular file")
    elif stat.S_IMODE(st.st_mode) != mode:
        problems.append(f"{rel}: mode {stat.S_IMODE(st.st_mode):o}, expected {mode:o}")
    elif st.st_size != size:
        problems.append(f"{rel}: {st.st_size} bytes, expected {size}")
    elif (full or cache.trusted(serial, rel, p, sha) is None) and hash_file(p)[0] != sha:
        problems.append(f"{rel}: content differs from the release")
