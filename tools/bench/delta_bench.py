"""Delta engine: what a node at the old version receives, and what it costs.

Run: ``make bench BENCH=delta`` or ``python -m p2pupd.tools.bench.delta_bench [--quick]
[--no-real] [--only PAIR] [--work DIR] [--cache DIR]`` (``--only`` takes ``image``,
``tree``, ``real`` -- every real pair -- or one real pair's project name).

For each old/new pair it drives the real command line in subprocesses:
publish old -> export -> node init -> import --apply (v1 installed) -> publish
new (timed) -> ``export --from-version`` old -> import -> apply (timed) -> the
target must equal the new tree byte for byte. Pairs:

* a synthetic disk image (200 MiB; ``--quick`` 20 MiB) with ~1 % of its bytes
  changed in scattered places plus a 1 MiB insertion;
* a tree of many small files with a few changed, added and removed (files
  keep fixed mtimes, the unchanged ones the same in both trees: the signed
  manifest records every file's mtime, so mtimes that drift with the speed
  of writing the trees would make the manifest patch, and the result, noisy);
* real pairs: two consecutive wheels each of numpy, cryptography and
  pydantic-core (large native libraries, rebuilt), downloaded with pip once
  into the cache (default ``build/bench-cache``) and unpacked (a pair whose
  download fails is skipped with a note).

Columns: full size of the new tree; bytes the node receives (the whole
``--from-version`` bundle: blobs, the signed manifest, roots, OCI metadata --
and, in brackets, the manifest as the bundle carries it: a patch against the
node's held envelope where that is smaller, else whole); the same changes as
whole-file patches per changed file (same old/new pairing as publish; new
files diffed against empty) by classic bsdiff4 (BSDIFF40), by hdiffpatch at
the package's zstd setting (``hdiffpatch.diff(old, new, "zstd")``, the
reference of the publish-time target) and at its strongest, LZMA2 level 9
(size only), and ``zstd -19 --long --patch-from``; p2pupd's bundle over the
smaller of whole-file bsdiff4 and hdiffpatch; publish time and peak RSS beside
the time and peak RSS of whole-file bsdiff4 and hdiffpatch over the same
files (each one process, reading the files itself); node apply time and peak
RSS. Times are wall clock; peak RSS is each command's own ru_maxrss (see
``measured_rss``). Below the table: where each byte of the bundle goes
(``bundle_breakdown``) and which codecs the publisher's patches used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
CLI = [sys.executable, "-m", "p2pupd.tools.cli"]
REAL = (
    ("numpy", "2.2.5", "2.2.6"),
    ("cryptography", "46.0.6", "46.0.7"),
    ("pydantic-core", "2.41.4", "2.41.5"),
)
DEFAULT_CACHE = Path("build") / "bench-cache"


@dataclass
class Row:
    name: str
    full: int = 0
    receive: int = 0
    manifest: int = 0
    data: int = 0
    bsdiff: int = 0
    hdiff: int = 0
    hdiff_lzma: int = 0
    zstd: int | None = None
    publish_s: float = 0.0
    publish_rss: int = 0
    bsdiff_s: float = 0.0
    bsdiff_rss: int = 0
    hdiff_s: float = 0.0
    hdiff_rss: int = 0
    apply_s: float = 0.0
    apply_rss: int = 0
    ok: bool = False
    note: str = ""
    parts: dict[str, int] | None = None
    codecs: dict[str, int] | None = None

    @property
    def best_whole(self) -> int:
        """The smaller of whole-file bsdiff4 and hdiffpatch (the size target)."""
        return min(self.bsdiff, self.hdiff)


# A forked child starts with its parent's RSS high-water mark (Linux copies the
# mm), so a child of this big process would report at least our own size. The
# measured command therefore runs under a small wrapper, which reports its one
# child's peak from getrusage(RUSAGE_CHILDREN) as the last line of stderr.
_WRAP = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(r.returncode)"
)


def measured_rss(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd``; return (seconds, its peak RSS in bytes, stdout). Raises ``RuntimeError``."""
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True, check=False
    )
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed: {r.stderr[-400:]}")
    return dt, int(r.stderr.strip().splitlines()[-1]) * 1024, r.stdout


