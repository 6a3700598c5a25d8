"""Maintenance commands: gc, fsck, recover."""

from __future__ import annotations

import argparse

from p2pupd.daemon import api
from p2pupd.tools.commands.base import EXIT_ERROR, EXIT_OK, Adder, out, state_dir


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def cmd_gc(args: argparse.Namespace) -> int:
    doc = api.gc(state_dir(args), dry_run=args.dry_run)

    def human() -> None:
        for line in doc["recovered"]:
            print(f"recovered: {line}")
        verb = "would remove" if doc["dry_run"] else "removed"
        print(
            f"{verb} {doc['blobs_removed']} blobs ({_mib(doc['bytes_freed'])}), "
            f"kept {doc['blobs_kept']}"
        )
        if doc.get("blobs_packed") or doc.get("packs_rewritten"):
            print(f"packed {doc['blobs_packed']} blob files, rewrote {doc['packs_rewritten']} packs")
        if doc.get("variants_dropped"):
            print(f"dropped {doc['variants_dropped']} variant(s) carried for other platforms")

    out(args, doc, human)
    return EXIT_OK


def cmd_fsck(args: argparse.Namespace) -> int:
    doc = api.fsck(state_dir(args), repair=args.repair, full=args.full)

    def human() -> None:
        for line in doc["recovered"]:
            print(f"recovered: {line}")
        s = doc["store"]
        print(
            f"store: {s['checked']} blobs checked, {len(s['corrupt'])} corrupt, "
            f"{len(s['temp_files'])} temp files, {len(s['stray'])} stray names"
            + (" (repaired)" if s["repaired"] and (s["corrupt"] or s["temp_files"]) else "")
        )
        for name, c in doc["components"].items():
            if c["serial"] is None:
                print(f"{name}: nothing installed")
                continue
            state = "ok" if not c["problems"] else f"{len(c['problems'])} problem(s)"
            print(f"{name} {c['version']}: {state}")
            for p in c["problems"]:
                print(f"  {p}")

    out(args, doc, human)
    return EXIT_OK if doc["ok"] else EXIT_ERROR


def cmd_recover(args: argparse.Namespace) -> int:
    lines = api.recover(state_dir(args))
    out(
        args,
        {"recovered": lines},
        lambda: print("\n".join(lines) if lines else "nothing to recover"),
    )
    return EXIT_OK


def register(add: Adder) -> None:
    sp = add(
        "gc",
        cmd_gc,
        "delete stored blobs that no installed, kept, pending or newest release needs",
        json_opt=True,
        state=True,
    )
    sp.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    sp = add(
        "fsck",
        cmd_fsck,
        "check the store and compare each live target with its release (exit 1 if not clean)",
        json_opt=True,
        state=True,
    )
    sp.add_argument("--repair", action="store_true", help="remove corrupt blobs and temp files")
    sp.add_argument(
        "--full",
        action="store_true",
        help="re-hash every stored blob with sha256 and every live file "
        "(default: check packed blobs' checksums and trust the stat cache)",
    )
    add(
        "recover",
        cmd_recover,
        "finish or undo an interrupted apply (every command does this first)",
        json_opt=True,
        state=True,
    )
