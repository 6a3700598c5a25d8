"""Hostile inputs scaled in size, and a probe that measures what refusing them costs.

Builders write the attacks of issue 13 as real bundles (OCI layouts on disk)
or raw documents; ``measure`` runs a batch of jobs in one fresh Python process
(``python _hostile.py JOBS.json``) that, for each job, resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``), records its RSS, runs the refusal
through the real code (``api.import_dir``, the decoders, ``show``/``verify``)
and reports the growth of its peak RSS over that baseline (MiB), the seconds
taken and the one-line error. One process for a batch keeps the tests fast;
resetting the mark between jobs keeps each figure its own.

Pytest-free, so the probe can run as a script.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from p2pupd.protocol import bundle as oci
from p2pupd.protocol import ids, limits
from p2pupd.protocol.deltaplan import encode_patch_header
from p2pupd.protocol.patchcodec import encode_dict_patch

MiB = limits.MiB


# -- measuring -----------------------------------------------------------------


@dataclass
class Cost:
    job: str
    peak_mib: float  # growth of peak RSS over the RSS before the job
    seconds: float
    error: str  # the refusal's one line ("" if nothing was refused)


def measure(jobs: list[dict[str, Any]], work: Path) -> list[Cost]:
    """Run ``jobs`` in one fresh interpreter; return their costs in order."""
    spec = work / f"jobs-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    r = subprocess.run(
        [sys.executable, __file__, str(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if r.returncode != 0:
        raise AssertionError(f"probe failed ({r.returncode}):\n{r.stderr}")
    return [Cost(**json.loads(line)) for line in r.stdout.splitlines() if line.startswith("{")]


def _status(key: str) -> int:
    """A ``/proc/self/status`` figure in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/self/status")


def _run_job(job: dict[str, Any]) -> str:
    """Carry out one job; return the error line ('' if it was not refused)."""
    from p2pupd.daemon import api
    from p2pupd.protocol import encoding, request, trust, wire
    from p2pupd.protocol.errors import P2pupdError
    from p2pupd.tools.publisher import inspect

    op = job["op"]
    try:
        if op == "import":
            api.import_dir(Path(job["state"]), Path(job["path"]))
        elif op == "show":
            inspect.describe(inspect.load(Path(job["path"])))
        else:
            data = Path(job["path"]).read_bytes()
            if op == "envelope":
                trust.Envelope.decode(data, limits.MAX_MANIFEST_BYTES)
            elif op == "frame":
                wire.decode_body(data)
            elif op == "request":
                request.verify_any_request(data)
            elif op == "manifest":
                encoding.decode(data, budget=limits.MANIFEST_BUDGET)
            else:
                raise AssertionError(f"unknown job {op}")
    except P2pupdError as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ""


def probe(spec: Path) -> None:
    # Import everything a job may touch first, so imports are not billed to it.
    import p2pupd.daemon.api
    import p2pupd.tools.publisher.inspect  # noqa: F401

    for job in json.loads(spec.read_text()):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
        t0 = time.monotonic()
        error = _run_job(job)
        seconds = time.monotonic() - t0
        peak = _status("VmHWM") - before
        cost = Cost(job.get("name", job["op"]), round(peak / MiB, 1), round(seconds, 3), error)
        print(json.dumps(cost.__dict__), flush=True)


# -- writing bundles -----------------------------------------------------------


def put_blob(bundle: Path, data: bytes) -> oci.Descriptor:
    """Write ``data`` as a blob of ``bundle``; return a descriptor of it (media type to fill)."""
    digest = ids.sha256(data)
    d = bundle / "blobs" / "sha256"
    d.mkdir(parents=True, exist_ok=True)
    (d / digest.hex()).write_bytes(data)
    return oci.Descriptor("", digest, len(data))


def write_layout(bundle: Path, artifacts: list[oci.Descriptor]) -> None:
    """Finish ``bundle``: oci-layout, the empty config blob and an index of ``artifacts``."""
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "oci-layout").write_bytes(oci.OCI_LAYOUT)
    put_blob(bundle, oci.EMPTY_JSON)
    mans = [
        oci.Descriptor(oci.MANIFEST_MEDIA_TYPE, a.digest, a.size, a.annotations) for a in artifacts
    ]
    (bundle / "index.json").write_bytes(oci.build_index(mans))


def release_artifact(
    bundle: Path, first: oci.Descriptor, rest: list[oci.Descriptor], component: str = "app"
) -> oci.Descriptor:
    art = oci.Artifact(oci.RELEASE_ARTIFACT, (first, *rest), {oci.ANNOTATION_COMPONENT: component})
    return put_blob(bundle, oci.build_artifact(art))


def _with_type(
    d: oci.Descriptor, media_type: str, ann: dict[str, str] | None = None
) -> oci.Descriptor:
    return oci.Descriptor(media_type, d.digest, d.size, ann or {})