def cli(*args: str | Path) -> str:
    """Run one p2pupd command; return its stdout. Raises ``RuntimeError`` on failure."""
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"p2pupd {' '.join(map(str, args[:3]))} failed: {r.stderr[-400:]}")
    return r.stdout


# -- data ------------------------------------------------------------------------


def image_bytes(r: random.Random, size: int) -> bytearray:
    """Disk-image-like bytes: incompressible runs, text, zero blocks."""
    out = bytearray()
    while len(out) < size:
        x = r.random()
        if x < 0.45:
            out += r.randbytes(r.randint(512, 16384))
        elif x < 0.9:
            out += b"".join(
                b"%08x line %d of a log or config\n" % (r.getrandbits(32), i)
                for i in range(r.randint(8, 200))
            )
        else:
            out += bytes(4096 * r.randint(1, 16))
    del out[size:]
    return out


def make_image_pair(base: Path, size: int) -> tuple[Path, Path]:
    r = random.Random(42)
    old = image_bytes(r, size)
    new = bytearray(old)
    changed = 0
    while changed < size // 100:  # ~1 % of the bytes, in scattered places
        n = r.randint(16, 4096)
        p = r.randrange(len(new) - n)
        new[p : p + n] = r.randbytes(n)
        changed += n
    p = r.randrange(len(new))
    new[p:p] = r.randbytes(1 * MiB)
    return _write_tree(base / "old", {"disk.img": bytes(old)}), _write_tree(
        base / "new", {"disk.img": bytes(new)}
    )


OLD_MTIME = 1_700_000_000
NEW_MTIME = OLD_MTIME + 86_400


