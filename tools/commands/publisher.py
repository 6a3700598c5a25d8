"""Publisher commands: keygen, repo init / rotate-root, publish, export."""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pupd.protocol import ids
from p2pupd.protocol.errors import CodecError, SchemaError
from p2pupd.protocol.patchcodec import PATCH_FORMAT, PATCH_FORMATS
from p2pupd.protocol.rollout.policy import RolloutPolicy
from p2pupd.tools.commands import bundle as cmd_bundle
from p2pupd.tools.commands.base import EXIT_OK, Adder, UsageError, now, out
from p2pupd.tools.commands.progress import Progress
from p2pupd.tools.publisher import keys
from p2pupd.tools.publisher.deltas import source_for_node_at
from p2pupd.tools.publisher.export import ReleaseSource, write_bundle
from p2pupd.tools.publisher.publish import build_manifest, sign_and_write
from p2pupd.tools.publisher.repo import Repo, RepoError


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
        patch_format=args.patch_format,
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
        revoke=args.revoke_key or None,
    )
    revoked = f"; revoked keys: {', '.join(k[:16] for k in root.root.revoked)}" if root.root.revoked else ""
    print(f"rotated root to v{root.version}{revoked}")
    return EXIT_OK


def _expiry(days: float | None) -> int | None:
    return None if days is None else now() + int(days * 86400)


def cmd_publish(args: argparse.Namespace) -> int:
    try:  # bad names on the command line are usage errors, not refusals
        ids.check_component(args.component)
        ids.check_version_label(args.version)
        if args.platform is not None:
            ids.check_platform(args.platform)
    except CodecError as exc:
        raise UsageError(str(exc)) from None
    try:
        rollout = RolloutPolicy.parse(args.rollout) if args.rollout else None
    except SchemaError as exc:
        raise UsageError(str(exc)) from None
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
        delta_depth=args.delta_depth,
        force=args.force,
        rollout=rollout,
        patch_format=args.patch_format,
    )
    sign_and_write(repo, man, [Path(k) for k in args.key] if args.key else None)
    doc = {
        "component": man.component,
        "version": man.version,
        "serial": man.serial,
        "files": len(man.files),
        "bytes": man.total_size(),
        "chunks": len(man.chunk_digests()),
        "deltas": len(man.deltas),
        "rollout": man.rollout.text() if man.rollout else None,
    }
    out(
        args,
        doc,
        lambda: print(
            f"published {man.component} {man.version} (serial {man.serial}): "
            f"{len(man.files)} files, {man.total_size()} bytes, {len(man.chunk_digests())} chunks"
            + (f"; rollout {man.rollout.text()}" if man.rollout else "")
        ),
    )
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    special = cmd_bundle.export_special(args)  # --request, --for, --state-dir
    if special is not None:
        return special
    repo = Repo(Path(args.repo))
    comps = args.component or repo.components()
    wanted = chosen_platforms(args.platform)
    sources = []
    left_out: list[str] = []
    notes: list[str] = []
    for c in comps:
        serials = repo.serials(c)
        if not serials:
            raise RepoError(f"component {c!r} has no releases in {args.repo}")
        if args.from_version is not None:  # only what a node at that version needs
            for platform in variants_to_export(repo, c, serials[-1], wanted, strict=True):
                sources.append(source_for_node_at(repo, c, args.from_version, notes, platform))
            continue
        for serial in serials[-max(1, args.history) :]:
            # Every variant (or those named): one bundle serves a site of mixed
            # platforms, whichever node imports it (the daemons carry the others').
            newest = serial == serials[-1]
            for platform in variants_to_export(repo, c, serial, wanted, strict=newest):
                data = repo.release_bytes(c, serial, platform)
                if not repo.signed_under_current(data, c):
                    # Nodes accept a release arriving from outside only under their
                    # current root: one signed before a release-key rotation (or by
                    # a revoked key) would make them refuse the whole bundle.
                    left_out.append(f"{c} serial {serial}")
                    continue
                man, env = repo.release(c, serial, platform)
                sources.append(ReleaseSource(man, env, man.blob_sizes()))
    if left_out and not sources:
        raise RepoError(
            f"nothing to export: {', '.join(left_out)} "
            "predate the release-key rotation; publish them again to carry them"
        )
    total = sum(sum(s.blobs.values()) for s in sources)
    with Progress("export", total, enabled=not args.json) as bar:
        report = write_bundle(
            Path(args.dest), repo.roots(), sources, repo.store, bar.advance,
            seal_to=cmd_bundle.seal_keys(args),
        )  # fmt: skip
    doc = {
        "releases": [{"component": c, "version": v, "serial": s} for c, v, s in report.releases],
        "blobs_written": report.blobs,
        "bytes_written": report.bytes,
        "left_out": left_out,
        "notes": notes,
    }

    def human() -> None:
        print(
            f"exported {', '.join(f'{c} {v}' for c, v, _ in report.releases)} to {args.dest}: "
            f"{report.blobs} blobs, {report.bytes} bytes written"
            + (
                f"; left out {', '.join(left_out)} (signed before the release-key rotation: "
                "publish again to carry)"
                if left_out
                else ""
            )
        )
        for n in notes:
            print(f"note: {n}")

    out(args, doc, human)
    return EXIT_OK


