"""Sneakernet commands: ``import`` (once, or watching a mount directory) and the
``export`` modes beyond a repository's full bundle -- a site's request file, a
minimal bundle cut for a request, and a bundle from a node's own state.

``cmd_node`` registers ``import`` through ``register_import``; ``cmd_publisher``
hands ``export`` here first (``export_special``) and keeps the plain
repository export itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any, cast

from p2pupd.daemon import api
from p2pupd.protocol import limits
from p2pupd.protocol.errors import FrameTooLargeError, RemoteProtocolError
from p2pupd.protocol.request import SiteRequest, verify_any_request
from p2pupd.tools.commands.base import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    Adder,
    UsageError,
    out,
    state_dir,
)
from p2pupd.tools.commands.progress import Progress
from p2pupd.tools.publisher.export import (
    BlobSource,
    ExportReport,
    ReleaseSource,
    RepoSource,
    check_node_key,
    full_releases,
    write_bundle,
)
from p2pupd.tools.publisher.repo import Repo
from p2pupd.tools.publisher.sealexport import seal_recipients
from p2pupd.tools.publisher.siteexport import releases_for_site

REQUEST_PREFIX = "p2pupd-request-"
REQUEST_SUFFIX = ".msgpack"


# -- import -------------------------------------------------------------------------


def import_doc(report: api.ImportReport, results: list[api.ApplyResult]) -> dict[str, Any]:
    """The ``import --json`` document."""
    return {
        "root_version": report.root_version,
        "releases": [
            {
                "component": r.component,
                "version": r.version,
                "serial": r.serial,
                "new": r.new,
                "complete": r.complete,
            }
            for r in report.releases
        ],
        "skipped": report.skipped,
        "carried": [
            {"component": c, "version": v, "serial": s, "platform": p}
            for c, v, s, p in report.carried
        ],
        "blobs_copied": report.blobs_copied,
        "blobs_resumed": report.blobs_resumed,
        "blobs_present": report.blobs_present,
        "bytes_copied": report.bytes_copied,
        "seconds": round(report.seconds, 3),
        "for_node": report.for_node,
        "applied": [
            {
                "component": r.component,
                "version": r.version,
                "serial": r.serial,
                "changed": r.changed,
            }
            for r in results
        ],
    }


def import_lines(report: api.ImportReport, results: list[api.ApplyResult]) -> list[str]:
    """The human summary of an import, one line per fact."""
    lines = []
    for r in report.releases:
        what = "imported" if r.new else "already had"
        gap = "" if r.complete else " -- incomplete: some blobs are still missing"
        lines.append(f"{what} {r.component} {r.version} (serial {r.serial}){gap}")
    lines += [f"carrying {c} {v} for {p} (its nodes fetch it from here)"
              for c, v, _s, p in report.carried]  # fmt: skip
    lines += [f"skipped {s}" for s in report.skipped]
    rate = report.bytes_copied / report.seconds / 1e6 if report.seconds > 0 else 0.0
    lines.append(
        f"{report.blobs_copied} blobs copied ({report.bytes_copied} bytes, {rate:.1f} MB/s), "
        f"{report.blobs_resumed} resumed, {report.blobs_present} already present"
    )
    for a in results:
        lines.append(
            f"applied {a.component} {a.version}"
            if a.changed
            else f"{a.component} {a.version} already live"
        )
    return lines


def cmd_import(args: argparse.Namespace) -> int:
    if args.watch:
        if args.src:
            raise UsageError("give either SRC or --watch DIR, not both")
        return _watch(args)
    if not args.src:
        raise UsageError("import needs SRC (a bundle directory) or --watch DIR")
    with Progress("import", 0, enabled=not args.json) as bar:
        report, results = api.import_dir(
            state_dir(args),
            Path(args.src),
            apply_after=args.apply,
            progress=bar.advance,
            on_total=bar.set_total,
            allow_other_node=args.any_node,
        )
    out(args, import_doc(report, results), lambda: print("\n".join(import_lines(report, results))))
    return EXIT_OK


def _event_code(ev: api.WatchEvent) -> int:
    return {"imported": EXIT_OK, "refused": EXIT_REFUSED}.get(ev.outcome, EXIT_ERROR)


def _watch(args: argparse.Namespace) -> int:
    root = Path(args.watch)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        # Not stop.set() here: the handler runs in the main thread, which may
        # hold the event's internal lock inside stop.wait(); set() would then
        # wait for that lock forever. A helper thread takes it once wait()
        # lets go.
        threading.Thread(target=stop.set, name="stop-watch", daemon=True).start()

    def on_event(ev: api.WatchEvent) -> None:
        if ev.outcome == "imported":
            report, results = cast(tuple[api.ImportReport, list[api.ApplyResult]], ev.detail)
            if args.json:
                print(
                    json.dumps({"bundle": str(ev.path), **import_doc(report, results)}), flush=True
                )
            else:
                for line in import_lines(report, results):
                    print(f"{ev.path}: {line}", flush=True)
        else:
            kind = "refused" if ev.outcome == "refused" else "error"
            print(f"p2pupd: {kind}: {ev.path}: {ev.detail}", file=sys.stderr, flush=True)
            if args.json:
                print(json.dumps({"bundle": str(ev.path), kind: str(ev.detail)}), flush=True)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not args.json:
            print(f"watching {root} for bundles (interval {args.interval:g} s)", flush=True)
        events = api.watch_imports(
            state_dir(args),
            root,
            apply_after=args.apply,
            stop=stop,
            interval=args.interval,
            once=args.once,
            timeout=args.timeout,
            on_event=on_event,
        )
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if args.once:
        if not events:
            within = "" if args.timeout is None else f" within {args.timeout:g} s"
            raise api.BundleError(f"no bundle appeared under {root}{within}")
        return _event_code(events[-1])
    return EXIT_OK


def register_import(add: Adder) -> None:
    sp = add(
        "import",
        cmd_import,
        "verify a bundle directory (e.g. /media/usb), store it, optionally apply; "
        "or watch a mount directory and import every bundle that appears",
        json_opt=True,
        state=True,
    )
    sp.add_argument("src", nargs="?", help="the bundle directory")
    sp.add_argument("--apply", action="store_true", help="apply each newly imported release")
    sp.add_argument(
        "--watch", metavar="DIR", help="watch DIR (and two levels below) for bundles to import"
    )
    sp.add_argument("--interval", type=float, default=2.0, help="watch poll seconds (default 2)")
    sp.add_argument("--once", action="store_true", help="with --watch: stop after one bundle")
    sp.add_argument("--timeout", type=float, help="with --watch: stop after this many seconds")
    sp.add_argument(
        "--any-node",
        action="store_true",
        help="accept a minimal bundle cut for another node's request (it may be incomplete)",
    )


# -- export modes ---------------------------------------------------------------------


def add_export_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--request",
        action="store_true",
        help="write a request file into DEST (a directory or a file name): with a daemon "
        "running, for the whole site (every connected peer's signed request), else for "
        "this node",
    )
    sp.add_argument(
        "--this-node",
        action="store_true",
        help="with --request: speak for this node only, even when a daemon runs",
    )
    sp.add_argument(
        "--for",
        dest="for_request",
        metavar="REQUESTFILE",
        help="cut the smallest bundle for a site's request file (or a directory holding one)",
    )
    sp.add_argument(
        "--state-dir",
        help="export from this node's state instead of a repository (one positional: DEST)",
    )


def export_special(args: argparse.Namespace) -> int | None:
    """Run the export modes handled here; None for a plain repository export.

    Normalises the positionals: ``export REPO DEST`` reads a repository,
    ``export DEST`` (with --state-dir, --request or $P2PUPD_STATE_DIR) a node.
    """
    if args.this_node and not args.request:
        raise UsageError("--this-node goes with --request")
    given = [p for p in (args.repo, args.dest) if p]
    special = args.request or args.state_dir or args.for_request or len(given) == 1
    if special and getattr(args, "from_version", None):
        raise UsageError("--from-version is for a repository export without --for")
    if special and getattr(args, "platform", None):
        raise UsageError(
            "--platform is for a repository export without --for (a request names each "
            "node's platform)"
        )
    if len(given) == 2:
        if args.request or args.state_dir:
            raise UsageError("give REPO DEST, or DEST with --state-dir/--request, not both")
        if args.for_request is None:
            return None
        return _export_for_repo(args)
    if len(given) != 1:
        raise UsageError("export needs REPO DEST, or DEST with --state-dir")
    if not (args.request or args.state_dir or args.for_request) and Repo(Path(given[0])).exists():
        # One positional that is a repository: the destination is what is missing,
        # not a node state directory (which is what `export DEST` alone means).
        raise UsageError(
            f"export {given[0]} needs a destination: p2pupd export {given[0]} DEST "
            "(e.g. /media/usb)"
        )
    args.repo, args.dest = None, given[0]
    if args.request:
        if args.for_request:
            raise UsageError("--request and --for do not go together")
        return _export_request(args)
    return _export_state(args)


def _export_request(args: argparse.Namespace) -> int:
    made = api.make_request(state_dir(args), site=not args.this_node)
    own, members = made.site.collector, made.site.members
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / f"{REQUEST_PREFIX}{own.node_id.hex()[:12]}{REQUEST_SUFFIX}"
    api.atomic_write(dest, made.data, mode=0o644)
    doc = {
        "request": str(dest),
        "node_id": own.node_id.hex(),
        "bytes": len(made.data),
        "components": {c.name: c.installed for c in own.components},
        "releases_held": len(own.releases),
        "extra_blobs": len(own.extra_blobs),
        "site": [
            {
                "node_id": m.node_id.hex(),
                "platform": m.platform,
                "components": {c.name: c.installed for c in m.components},
            }
            for m in members
        ],
        "unanswered": made.unanswered,
    }

    def human() -> None:
        if len(members) == 1:
            what = f"request of node {own.node_id.hex()[:12]}"
        else:
            what = f"site request of {len(members)} nodes (collected by {own.node_id.hex()[:12]})"
        print(f"wrote {what} to {dest} ({len(made.data)} bytes)")
        for peer in made.unanswered:
            print(f"note: peer {peer[:12]} did not answer; its needs are not in the request")

    out(args, doc, human)
    return EXIT_OK


def read_request_file(path: Path) -> bytes:
    """Read a request file from untrusted media (a file, or a directory holding one).

    Raises ``UsageError`` when a directory holds none or several,
    ``FrameTooLargeError``/``RemoteProtocolError`` for an odd or oversized file.
    """
    if path.is_dir():
        found = sorted(path.glob(f"{REQUEST_PREFIX}*{REQUEST_SUFFIX}"))
        if len(found) != 1:
            raise UsageError(f"{path} holds {len(found)} request files; name one")
        path = found[0]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise api.BundleError(f"cannot read request file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RemoteProtocolError(f"request file {path} is not a regular file")
        if st.st_size > limits.MAX_REQUEST_BYTES:
            raise FrameTooLargeError(
                f"request file {path} exceeds {limits.MAX_REQUEST_BYTES} bytes"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limits.MAX_REQUEST_BYTES + 1)
    finally:
        os.close(fd)


def _write(
    args: argparse.Namespace,
    sources: list[ReleaseSource],
    roots: dict[int, bytes],
    src: BlobSource,
    request: bytes | None,
) -> ExportReport:
    total = sum(sum(s.blobs.values()) for s in sources)
    with Progress("export", total, enabled=not args.json) as bar:
        return write_bundle(
            Path(args.dest), roots, sources, src, bar.advance, request=request,
            seal_to=seal_keys(args),
        )  # fmt: skip


def seal_keys(args: argparse.Namespace) -> list[bytes] | None:
    """The seal keys of the ``--encrypt-to`` site files and of the sites a request
    named (None: a plain bundle)."""
    files = getattr(args, "encrypt_to", None) or []
    data = []
    for f in files:
        try:
            data.append(Path(f).read_bytes())
        except OSError as exc:
            raise UsageError(f"cannot read site file {f}: {exc.strerror}") from None
    keys = seal_recipients(data)
    for k in getattr(args, "site_seals", None) or []:
        if k not in keys:
            keys.append(k)
    return keys or None


def _report(args: argparse.Namespace, report: ExportReport) -> int:
    doc = {
        "releases": [{"component": c, "version": v, "serial": s} for c, v, s in report.releases],
        "blobs_written": report.blobs,
        "bytes_written": report.bytes,
        "blobs_in_bundle": report.blobs_in_bundle,
        "bytes_in_bundle": report.bytes_in_bundle,
        "notes": report.notes,
        "for_node": report.for_node,
        "format": report.format,
    }

    def human() -> None:
        rels = ", ".join(f"{c} {v}" for c, v, _ in report.releases) or "nothing new"
        who = f" for node {report.for_node[:12]}" if report.for_node else ""
        print(
            f"exported {rels}{who} to {args.dest}: {report.blobs_in_bundle} blobs "
            f"({report.bytes_in_bundle} bytes) in the bundle, {report.blobs} written; "
            f"bundle format {report.format}"
        )
        for n in report.notes:
            print(f"note: {n}")

    out(args, doc, human)
    return EXIT_OK


def _export_for_repo(args: argparse.Namespace) -> int:
    data = read_request_file(Path(args.for_request))
    site = verify_any_request(data)
    repo = Repo(Path(args.repo))
    for member in site.members:
        check_node_key(repo.path / "nodes", member)
    # Each member is planned from its own platform's variant of each release.
    sources, roots, notes = releases_for_site(lambda p: RepoSource(repo, p), site)
    _seal_for(args, site, notes)
    report = _write(args, sources, roots, RepoSource(repo, site.collector.platform), data)
    report.for_node = _for_whom(site, notes)
    report.notes = notes
    return _report(args, report)


def _seal_for(args: argparse.Namespace, site: SiteRequest, notes: list[str]) -> None:
    """A request from members of a site: seal the bundle to that site (and any --encrypt-to)."""
    seals = sorted({m.site_seal for m in site.members if m.site_seal is not None})
    if not seals:
        return
    args.site_seals = seals
    notes.append(
        f"sealed to the site(s) of the request ({len(seals)}): only their members can read it"
    )


def _for_whom(site: SiteRequest, notes: list[str]) -> str:
    """The collector's node id; a site of several nodes also gets a note naming its size."""
    if len(site.members) > 1:
        notes.insert(0, f"site request of {len(site.members)} nodes: the bundle serves each")
    return site.collector.node_id.hex()


def _export_state(args: argparse.Namespace) -> int:
    try:
        source = api.open_state_source(state_dir(args))
    except api.ConfigError as exc:
        if args.state_dir:
            raise
        raise UsageError(  # `export DEST` alone: maybe a forgotten REPO
            f"export {args.dest}: one path means a bundle of this node's own store, and {exc}; "
            f"to export a repository give both: p2pupd export REPO {args.dest}"
        ) from None
    notes: list[str] = []
    if args.for_request:
        data: bytes | None = read_request_file(Path(args.for_request))
        assert data is not None
        site = verify_any_request(data)
        sources, roots, notes = releases_for_site(lambda _: source, site, use_deltas=False)
        _seal_for(args, site, notes)
        for_node: str | None = _for_whom(site, notes)
    else:
        data, for_node = None, None
        comps = args.component or source.components()
        sources = full_releases(source, comps, args.history, notes)
        roots = source.roots()
    report = _write(args, sources, roots, source, data)
    report.notes, report.for_node = notes, for_node
    return _report(args, report)
