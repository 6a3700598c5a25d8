"""The platform-variant rules (protocol/fleet/variants.py) and how gossip follows them:
install only your own, carry the other variants of the release you hold and only
that one, carry what a node one release behind needs, name releases to each peer
in words it understands."""

from __future__ import annotations

import hashlib
import random

import pytest

from p2pupd.protocol.errors import CodecError
from p2pupd.protocol.fleet.variants import (
    MAX_CARRIED_VARIANTS,
    VariantRules,
    carry_base,
    carry_blobs,
    release_key,
    split_key,
)
from p2pupd.protocol.gossip import Gossip, RequestManifest
from p2pupd.protocol.manifest import ChunkRef, Delta, FileEntry, HookRef, Manifest

X86, ARM, RISCV = "linux-x86_64", "linux-aarch64", "linux-riscv64"
RULES = VariantRules({"app": X86, "p2pupd": "linux-x86_64-cp311"})
D1, D2, D3 = (bytes([n]) * 32 for n in (1, 2, 3))


def d(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


# ----- keys and what a node installs --------------------------------------------------


def test_keys_parse_one_way() -> None:
    assert release_key("app") == "app" and split_key("app") == ("app", None)
    assert release_key("app", ARM) == "app@linux-aarch64"
    assert split_key("app@linux-aarch64") == ("app", ARM)
    for bad in ("app@", "@x", "app@a@b", "App", "app@Linux"):
        with pytest.raises(CodecError):
            split_key(bad)


def test_a_node_installs_universal_releases_and_its_own_variant_only() -> None:
    assert RULES.installs("app", None) and RULES.installs("app", X86)
    assert not RULES.installs("app", ARM)
    assert not RULES.installs("other", None)  # not configured here
    # A component may have a platform of its own (p2pupd's is per CPython too).
    assert RULES.installs("p2pupd", "linux-x86_64-cp311") and not RULES.installs("p2pupd", X86)
    arm = Manifest("app", "2", 2, 0, (), platform=ARM)
    assert RULES.key_of(arm) == "app@linux-aarch64"
    assert RULES.key_of(Manifest("app", "2", 2, 0, (), platform=X86)) == "app"
    assert RULES.key_of(Manifest("app", "1", 1, 0, ())) == "app"
    assert RULES.carried("app@linux-aarch64") == ("app", ARM)
    assert RULES.carried("app@linux-x86_64") is None  # ours, not carried
    assert RULES.carried("other@linux-aarch64") is None and RULES.carried("app") is None


def test_names_are_spoken_to_each_peer_in_its_own_words() -> None:
    # To a peer that speaks "variants": our variant with its platform, a
    # universal release bare, a carried one as it is.
    assert RULES.to_wire("app", X86, variants=True) == "app@linux-x86_64"
    assert RULES.to_wire("app", None, variants=True) == "app"
    assert RULES.to_wire("app@linux-aarch64", ARM, variants=True) == "app@linux-aarch64"
    # To an older peer: our own release bare, as always, and nothing carried.
    assert RULES.to_wire("app", X86, variants=False) == "app"
    assert RULES.to_wire("app@linux-aarch64", ARM, variants=False) is None
    # Read back: our own platform's variant is our release, another is a carried key.
    assert RULES.from_wire("app@linux-x86_64", variants=True) == "app"
    assert RULES.from_wire("app@linux-aarch64", variants=True) == "app@linux-aarch64"
    assert RULES.from_wire("app", variants=True) == "app"
    assert RULES.from_wire("other@linux-aarch64", variants=True) is None
    assert RULES.from_wire("app@linux-aarch64", variants=False) is None
    assert RULES.from_wire("app@bad@name", variants=True) is None
    # A manifest of ours is asked for by our platform (a carrier holds it so).
    assert RULES.request_key("app", variants=True) == "app@linux-x86_64"
    assert RULES.request_key("app", variants=False) == "app"
    assert RULES.request_key("app@linux-aarch64", variants=True) == "app@linux-aarch64"


def test_only_the_held_release_is_carried_and_only_so_many_variants() -> None:
    assert RULES.carry_serial(5, held=5, carried_now=0, already=False)
    assert not RULES.carry_serial(6, held=5, carried_now=0, already=False)  # not held
    assert not RULES.carry_serial(4, held=5, carried_now=0, already=False)  # superseded
    assert not RULES.carry_serial(1, held=0, carried_now=0, already=False)
    full = MAX_CARRIED_VARIANTS
    assert not RULES.carry_serial(5, held=5, carried_now=full, already=False)
    assert RULES.carry_serial(5, held=5, carried_now=full, already=True)


# ----- what is carried ----------------------------------------------------------------

A, B, C, X = (ChunkRef(d(n), 1000) for n in "abcx")
OLD = FileEntry("bin/tool", 0o755, 2000, d("old"), 0, (A, X))
NEW = FileEntry("bin/tool", 0o755, 3000, d("new"), 0, (A, B, C))
SHARED = FileEntry("share/data", 0o644, 1000, d("shared"), 0, (ChunkRef(d("s"), 1000),))
HOOK = HookRef(d("hook"), 500)
V1 = Manifest("app", "1", 1, 0, (OLD, SHARED), hooks={"health": HOOK})
PATCH = Delta("file", NEW.sha256, 3000, (OLD.sha256,), d("patch"), 120)
V2_ARM = Manifest("app", "2", 2, 0, (NEW, SHARED), platform=ARM, deltas=(PATCH,),
                  hooks={"health": HOOK})  # fmt: skip


def test_a_carrier_fetches_what_a_node_one_release_behind_needs() -> None:
    # A node of that platform at 1.0 has 1.0's files and hook: only the patch.
    assert carry_blobs(V2_ARM, V1) == {d("patch"): 120}
    # Without any earlier release: every chunk and the hook.
    full = carry_blobs(V2_ARM, None)
    assert full == {A.digest: 1000, B.digest: 1000, C.digest: 1000, d("s"): 1000, HOOK.sha256: 500}


def test_the_base_is_the_newest_earlier_release_that_platform_may_hold() -> None:
    v1_x86 = Manifest("app", "1.5", 3, 0, (), platform=X86)
    v1_arm = Manifest("app", "1.5", 3, 0, (), platform=ARM)
    newer = Manifest("app", "3", 9, 0, (), platform=ARM)
    v4 = Manifest("app", "4", 4, 0, (), platform=ARM)
    assert carry_base(ARM, 4, [V1, v1_x86]) is V1  # the x86 variant is no base for arm
    assert carry_base(ARM, 4, [V1, v1_x86, v1_arm, newer]) is v1_arm
    assert carry_base(ARM, 4, [v4, newer]) is None


# ----- gossip under the rules --------------------------------------------------------


def gossip(**kw: object) -> Gossip[str]:
    options: dict[str, object] = {"tracked": ["app"], "retry_after": 60.0, "variants": RULES}
    options.update(kw)
    return Gossip(random.Random(1), **options)  # type: ignore[arg-type]


def asked(actions: list[object]) -> list[tuple[str, str, int]]:
    return [(a.peer, a.component, a.serial) for a in actions if isinstance(a, RequestManifest)]


def test_a_variant_is_asked_for_once_this_node_holds_that_release() -> None:
    g = gossip(holdings={"app": (1, D1)})
    g.peer_joined("p", 0.0)
    # The peer announces release 2 for both platforms: ours first, the other waits.
    first = g.on_announce("p", [("app", 2, D2), ("app@linux-aarch64", 2, D3)], 0.0)
    assert asked(first) == [("p", "app", 2)]
    assert asked(g.tick(1.0)) == []
    # Ours verified: now the aarch64 variant of the same release is worth carrying.
    after = g.on_manifest_verified("app", 2, D2, 2.0)
    assert asked(after) == [("p", "app@linux-aarch64", 2)]
    g.on_manifest_verified("app@linux-aarch64", 2, D3, 3.0)
    assert g.carrying == {"app@linux-aarch64": (2, D3)}
    # What an older peer hears lists our own release only.
    assert g.announcement().entries == (("app", 2, D2),)
    assert g.holdings == {"app": (2, D2), "app@linux-aarch64": (2, D3)}


def test_a_variant_of_a_release_not_held_is_never_asked_for() -> None:
    g = gossip(holdings={"app": (2, D2)})
    g.peer_joined("p", 0.0)
    # Release 3 has no variant for us (or ours has not come): its aarch64 variant waits.
    assert asked(g.on_announce("p", [("app@linux-aarch64", 3, D3)], 0.0)) == []
    assert asked(g.tick(100.0)) == []
    # Nor is an older one carried, nor a variant of a component we do not run.
    assert asked(g.on_announce("q", [("app@linux-aarch64", 1, D1), ("db@linux-aarch64", 2, D2)],
                               101.0)) == []  # fmt: skip
    assert asked(g.on_hint("q", "db@linux-aarch64", 2, 102.0)) == []


def test_carried_variants_go_when_the_own_release_moves_on() -> None:
    g = gossip(holdings={"app": (2, D2), "app@linux-aarch64": (2, D3)})
    assert g.carrying == {"app@linux-aarch64": (2, D3)}
    g.on_manifest_verified("app", 3, D1, 0.0)
    assert g.carrying == {} and g.holdings == {"app": (3, D1)}


def test_at_most_so_many_variants_are_carried_per_component() -> None:
    rules = VariantRules({"app": X86}, max_carried=1)
    g = gossip(holdings={"app": (2, D2)}, variants=rules)
    g.peer_joined("p", 0.0)
    offer = [("app@linux-aarch64", 2, D3), ("app@linux-riscv64", 2, D1)]
    assert asked(g.on_announce("p", offer, 0.0)) == [("p", "app@linux-aarch64", 2)]
    g.on_manifest_verified("app@linux-aarch64", 2, D3, 1.0)
    assert asked(g.tick(100.0)) == []  # no room for riscv


def test_without_rules_variant_keys_are_ignored() -> None:
    g = gossip(holdings={"app": (2, D2)}, variants=None)
    g.peer_joined("p", 0.0)
    assert asked(g.on_announce("p", [("app@linux-aarch64", 2, D3)], 0.0)) == []


def test_a_manifest_for_another_platform_is_not_asked_of_that_peer_again_for_a_while() -> None:
    g = gossip(holdings={"app": (1, D1)})
    g.peer_joined("p", 0.0)
    assert asked(g.on_announce("p", [("app", 2, D2)], 0.0)) == [("p", "app", 2)]
    # An older peer's bare "app" was its own platform's variant: valid, not ours.
    assert asked(g.on_manifest_unavailable("p", "app", 2, 1.0, retry_after=600.0)) == []
    assert asked(g.tick(300.0)) == []  # past the usual retry, not past this one
    assert asked(g.tick(602.0)) == [("p", "app", 2)]


def test_spelling_remembers_the_platform_of_our_own_releases_only() -> None:
    from p2pupd.daemon.errors import NotFoundError
    from p2pupd.daemon.service.links import Spelling

    reads: list[tuple[str, int]] = []

    def from_disk(component: str, serial: int) -> Manifest:
        reads.append((component, serial))
        raise NotFoundError("not stored")

    spelling = Spelling(RULES, from_disk)
    spelling.note(Manifest("app", "2", 2, 0, (), platform=X86))  # ours (an x86 node)
    spelling.note(Manifest("app", "3", 3, 0, (), platform=ARM))  # carried for arm nodes
    assert spelling.platform_of("app", 2) == X86 and reads == []  # no disk read
    assert spelling.platform_of("app", 3) is None and reads == [("app", 3)]