def chosen_platforms(given: list[str] | None) -> set[str] | None:
    """The platforms ``--platform`` names (None: every variant, also for ``all``)."""
    if not given or "all" in given:
        return None
    for p in given:
        if not ids.PLATFORM_RE.fullmatch(p):
            raise UsageError(f"--platform {p!r} is not a platform name (e.g. linux-aarch64, or all)")
    return set(given)


def variants_to_export(
    repo: Repo, component: str, serial: int, wanted: set[str] | None, *, strict: bool
) -> list[str | None]:
    """The variants of release ``serial`` to carry: ``[None]`` for a universal release,
    else those of ``wanted`` (every one when None). With ``strict``, a release none
    of whose variants is wanted is an error naming the ones it has."""
    have = repo.platforms(component, serial)
    if None in have or wanted is None:
        return have
    picked: list[str | None] = [p for p in have if p in wanted]
    if not picked and strict:
        label = repo.label(component, serial) or f"serial {serial}"
        raise RepoError(
            f"{component} {label} has no variant for {', '.join(sorted(wanted))} "
            f"(it has {', '.join(str(p) for p in have)})"
        )
    return picked


def register(add: Adder) -> None:
    sub = add.sub
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
        "--patch-format",
        type=int,
        choices=PATCH_FORMATS,
        default=PATCH_FORMAT,
        help=f"newest delta patch format releases may use (default {PATCH_FORMAT}; 1 if "
        "nodes run p2pupd 0.1.0: docs/self-update.md)",
    )
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
    sp.add_argument(
        "--revoke-key",
        action="append",
        metavar="KEY",
        help="a compromised key (key id, or its .pub file): nodes refuse everything it "
        "signed, even releases they hold (repeatable; carried into later roots)",
    )

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
    sp.add_argument(
        "--force",
        action="store_true",
        help="publish a version label already used, as a new release (serial); without "
        "it that is refused",
    )
    sp.add_argument(
        "--delta-depth",
        type=int,
        metavar="N",
        help="compute deltas from the previous N releases (default: the repo's setting, 2)",
    )
    sp.add_argument(
        "--rollout",
        metavar="POLICY",
        help="spread in waves, e.g. 'waves=1,10%%,50%% soak=30m halt-after=1' "
        "(default: every node applies on arrival; see docs/rollouts.md)",
    )
    sp.add_argument(
        "--patch-format",
        type=int,
        choices=PATCH_FORMATS,
        help="newest delta patch format to write: 1 every p2pupd applies (bsdiff4), 2 adds "
        "hdiffpatch and LZMA2 (default: the repo's setting; docs/self-update.md)",
    )

    sp = add(
        "export",
        cmd_export,
        "write a bundle (an OCI image layout) of REPO's newest releases into DEST; "
        "with --state-dir from a node's own store; --request writes a node's request file, "
        "--for cuts the smallest bundle for one",
        json_opt=True,
    )
    sp.add_argument("repo", nargs="?", metavar="REPO", help="repository (omit with --state-dir)")
    sp.add_argument("dest", nargs="?", metavar="DEST", help="bundle directory (e.g. /media/usb)")
    cmd_bundle.add_export_options(sp)
    sp.add_argument(
        "--encrypt-to",
        action="append",
        default=[],
        metavar="SITE.pub",
        help="seal the bundle so only members of this site can read it (repeatable)",
    )
    sp.add_argument("--component", action="append", help="only these components (default: all)")
    sp.add_argument(
        "--history",
        type=int,
        default=1,
        metavar="N",
        help="carry the newest N releases of each component (default 1)",
    )
    sp.add_argument(
        "--from-version",
        metavar="V",
        help="carry only what a node at version V needs for the newest release (deltas)",
    )
    sp.add_argument(
        "--platform",
        action="append",
        metavar="P",
        help="of a release with platform variants carry only the variant for P "
        "(repeatable; default and 'all': every variant)",
    )
