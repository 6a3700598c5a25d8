"""``p2pupd demo``: the whole offline path on an embedded sample, in a temp dir.

A publisher creates keys and a repository, publishes v1 and v2 of a sample
"firmware" component, exports a bundle (the USB stick), and a node pins the
root, imports and applies each version atomically. Prints what happened and
removes everything it made (unless --keep).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from p2pupd.daemon import api

from .clibase import EXIT_OK, Adder
from .export import ReleaseSource, write_bundle
from .keys import generate
from .publish import build_manifest, sign_and_write
from .repo import Repo


def sample_tree(root: Path, version: int, rnd_seed: int = 7) -> None:
    """Write a small appliance-like tree; v2 changes a little of it."""
    rnd = random.Random(rnd_seed)
    image = bytearray(rnd.randbytes(4 * 1024 * 1024))
    if version >= 2:
        for _ in range(20):
            pos = rnd.randrange(len(image) - 64)
            image[pos : pos + 64] = rnd.randbytes(64)
    (root / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "etc").mkdir()
    (root / "var" / "log").mkdir(parents=True)
    (root / "bin" / "appliance").write_bytes(b"#!/bin/sh\necho appliance v%d\n" % version)
    os.chmod(root / "bin" / "appliance", 0o755)
    (root / "lib" / "firmware.img").write_bytes(bytes(image))
    for i in range(50):
        (root / "lib" / f"module{i:02}.so").write_bytes(rnd.randbytes(2000))
    (root / "etc" / "appliance.conf").write_text(f"version={version}\nmode=production\n")
    if version >= 2:
        (root / "etc" / "feature-flags").write_text("fast-path=on\n")
    os.symlink("appliance.conf", root / "etc" / "current.conf")


def run_demo(base: Path) -> None:
    t0 = time.monotonic()
    keys = base / "keys"
    keys.mkdir()
    generate(keys / "root.key")
    generate(keys / "release.key")
    repo = Repo(base / "repo")
    repo.init([keys / "root.key"], 1, [keys / "release.key"])
    print(f"publisher: repository with root v1 at {repo.path}")
    target = base / "site" / "appliance"
    target.parent.mkdir()
    state = base / "site" / "state"
    api.init_node(state, repo.root_path, {"appliance": target})
    print(f"node:      initialised {state}, target {target}")
    print()
    print(f"{'step':<28} {'version':<8} {'bundle bytes':>12} {'copied':>10} {'seconds':>8}")
    for v in (1, 2):
        src = base / f"src-v{v}"
        sample_tree(src, v)
        t = time.monotonic()
        man = build_manifest(repo, "appliance", f"{v}.0", src, int(time.time()))
        env = sign_and_write(repo, man)
        usb = base / f"usb-v{v}"
        rep = write_bundle(
            usb, repo.roots(), [ReleaseSource(man, env, man.blob_sizes())], repo.store
        )
        print(
            f"{'publish + export':<28} {man.version:<8} {rep.bytes:>12} {'':>10} {time.monotonic() - t:>8.2f}"
        )
        t = time.monotonic()
        report, _ = api.import_dir(state, usb, apply_after=True)
        print(
            f"{'import --apply on node':<28} {man.version:<8} {'':>12} "
            f"{report.bytes_copied:>10} {time.monotonic() - t:>8.2f}"
        )
    st = api.status(state)["components"]["appliance"]
    print()
    print(
        f"live: appliance {st['version']} (serial {st['serial']}); kept for rollback: "
        f"{', '.join(k['version'] for k in st['kept']) or '-'}"
    )
    print(f"target content: {(target / 'etc' / 'appliance.conf').read_text().splitlines()[0]}")
    r = api.rollback(state, "appliance")
    print(
        f"rollback:  appliance {r.version} live again "
        f"({(target / 'etc' / 'appliance.conf').read_text().splitlines()[0]})"
    )
    print(f"done in {time.monotonic() - t0:.1f}s")


def cmd_demo(args: argparse.Namespace) -> int:
    base = Path(tempfile.mkdtemp(prefix="p2pupd-demo-"))
    try:
        run_demo(base)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return EXIT_OK


def register(add: Adder) -> None:
    sp = add(
        "demo",
        cmd_demo,
        "run the whole flow on an embedded sample in a temp dir and print what happened",
    )
    sp.add_argument("--keep", action="store_true", help="keep the temp dir for inspection")
