"""Issue 13: what an unverified input may cost, measured as the attack grows.

Each attack is scaled to three sizes and refused through the real import (or
decoder) in a fresh process whose peak RSS is measured (``_hostile.measure``);
each figure is asserted against the budget the code states (``protocol/limits.py``,
docs/security-model.md). Where the budget is fixed the cost must not grow with
the attack at all; where the input is legitimately read whole (a release
envelope, an artifact) it may grow with the bytes read, by a small stated
factor, never with what those bytes decode or decompress to. Every refusal
leaves the node's state as it was. ``-s`` prints the table.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _hostile import (
    Cost,
    bsdiff_bomb_bundle,
    claimed_artifact_bundle,
    json_bomb_bundle,
    measure,
    nested_maps,
    patched_envelope_bundle,
    put_blob,
    release_artifact,
    tiny_pack_bundle,
    write_layout,
)
from _kit import Site, cli

from p2pupd.protocol import bundle as oci
from p2pupd.protocol import limits
from p2pupd.protocol.trust import Envelope

MiB = limits.MiB
BASE_MIB = 24  # what any refusal may cost on top: reading the node, one 1-4 MiB buffer


@dataclass
class Node:
    site: Site
    state: Path
    base_envelope: bytes  # the v1 envelope the node stores: a patch base
    valid_v2: Path  # an honest bundle of v2
    work: Path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("hostile")
    site = Site(base / "site")
    site.publish("1.0", {"bin/tool": b"#!/bin/sh\necho 1\n", "data/a": b"a" * 40_000})
    v1 = site.bundle("v1")
    state, _ = site.node("n1")
    cli("import", "--state-dir", state, v1)
    site.publish("2.0", {"bin/tool": b"#!/bin/sh\necho 2\n", "data/a": b"b" * 40_000})
    env = (state / "releases" / "app" / "1.msgpack").read_bytes()
    yield Node(site, state, env, site.bundle("v2"), base / "work")


def snapshot(state: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(state)): p.read_bytes()
        for p in sorted(state.rglob("*"))
        if p.is_file() and p.name != "lock" and "cache" not in p.parts
    }


def run(node: Node, jobs: list[tuple[str, str, Path]]) -> list[Cost]:
    """Refuse each (name, op, path) in one probe process; the state must not change."""
    node.work.mkdir(exist_ok=True)
    before = snapshot(node.state)
    costs = measure(
        [{"name": n, "op": op, "path": str(p), "state": str(node.state)} for n, op, p in jobs],
        node.work,
    )
    assert snapshot(node.state) == before
    for c in costs:
        print(f"  {c.job:<34} peak +{c.peak_mib:7.1f} MiB  {c.seconds:6.2f} s  {c.error[:90]}")
    return costs


def fresh(node: Node, name: str) -> Path:
    p = node.work / name
    shutil.rmtree(p, ignore_errors=True)
    return p


def test_nested_maps_in_a_patched_envelope_cost_only_their_bytes(node: Node) -> None:
    """The issue's 32 KB stick: a zstd release patch rebuilding MiBs of nested
    maps (9.1 GB and 121 s on main). The envelope decoder builds at most ~330
    values, so the rebuilt bytes are all it costs: 1-2x their size."""
    jobs, sticks = [], {}
    for mib in (2, 8, 32):
        b = fresh(node, f"nested-{mib}")
        sticks[mib] = patched_envelope_bundle(b, node.base_envelope, nested_maps(mib * MiB))
        jobs.append((f"nested maps, rebuilt {mib} MiB", "import", b))
    for cost, mib in zip(run(node, jobs), (2, 8, 32), strict=True):
        assert "envelope exceeds its decode budget" in cost.error, cost
        assert sticks[mib] < 64 * 1024 + mib * MiB // 100  # the stick stays tiny
        assert cost.peak_mib <= 2 * mib + BASE_MIB, cost


def test_whole_envelope_of_nested_maps_costs_nothing_to_show_or_import(node: Node) -> None:
    """Read whole (no patch), such an envelope costs its bytes read, whatever it nests."""
    jobs = []
    for mib in (1, 4, 16):
        b = fresh(node, f"whole-{mib}")
        first = put_blob(b, nested_maps(mib * MiB))
        first = oci.Descriptor(oci.RELEASE_MEDIA_TYPE, first.digest, first.size)
        write_layout(b, [release_artifact(b, first, [])])
        jobs += [(f"whole envelope {mib} MiB: import", "import", b)]
        jobs += [(f"whole envelope {mib} MiB: show", "show", b)]
    for cost, mib in zip(run(node, jobs), (1, 1, 4, 4, 16, 16), strict=True):
        assert "decode budget" in cost.error, cost
        assert cost.peak_mib <= 2 * mib + BASE_MIB, cost


def test_zstd_patch_bomb_is_bounded_by_the_target_not_the_header(node: Node) -> None:
    """The 84 KB stick (3.4 GB on main): a bsdiff-container release patch whose
    header declares a huge control block. Decompression is bounded before it
    starts at 3x the annotated target; a larger declaration is refused from
    the header, so the cost is flat however big the bomb claims to be."""
    target = 8 * MiB
    jobs = []
    for factor in (1, 8, 24):
        b = fresh(node, f"zbomb-{factor}")
        bsdiff_bomb_bundle(b, node.base_envelope, target, factor * target // 24 * 24)
        jobs.append((f"patch bomb, control {factor}x target", "import", b))
    costs = run(node, jobs)
    assert "does not apply" in costs[0].error and "inconsistent" not in costs[0].error
    assert all("header sizes are inconsistent" in c.error for c in costs[1:])
    for cost in costs:
        assert cost.peak_mib <= 4 * target // MiB + BASE_MIB, cost


def test_tiny_pack_entries_cost_one_pack(node: Node) -> None:
    """The 32 MB stick of tiny pack entries (2.3 GB, 57 s on main): packs are
    read only once their release verified, and the first entry that is not a
    blob the signed manifest names ends the parse."""
    jobs = []
    for packs in (8, 32, 128):
        b = fresh(node, f"packs-{packs}")
        tiny_pack_bundle(b, node.valid_v2, packs)
        jobs.append((f"{packs} packs of 16384 tiny entries", "import", b))
    for packs in (256, 1024, 4096):  # packs no longer than the manifest's blob list
        b = fresh(node, f"small-packs-{packs}")
        tiny_pack_bundle(b, node.valid_v2, packs, entries=2)
        jobs.append((f"{packs} packs of 2 tiny entries", "import", b))
    costs = run(node, jobs)
    for cost in costs[:3]:
        assert "more than the 4 blobs it may hold" in cost.error, cost
    for cost in costs[3:]:
        assert "is not part of the signed release" in cost.error, cost
    for cost in costs:
        assert cost.peak_mib <= BASE_MIB, cost


def test_json_bomb_is_refused_while_it_is_scanned(node: Node) -> None:
    """The 257 MB stick of empty JSON objects (6.9 GB on main): values are
    counted block by block before anything is parsed, so the refusal costs one
    block; a claimed size over the limit costs nothing at all."""
    jobs = []
    for mib in (4, 16, 48):
        b = fresh(node, f"json-{mib}")
        json_bomb_bundle(b, mib * MiB)
        jobs.append((f"JSON of empty objects, {mib} MiB", "import", b))
    b = fresh(node, "json-claimed")
    claimed_artifact_bundle(b, 1 << 30)
    jobs.append(("artifact claiming 1 GiB", "import", b))
    costs = run(node, jobs)
    for cost in costs[:3]:
        assert "JSON values (its limit)" in cost.error, cost
        assert cost.peak_mib <= BASE_MIB, cost
    assert "oversized artifact" in costs[3].error and costs[3].peak_mib <= BASE_MIB


def test_json_as_dense_as_allowed_costs_what_an_honest_document_would(node: Node) -> None:
    """JSON just under the value density an honest artifact has (a 10-letter
    string a value) is parsed, then refused: it may cost what an honest
    artifact of its size costs, about 7x its bytes, never more."""
    jobs = []
    for mib in (2, 8, 32):
        b = fresh(node, f"jsonedge-{mib}")
        json_bomb_bundle(b, mib * MiB, item=b'"aaaaaaaaaa"')
        jobs.append((f"JSON of short strings, {mib} MiB", "import", b))
    for cost, mib in zip(run(node, jobs), (2, 8, 32), strict=True):
        assert "artifact" in cost.error, cost
        assert cost.peak_mib <= 8 * mib + BASE_MIB, cost


def test_decoders_refuse_nested_maps_at_a_fixed_cost(node: Node) -> None:
    """The decoders on their own, fed the nested maps as an envelope, a wire
    frame (at most 4 MiB) and a request file: the cost is the input's bytes
    and a budget that does not grow with them."""
    node.work.mkdir(exist_ok=True)
    jobs = []
    for mib in (1, 4, 16):
        p = node.work / f"nested-{mib}.msgpack"
        p.write_bytes(nested_maps(mib * MiB))
        jobs.append((f"envelope decoder, {mib} MiB", "envelope", p))
        jobs.append((f"request decoder, {mib} MiB", "request", p))
    for kib in (64, 1024, 4095):
        p = node.work / f"frame-{kib}.msgpack"
        p.write_bytes(nested_maps(kib * 1024))
        jobs.append((f"frame decoder, {kib} KiB", "frame", p))
    costs = run(node, jobs)
    for cost in costs:
        assert cost.error, cost
        assert cost.peak_mib <= 2 * 16 + BASE_MIB if "frame" not in cost.job else BASE_MIB, cost
    assert (
        max(c.peak_mib for c in costs if "frame" in c.job) <= limits.FRAME_BUDGET.memory_bytes / MiB
    )


def test_refusals_at_the_command_line_are_one_line_exit_3(node: Node) -> None:
    """The same bundles through ``p2pupd import``: one line, exit 3, no traceback."""
    from p2pupd.tools.cli import main

    b = fresh(node, "cli-nested")
    patched_envelope_bundle(b, node.base_envelope, nested_maps(1 * MiB))
    c = fresh(node, "cli-json")
    json_bomb_bundle(c, 2 * MiB)
    d = fresh(node, "cli-packs")
    tiny_pack_bundle(d, node.valid_v2, 2)
    for bundle in (b, c, d):
        code = main(["import", "--state-dir", str(node.state), str(bundle)])
        assert code == 3


def test_honest_bundles_still_import(node: Node) -> None:
    """The budgets leave honest input alone: v2 imports after every refusal above."""
    before = Envelope.decode((node.state / "releases" / "app" / "1.msgpack").read_bytes(), 1 << 20)
    cli("import", "--state-dir", node.state, node.valid_v2)
    assert (node.state / "releases" / "app" / "2.msgpack").exists()
    assert before.payload