# -- the attacks -----------------------------------------------------------------


def nested_maps(size: int) -> bytes:
    """``size`` bytes of msgpack: an array of maps nested 16 deep (``{"a": {"a": ... {}}}``).

    msgpack-python builds every one of them (plus a re-encoding) before any
    check used to run: ~17 objects per 49 bytes.
    """
    one = b"\x81\xa1a" * 16 + b"\x80"
    n = max(16, (size - 5) // len(one))
    head = b"\xdc" + struct.pack(">H", n) if n < 1 << 16 else b"\xdd" + struct.pack(">I", n)
    return head + one * n


def patched_envelope_bundle(bundle: Path, base_envelope: bytes, result: bytes) -> int:
    """A bundle whose release envelope is a zstd dictionary patch against
    ``base_envelope`` (one the node holds) rebuilding ``result``; returns its size on disk."""
    frame = encode_dict_patch(base_envelope, result, level=3)
    ann = oci.ReleasePatch(
        ids.sha256(base_envelope),
        ids.sha256(result),
        len(result),
        media_type=oci.RELEASE_ZPATCH_MEDIA_TYPE,
    ).annotations()
    first = _with_type(put_blob(bundle, frame), oci.RELEASE_ZPATCH_MEDIA_TYPE, ann)
    write_layout(bundle, [release_artifact(bundle, first, [])])
    return _size(bundle)


def bsdiff_bomb_bundle(bundle: Path, base_envelope: bytes, target: int, control: int) -> int:
    """A release patch in p2pupd's bsdiff container for a ``target``-byte
    envelope whose header declares a ``control``-byte control block and whose
    zstd body inflates to control + target zero bytes (a few KiB on disk)."""
    body = zstandard.ZstdCompressor(level=3).compressobj(size=control + target)
    parts = [encode_patch_header(target, control, 0)]
    left = control + target
    zeros = bytes(4 * MiB)
    while left:
        n = min(left, len(zeros))
        parts.append(body.compress(zeros[:n]))
        left -= n
    parts.append(body.flush())
    patch = b"".join(parts)
    ann = oci.ReleasePatch(
        ids.sha256(base_envelope), ids.sha256(b"never made"), target
    ).annotations()
    first = _with_type(put_blob(bundle, patch), oci.RELEASE_PATCH_MEDIA_TYPE, ann)
    write_layout(bundle, [release_artifact(bundle, first, [])])
    return _size(bundle)


def tiny_pack_bundle(
    bundle: Path, valid: Path, packs: int, entries: int = oci.MAX_PACK_ENTRIES
) -> int:
    """The valid bundle ``valid`` (copied) with ``packs`` more pack layers in its
    release artifact, each of ``entries`` made-up 3-byte entries."""
    _copy_tree(valid, bundle)
    index = json.loads((bundle / "index.json").read_text())
    for m in index["manifests"]:
        path = _blob_path(bundle, m["digest"])
        art = json.loads(path.read_text())
        if art["artifactType"] != oci.RELEASE_ARTIFACT:
            continue
        for k in range(packs):
            blobs = [(k * entries + i).to_bytes(3, "big") for i in range(entries)]
            d = _with_type(put_blob(bundle, oci.build_pack(blobs)), oci.PACK_MEDIA_TYPE)
            art["layers"].append(d.to_json())
        new = put_blob(bundle, json.dumps(art, sort_keys=True, separators=(",", ":")).encode())
        path.unlink()
        m["digest"], m["size"] = "sha256:" + new.digest.hex(), new.size
    (bundle / "index.json").write_text(json.dumps(index, sort_keys=True, separators=(",", ":")))
    return _size(bundle)


def json_bomb_bundle(bundle: Path, size: int, item: bytes = b"{}") -> int:
    """A bundle whose one artifact is ``size`` bytes of JSON: an object with a
    list of ``item`` repeated (``{}``: 3 bytes a value; a 10-letter string: 13)."""
    head, tail = b'{"layers":[', b"]}"
    n = max(1, (size - len(head) - len(tail)) // (len(item) + 1))
    doc = head + b",".join([item] * n) + tail
    write_layout(bundle, [put_blob(bundle, doc)])
    return _size(bundle)


def claimed_artifact_bundle(bundle: Path, claimed: int) -> int:
    """A bundle whose index lists an artifact of ``claimed`` bytes (no such blob)."""
    d = oci.Descriptor("", ids.sha256(b"absent"), claimed)
    write_layout(bundle, [d])
    return _size(bundle)


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _blob_path(bundle: Path, digest: str) -> Path:
    return bundle / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _copy_tree(src: Path, dest: Path) -> None:
    for p in src.rglob("*"):
        q = dest / p.relative_to(src)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
        else:
            q.parent.mkdir(parents=True, exist_ok=True)
            q.write_bytes(p.read_bytes())


if __name__ == "__main__":
    probe(Path(sys.argv[1]))