def make_tree_pair(base: Path, files: int) -> tuple[Path, Path]:
    """Old and new trees; a file the new tree changes or adds is a day newer."""
    r = random.Random(7)
    old: dict[str, bytes] = {}
    for i in range(files):
        data = image_bytes(r, r.randint(200, 60_000))
        old[f"d{i % 37}/f{i}.dat"] = bytes(data)
    new = dict(old)
    names = sorted(old)
    for name in r.sample(names, max(3, files // 100)):  # ~1 % of files edited
        data = bytearray(new[name])
        p = r.randrange(len(data))
        data[p : p + 40] = r.randbytes(40)
        new[name] = bytes(data)
    for name in r.sample(names, 2):
        del new[name]
    for i in range(2):
        new[f"added/n{i}.txt"] = bytes(image_bytes(r, 5000))
    mtimes = {rel: OLD_MTIME if old.get(rel) == data else NEW_MTIME for rel, data in new.items()}
    return _write_tree(base / "old", old, dict.fromkeys(old, OLD_MTIME)), _write_tree(
        base / "new", new, mtimes
    )


def _write_tree(root: Path, files: dict[str, bytes], mtimes: dict[str, int] | None = None) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if mtimes is not None:
            os.utime(p, (mtimes[rel], mtimes[rel]))
    return root


def fetch_real(cache: Path, name: str, v1: str, v2: str) -> tuple[Path, Path, str]:
    """Download (once) and unpack two wheels of ``name``; raises ``RuntimeError``."""
    dirs = []
    for v in (v1, v2):
        dest = cache / f"{name}-{v}"
        if not dest.is_dir():
            dl = cache / "dl"
            dl.mkdir(parents=True, exist_ok=True)
            stem = name.replace("-", "_")
            wheels = list(dl.glob(f"{stem}-{v}-*.whl"))
            if not wheels:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64",
                       f"{name}=={v}", "-d", str(dl), "-q"]  # fmt: skip
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
                wheels = list(dl.glob(f"{stem}-{v}-*.whl"))
                if r.returncode != 0 or not wheels:
                    raise RuntimeError(
                        f"pip download {name}=={v} failed: {r.stderr.strip()[-200:]}"
                    )
            tmp = cache / f".{name}-{v}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            with zipfile.ZipFile(wheels[0]) as z:
                z.extractall(tmp)
            tmp.rename(dest)  # a half-unpacked wheel never passes for the real one
        dirs.append(dest)
    return dirs[0], dirs[1], f"{name} {v1}->{v2} wheel"


# -- baselines ---------------------------------------------------------------------


def changed_pairs(old: Path, new: Path) -> list[tuple[Path | None, Path]]:
    """(old file or None, new file) for every new file that differs, paired as publish does."""
    from p2pupd.tools.publisher.deltas import _name_key

    olds = {str(p.relative_to(old)): p for p in old.rglob("*") if p.is_file()}
    news = {str(p.relative_to(new)): p for p in new.rglob("*") if p.is_file()}
    removed = {k: v for k, v in olds.items() if k not in news}
    out: list[tuple[Path | None, Path]] = []
    for rel, p in sorted(news.items()):
        o = olds.get(rel)
        if o is None:
            cands = [v for k, v in removed.items() if _name_key(k) == _name_key(rel)]
            o = min(cands, key=lambda c: abs(c.stat().st_size - p.stat().st_size), default=None)
        if o is not None and o.read_bytes() == p.read_bytes():
            continue
        out.append((o, p))
    return out


def whole_file_baseline(tool: str, old: Path, new: Path) -> int:
    """Total whole-file patch bytes by ``tool`` (run in a measured subprocess).

    ``bsdiff``: classic bsdiff4; ``hdiff``: hdiffpatch with its zstd plugin at
    the package's settings; ``hdiff-lzma2``: hdiffpatch with LZMA2 level 9.
    """
    import bsdiff4
    import hdiffpatch

    def patch(o: bytes, n: bytes) -> bytes:
        if tool == "bsdiff":
            return bytes(bsdiff4.diff(o, n))
        if tool == "hdiff":
            return hdiffpatch.diff(o, n, "zstd")
        return hdiffpatch.diff(o, n, hdiffpatch.Lzma2Config(level=9, window=26, threads=1))

    total = 0
    for o, p in changed_pairs(old, new):
        total += len(patch(o.read_bytes() if o else b"", p.read_bytes()))
    return total


def zstd_baseline(old: Path, new: Path, work: Path) -> int | None:
    zstd = shutil.which("zstd")
    if zstd is None:
        return None
    total = 0
    out = work / "zstd.out"
    for o, p in changed_pairs(old, new):
        size = max(p.stat().st_size, o.stat().st_size if o else 0)
        wlog = max(10, min(30, (2 * size).bit_length()))
        cmd = [zstd, "-q", "-f", "-19", f"--long={wlog}", "-T2", str(p), "-o", str(out)]
        if o is not None:
            cmd[4:4] = [f"--patch-from={o}"]
        subprocess.run(cmd, check=True, capture_output=True)
        total += out.stat().st_size
    return total


# -- one pair --------------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def bench_pair(name: str, old: Path, new: Path, work: Path) -> Row:
    row = Row(name, full=sum(p.stat().st_size for p in new.rglob("*") if p.is_file()))
    work.mkdir(parents=True)
    keys, repo, state, target = work / "keys", work / "repo", work / "state", work / "target"
    keys.mkdir()
    cli("keygen", keys / "root.key")
    cli("keygen", keys / "rel.key")
    cli("repo", "init", repo, "--root-key", keys / "root.key", "--release-key", keys / "rel.key")
    cli("publish", repo, "app", "1.0", old)
    cli("export", repo, work / "b1")
    target.mkdir()
    cli("init", "--state-dir", state, "--trust", repo / "root.msgpack",
        "--component", f"app={target / 'app'}")  # fmt: skip
    cli("import", work / "b1", "--state-dir", state, "--apply")
    shutil.rmtree(work / "b1")

    row.publish_s, row.publish_rss, _ = measured_rss(
        [*CLI, "publish", str(repo), "app", "2.0", str(new)]
    )
    cli("export", repo, work / "b2", "--from-version", "1.0")
    row.receive = sum(p.stat().st_size for p in (work / "b2").rglob("*") if p.is_file())
    row.manifest = envelope_layer_bytes(work / "b2")
    row.parts = bundle_breakdown(work / "b2")
    row.data = row.parts["data"]
    assert sum(row.parts.values()) == row.receive, (row.parts, row.receive)
    cli("import", work / "b2", "--state-dir", state)
    row.apply_s, row.apply_rss, _ = measured_rss([*CLI, "apply", "app", "--state-dir", str(state)])
    row.ok = tree_digest(target / "app") == tree_digest(new)

    row.codecs = patch_codecs(repo)
    me = [sys.executable, "-m", "p2pupd.tools.bench.delta_bench", "--baseline"]
    row.bsdiff_s, row.bsdiff_rss, out = measured_rss([*me, "bsdiff", str(old), str(new)])
    row.bsdiff = int(out.strip())
    row.hdiff_s, row.hdiff_rss, out = measured_rss([*me, "hdiff", str(old), str(new)])
    row.hdiff = int(out.strip())
    row.hdiff_lzma = int(measured_rss([*me, "hdiff-lzma2", str(old), str(new)])[2].strip())
    row.zstd = zstd_baseline(old, new, work)
    shutil.rmtree(repo)
    shutil.rmtree(state)
    shutil.rmtree(target)
    return row


def patch_codecs(repo: Path) -> dict[str, int]:
    """Count the newest release's patch blobs in ``repo`` by container, codec and packing."""
    from p2pupd.protocol.deltaplan import (
        BSDIFF40_MAGIC,
        KIND_ZCHUNK,
        PATCH2_MAGIC,
        PATCH_MAGIC,
        parse_patch_header,
    )
    from p2pupd.tools.publisher.repo import Repo

    r = Repo(repo)
    man = r.release("app", r.serials("app")[-1])[0]
    out: dict[str, int] = {}
    for d in man.deltas:
        if d.kind == KIND_ZCHUNK:
            continue
        head = r.store.get_bytes(d.patch, verify=False)
        if head[:4] in (PATCH_MAGIC, PATCH2_MAGIC):
            h = parse_patch_header(head)
            how = f"{h.codec.name.lower()}+{h.packing.name.lower()}"
        else:
            how = "bsdiff4 classic" if head[:8] == BSDIFF40_MAGIC else "unknown"
        key = f"{d.kind} {how}"
        out[key] = out.get(key, 0) + 1
    return out


def envelope_layer_bytes(bundle: Path) -> int:
    """Bytes of the release's first layer in ``bundle``: its envelope or envelope patch."""
    from p2pupd.protocol import bundle as oci

    blobs = bundle / "blobs" / "sha256"
    for d in json.loads((bundle / "index.json").read_text())["manifests"]:
        art = json.loads((blobs / d["digest"].removeprefix("sha256:")).read_text())
        if art["artifactType"] == oci.RELEASE_ARTIFACT:
            return int(art["layers"][0]["size"])
    raise RuntimeError(f"{bundle} holds no release")


def bundle_breakdown(bundle: Path) -> dict[str, int]:
    """Where each byte of ``bundle`` goes (the values add up to its size):

    ``data`` the release's blobs (chunks, patches, zstd literals; in packs or
    files), ``manifest`` the release envelope or its patch, ``packing`` what
    packs add around their blobs, ``roots`` root envelopes, ``request`` a
    request document, ``oci`` the layout's JSON (oci-layout, index.json,
    artifact manifests, the empty config).
    """
    from p2pupd.protocol import bundle as oci

    blobs = bundle / "blobs" / "sha256"
    out = dict.fromkeys(("data", "manifest", "packing", "roots", "request", "oci"), 0)
    out["oci"] = (bundle / "oci-layout").stat().st_size + (bundle / "index.json").stat().st_size
    seen: set[str] = set()

    def add(kind: str, d: dict[str, Any]) -> None:
        if d["digest"] in seen:  # a blob listed by two artifacts is one file
            return
        seen.add(d["digest"])
        if d["mediaType"] != oci.PACK_MEDIA_TYPE:
            out[kind] += int(d["size"])
            return
        data = (blobs / d["digest"].removeprefix("sha256:")).read_bytes()
        packed = sum(n for _, n in oci.parse_pack(data))
        out["data"] += packed
        out["packing"] += len(data) - packed

    for m in json.loads((bundle / "index.json").read_text())["manifests"]:
        add("oci", m)
        art = json.loads((blobs / m["digest"].removeprefix("sha256:")).read_text())
        add("oci", art["config"])
        kind = {oci.TRUST_ARTIFACT: "roots", oci.REQUEST_ARTIFACT: "request"}.get(
            art["artifactType"]
        )
        for i, d in enumerate(art["layers"]):
            add(kind or ("manifest" if i == 0 else "data"), d)
    return out


# -- output ------------------------------------------------------------------------


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("MiB", MiB), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def print_table(rows: list[Row]) -> None:
    head = ["pair", "full size", "p2pupd receives (manifest)", "bsdiff4 whole", "hdiffpatch whole",
            "hdiffpatch lzma2", "zstd --patch-from", "p2pupd / best whole", "publish s (RSS)",
            "bsdiff4 s (RSS)", "hdiffpatch s (RSS)", "publish / hdiffpatch s", "apply s (RSS)",
            "ok"]  # fmt: skip
    lines = [head]
    for r in rows:
        if r.note and not r.full:
            lines.append([r.name, r.note, *[""] * (len(head) - 2)])
            continue
        lines.append([
            r.name,
            fmt_bytes(r.full),
            f"{fmt_bytes(r.receive)} ({fmt_bytes(r.manifest)})",
            fmt_bytes(r.bsdiff),
            fmt_bytes(r.hdiff),
            fmt_bytes(r.hdiff_lzma),
            fmt_bytes(r.zstd),
            f"{r.receive / r.best_whole:.3f}x",
            f"{r.publish_s:.1f} ({r.publish_rss // MiB} MiB)",
            f"{r.bsdiff_s:.1f} ({r.bsdiff_rss // MiB} MiB)",
            f"{r.hdiff_s:.1f} ({r.hdiff_rss // MiB} MiB)",
            f"{r.publish_s / r.hdiff_s:.2f}x",
            f"{r.apply_s:.1f} ({r.apply_rss // MiB} MiB)",
            "yes" if r.ok else "NO",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
        if k == 0:
            print("-+-".join("-" * w for w in widths))
    print(
        "p2pupd receives: the whole --from-version bundle (blobs, manifest layer, OCI JSON);"
        " best whole: the smaller of whole-file bsdiff4 and hdiffpatch (zstd);"
        " targets: p2pupd / best whole <= 1, publish / hdiffpatch s <= 1.5, publish RSS <= 512 MiB"
    )
    for r in rows:
        if r.parts:
            shown = ", ".join(f"{k} {v} B" for k, v in r.parts.items() if v)
            print(f"{r.name}: bundle of {r.receive} B = {shown}")
        if r.codecs:
            shown = ", ".join(f"{v} {k}" for k, v in sorted(r.codecs.items()))
            print(f"{r.name}: patches: {shown}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 MiB image, 300 small files")
    ap.add_argument("--no-real", action="store_true", help="skip the downloaded real pair")
    names = [name for name, _v1, _v2 in REAL]
    ap.add_argument(
        "--only",
        choices=("image", "tree", "real", *names),
        help="run one pair: image, tree, every real pair, or one real pair by project",
    )
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temp dir)")
    ap.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="downloaded wheels (build/bench-cache)"
    )
    ap.add_argument("--baseline", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline:
        tool, old, new = args.baseline
        print(whole_file_baseline(tool, Path(old), Path(new)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="delta-bench-", dir=args.work))
    rows: list[Row] = []
    try:
        want = {args.only} if args.only else {"image", "tree", "real"}
        if "real" in want:
            want |= set(names)
        if args.no_real:
            want -= {"real", *names}
        if "image" in want:
            size = (20 if args.quick else 200) * MiB
            old, new = make_image_pair(work / "img", size)
            rows.append(
                bench_pair(f"synthetic {size // MiB} MiB image", old, new, work / "img-run")
            )
            shutil.rmtree(work / "img")
        if "tree" in want:
            old, new = make_tree_pair(work / "tree", 300 if args.quick else 2000)
            rows.append(bench_pair("many small files", old, new, work / "tree-run"))
        for name, v1, v2 in REAL:
            if name not in want:
                continue
            try:
                old, new, label = fetch_real(args.cache, name, v1, v2)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                rows.append(Row(f"{name} wheels", note=f"download failed: {exc}"))
                continue
            rows.append(bench_pair(label, old, new, work / f"{name}-run"))
        print_table(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.ok or r.note for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
