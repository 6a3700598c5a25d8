"""The ``p2pupd`` command line.

Exit codes (documented in README and ``p2pupd --help``):
  0  success
  1  operational error (I/O, missing data, apply failed and rolled back)
  2  usage or configuration error
  3  refused by verification (signature, threshold, hash, rollback, expiry,
     malformed or hostile input)
Every error is one line on stderr; a traceback appears only with P2PUPD_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from p2pupd.daemon import api
from p2pupd.protocol.errors import (
    P2pupdError,
    RemoteProtocolError,
    VerificationError,
)

from . import keys
from .export import ReleaseSource, write_bundle
from .progress import Progress
from .publish import build_manifest, sign_and_write
from .repo import Repo, RepoError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3

EPILOG = """exit codes: 0 ok, 1 operational error, 2 usage/configuration error,
3 refused by verification (signature, threshold, hash, rollback, expiry, hostile input).
The state directory defaults to $P2PUPD_STATE_DIR, else /var/lib/p2pupd."""


def default_state_dir() -> Path:
    return Path(os.environ.get("P2PUPD_STATE_DIR", "/var/lib/p2pupd"))


def now() -> int:
    override = os.environ.get("P2PUPD_NOW")
    return int(override) if override else int(time.time())


def out(args: argparse.Namespace, doc: Any, human: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        human()


# -- publisher commands ----------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    kid = keys.generate(Path(args.keyfile), force=args.force)
    print(kid)
    return EXIT_OK


def cmd_repo_init(args: argparse.Namespace) -> int:
    repo = Repo(Path(args.repo))
    root = repo.init(
        [Path(k) for k in args.root_key],
        args.threshold,
        [Path(k) for k in args.release_key],
        args.release_threshold,
        name=args.name,
        expires=_expiry(args.expires_days),
    )
    print(
        f"created repository {args.repo}: root v{root.version}; install {repo.root_path} on nodes"
    )
    return EXIT_OK


def cmd_repo_rotate(args: argparse.Namespace) -> int:
    repo = Repo(Path(args.repo))
    root = repo.rotate_root(
        [Path(k) for k in args.old_key],
        [Path(k) for k in args.root_key],
        args.threshold,
        [Path(k) for k in args.release_key] if args.release_key else None,
        args.release_threshold,
        _expiry(args.expires_days),
    )
    print(f"rotated root to v{root.version}")
    return EXIT_OK


def _expiry(days: float | None) -> int | None:
    return None if days is None else now() + int(days * 86400)


def cmd_publish(args: argparse.Namespace) -> int:
    repo = Repo(Path(args.repo))
    repo.require()
    hooks = {}
    for h in args.hook or []:
        point, _, path = h.partition("=")
        if not path:
            raise UsageError(f"--hook wants POINT=FILE, got {h!r}")
        hooks[point] = Path(path)
    man = build_manifest(
        repo,
        args.component,
        args.version,
        Path(args.src_dir),
        now(),
        expires=_expiry(args.expires_days),
        platform=args.platform,
        hooks=hooks,
    )
    sign_and_write(repo, man, [Path(k) for k in args.key] if args.key else None)
    doc = {
        "component": man.component,
        "version": man.version,
        "serial": man.serial,
        "files": len(man.files),
        "bytes": man.total_size(),
        "chunks": len(man.chunk_digests()),
    }
    out(
        args,
        doc,
        lambda: print(
            f"published {man.component} {man.version} (serial {man.serial}): "
            f"{len(man.files)} files, {man.total_size()} bytes, {len(man.chunk_digests())} chunks"
        ),
    )
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    repo = Repo(Path(args.repo))
    trusted = repo.trusted()
    comps = args.component or repo.components()
    sources = []
    for c in comps:
        serials = repo.serials(c)
        if not serials:
            raise RepoError(f"component {c!r} has no releases in {args.repo}")
        for serial in serials[-max(1, args.history) :]:
            man, env = trusted.verify_release(repo.release_bytes(c, serial), None, c)
            sources.append(ReleaseSource(man, env, man.blob_sizes()))
    total = sum(sum(s.blobs.values()) for s in sources)
    with Progress("export", total, enabled=not args.json) as bar:
        report = write_bundle(Path(args.dest), repo.roots(), sources, repo.store, bar.advance)
    doc = {
        "releases": [{"component": c, "version": v, "serial": s} for c, v, s in report.releases],
        "blobs_written": report.blobs,
        "bytes_written": report.bytes,
    }
    out(
        args,
        doc,
        lambda: print(
            f"exported {', '.join(f'{c} {v}' for c, v, _ in report.releases)} to {args.dest}: "
            f"{report.blobs} blobs, {report.bytes} bytes written"
        ),
    )
    return EXIT_OK


# -- node commands -----------------------------------------------------------------


def _state(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else default_state_dir()


def cmd_init(args: argparse.Namespace) -> int:
    comps: dict[str, Path] = {}
    for c in args.component:
        name, _, target = c.partition("=")
        if not target:
            raise UsageError(f"--component wants NAME=TARGET, got {c!r}")
        comps[name] = Path(target)
    cfg = api.init_node(
        _state(args),
        Path(args.trust),
        comps,
        kind=args.kind,
        platform=args.platform,
        health_cmd=tuple(args.health_cmd.split()) if args.health_cmd else (),
        health_seconds=args.health_timeout,
        retain=args.retain,
        immutable=args.immutable,
    )
    print(f"initialised {_state(args)}: components {', '.join(sorted(cfg.components))}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    with Progress("import", 0, enabled=not args.json) as bar:
        report, results = api.import_dir(
            _state(args),
            Path(args.src),
            apply_after=args.apply,
            progress=bar.advance,
            on_total=bar.set_total,
        )
    doc = {
        "root_version": report.root_version,
        "releases": [
            {"component": r.component, "version": r.version, "serial": r.serial, "new": r.new}
            for r in report.releases
        ],
        "skipped": report.skipped,
        "blobs_copied": report.blobs_copied,
        "blobs_present": report.blobs_present,
        "bytes_copied": report.bytes_copied,
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

    def human() -> None:
        for r in report.releases:
            print(
                f"{'imported' if r.new else 'already had'} {r.component} {r.version} (serial {r.serial})"
            )
        for s in report.skipped:
            print(f"skipped {s}")
        print(
            f"{report.blobs_copied} blobs copied ({report.bytes_copied} bytes), {report.blobs_present} already present"
        )
        for a in results:
            print(
                f"applied {a.component} {a.version}"
                if a.changed
                else f"{a.component} {a.version} already live"
            )

    out(args, doc, human)
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    r = api.apply(_state(args), args.component, version=args.version, force=args.force)
    doc = {
        "component": r.component,
        "version": r.version,
        "serial": r.serial,
        "changed": r.changed,
        "previous": r.previous,
    }
    out(
        args,
        doc,
        lambda: print(f"{r.component} {r.version} is live" + ("" if r.changed else " (no change)")),
    )
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    r = api.rollback(_state(args), args.component)
    doc = {"component": r.component, "version": r.version, "serial": r.serial}
    out(args, doc, lambda: print(f"rolled {r.component} back to {r.version}"))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    doc = api.status(_state(args))

    def human() -> None:
        print(
            f"node {doc['node_id'][:12]}  platform {doc['platform']}  root v{doc['root_version']}"
        )
        print(
            f"{'COMPONENT':<16} {'VERSION':<14} {'SERIAL':>6}  {'AVAILABLE':<14} {'KEPT':<14} NOTE"
        )
        for name, c in doc["components"].items():
            avail = c["available"]["version"] if c["available"] else "-"
            kept = ",".join(k["version"] or "?" for k in c["kept"]) or "-"
            note = c["last_error"] or ""
            print(
                f"{name:<16} {c['version'] or '-':<14} {c['serial'] or '-':>6}  {avail:<14} {kept:<14} {note}"
            )

    out(args, doc, human)
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    entries = api.history(_state(args), args.component)

    def human() -> None:
        for e in entries:
            t = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["time"]))
            print(f"{t}  {e['event']:<13} {e['version'] or '-':<14} {e['detail']}")

    out(args, {"component": args.component, "history": entries}, human)
    return EXIT_OK


# -- argument parsing ------------------------------------------------------------


class UsageError(P2pupdError):
    """Bad arguments (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p2pupd",
        description="Peer-to-peer and offline update distribution for air-gapped fleets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str,
        fn: Callable[[argparse.Namespace], int],
        help: str,
        json_opt: bool = False,
        state: bool = False,
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.set_defaults(fn=fn)
        if json_opt:
            sp.add_argument("--json", action="store_true", help="print a JSON document for scripts")
        if state:
            sp.add_argument(
                "--state-dir",
                help="node state directory (default: $P2PUPD_STATE_DIR or /var/lib/p2pupd)",
            )
        return sp

    sp = add(
        "keygen",
        cmd_keygen,
        "create an Ed25519 key (KEYFILE, mode 0600) and KEYFILE.pub; print its key id",
    )
    sp.add_argument("keyfile")
    sp.add_argument("--force", action="store_true", help="overwrite an existing key file")

    rp = sub.add_parser("repo", help="create a repository or rotate its root keys")
    rsub = rp.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    sp = rsub.add_parser(
        "init", help="create REPO with root v1 (writes REPO/root.msgpack for nodes)"
    )
    sp.set_defaults(fn=cmd_repo_init)
    sp.add_argument("repo")
    sp.add_argument(
        "--root-key", action="append", required=True, help="root key file (repeat for k-of-n)"
    )
    sp.add_argument("--threshold", type=int, default=1, help="root signatures required (default 1)")
    sp.add_argument(
        "--release-key", action="append", required=True, help="release signing key file"
    )
    sp.add_argument("--release-threshold", type=int, default=1)
    sp.add_argument("--name", default="p2pupd", help="repository name, bound into the root")
    sp.add_argument("--expires-days", type=float, help="root expiry in days (default: none)")
    sp = rsub.add_parser(
        "rotate-root", help="write root N+1, signed by a threshold of root N and of the new keys"
    )
    sp.set_defaults(fn=cmd_repo_rotate)
    sp.add_argument("repo")
    sp.add_argument("--old-key", action="append", required=True, help="current root key file(s)")
    sp.add_argument("--root-key", action="append", required=True, help="new root key file(s)")
    sp.add_argument("--threshold", type=int, default=1)
    sp.add_argument("--release-key", action="append", help="new release key(s) (default: keep)")
    sp.add_argument("--release-threshold", type=int)
    sp.add_argument("--expires-days", type=float)

    sp = add(
        "publish",
        cmd_publish,
        "publish SRC_DIR as the next signed release of COMPONENT",
        json_opt=True,
    )
    sp.add_argument("repo")
    sp.add_argument("component")
    sp.add_argument("version", help="a label shown to operators, e.g. 2.1.0")
    sp.add_argument("src_dir")
    sp.add_argument(
        "--key", action="append", help="release key file(s) (default: those of repo init)"
    )
    sp.add_argument("--expires-days", type=float, help="release expiry in days (default: none)")
    sp.add_argument("--platform", help="platform this release is for, e.g. linux-aarch64")
    sp.add_argument(
        "--hook", action="append", help="POINT=FILE.wasm (pre-apply, post-apply, health)"
    )

    sp = add(
        "export",
        cmd_export,
        "write a bundle (an OCI image layout) of REPO's newest releases into DEST",
        json_opt=True,
    )
    sp.add_argument("repo")
    sp.add_argument("dest")
    sp.add_argument("--component", action="append", help="only these components (default: all)")
    sp.add_argument(
        "--history",
        type=int,
        default=1,
        metavar="N",
        help="carry the newest N releases of each component (default 1)",
    )

    sp = add(
        "init",
        cmd_init,
        "initialise a node: pin its trust root and configure components",
        state=True,
    )
    sp.add_argument("--trust", required=True, help="root.msgpack from the publisher")
    sp.add_argument(
        "--component", action="append", required=True, help="NAME=TARGET_DIR (repeatable)"
    )
    sp.add_argument("--kind", choices=["dir", "symlink", "file"], default="dir", help="target kind")
    sp.add_argument("--platform", help="this node's platform (default: detected)")
    sp.add_argument("--health-cmd", help="command run after a swap; non-zero exit rolls back")
    sp.add_argument("--health-timeout", type=float, default=30.0, help="seconds (default 30)")
    sp.add_argument("--retain", type=int, default=2, help="previous versions kept (default 2)")
    sp.add_argument(
        "--immutable",
        action="store_true",
        help="targets are never modified in place: hard-link unchanged files",
    )

    sp = add(
        "import",
        cmd_import,
        "verify a bundle directory (e.g. /media/usb), store it, optionally apply",
        json_opt=True,
        state=True,
    )
    sp.add_argument("src")
    sp.add_argument("--apply", action="store_true", help="apply each newly imported release")

    sp = add(
        "apply",
        cmd_apply,
        "make a stored release of COMPONENT live (default: the newest)",
        json_opt=True,
        state=True,
    )
    sp.add_argument("component")
    sp.add_argument("--version", help="version label to apply")
    sp.add_argument("--force", action="store_true", help="retry a release that failed here before")

    sp = add(
        "rollback",
        cmd_rollback,
        "make the previous kept version of COMPONENT live again",
        json_opt=True,
        state=True,
    )
    sp.add_argument("component")

    add(
        "status",
        cmd_status,
        "show installed, available and kept versions",
        json_opt=True,
        state=True,
    )
    sp = add(
        "history",
        cmd_history,
        "show what happened to COMPONENT on this node",
        json_opt=True,
        state=True,
    )
    sp.add_argument("component")
    return p


def exit_code_for(exc: BaseException) -> int:
    from p2pupd.protocol.errors import UnsafePathError

    if isinstance(exc, (VerificationError, RemoteProtocolError, UnsafePathError)):
        return EXIT_REFUSED
    if isinstance(exc, (UsageError, keys.KeyFileError, api.ConfigError)):
        return EXIT_USAGE
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.fn(args)
    except P2pupdError as exc:
        if os.environ.get("P2PUPD_DEBUG"):
            raise
        kind = "refused" if exit_code_for(exc) == EXIT_REFUSED else "error"
        print(f"p2pupd: {kind}: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("p2pupd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
