"""The rollout policy: its text form, its encoding inside the signed manifest, its budget."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pupd.protocol import encoding, ids
from p2pupd.protocol.errors import SchemaError
from p2pupd.protocol.manifest import ChunkRef, DirEntry, FileEntry, HookRef, Manifest, SymlinkEntry
from p2pupd.protocol.rollout.policy import FULL_SHARE, RolloutPolicy, Wave


def manifest(**kw: object) -> Manifest:
    base = Manifest(
        component="app",
        version="1.0",
        serial=3,
        created=1700000000,
        files=(
            FileEntry(
                "bin/app", 0o755, 5, ids.sha256(b"hello"), 1, (ChunkRef(ids.sha256(b"hello"), 5),)
            ),
        ),
        symlinks=(SymlinkEntry("lnk", "bin/app"),),
        dirs=(DirEntry("etc", 0o755, 1),),
        platform="linux-x86_64",
        hooks={"health": HookRef(ids.sha256(b"hook"), 4)},
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_parse_the_issue_example() -> None:
    p = RolloutPolicy.parse("waves=1,10%,50%,100% soak=30m halt-after=1")
    assert p.waves == (Wave(count=1), Wave(share=1000), Wave(share=5000), Wave(share=FULL_SHARE))
    assert p.soak == (1800,)
    assert p.halt_after == 1 and p.halt_ratio is None
    assert RolloutPolicy.parse(p.text()) == p


def test_parse_shorthands_and_defaults() -> None:
    p = RolloutPolicy.parse("canary=2; waves=25%,50%; soak=90s,10m,1h")
    assert [w.text() for w in p.waves] == ["2", "25%", "50%", "100%"]
    assert p.soak == (90, 600, 3600, 3600)  # one per wave but the last: the last repeats
    assert p.soak_of(0) == 90 and p.soak_of(2) == 3600
    ratio = RolloutPolicy.parse("waves=12.5% halt-after=2.5%")
    assert ratio.waves[0] == Wave(share=1250) and ratio.halt_ratio == 250
    assert RolloutPolicy.parse(ratio.text()) == ratio


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "required"),
        ("waves=10%,5%", "must grow"),
        ("waves=10%,5", "counts come before"),
        ("waves=1,1", "must grow"),
        ("waves=0", "integer in"),
        ("waves=101%", "basis points"),
        ("waves=1 soak=10x", "duration"),
        ("waves=1,2,3 soak=1m,2m,3m,4m,5m", "durations for"),
        ("waves=1 speed=fast", "unknown field"),
        ("waves=1 waves=2", "given twice"),
        ("waves", "key=value"),
        ("waves=1 halt-after=0", "integer in"),
        ("waves=1 soak=31d", "integer in"),
    ],
)
def test_parse_refuses_with_a_clear_line(text: str, words: str) -> None:
    with pytest.raises(SchemaError, match=words):
        RolloutPolicy.parse(text)


def test_budget() -> None:
    one = RolloutPolicy.parse("waves=1")
    assert not one.exceeded(0, 10) and one.exceeded(1, 10)  # default: the first failure brakes
    three = RolloutPolicy.parse("waves=1 halt-after=3")
    assert not three.exceeded(2, 2) and three.exceeded(3, 100)
    ratio = RolloutPolicy.parse("waves=1 halt-after=20%")
    assert ratio.exceeded(1, 1)  # 100 % of the one that tried
    assert not ratio.exceeded(1, 6) and ratio.exceeded(2, 10)  # 16.7 % < 20 % <= 20 %


def test_a_manifest_without_a_policy_keeps_its_exact_bytes() -> None:
    man = manifest()
    assert "rollout" not in man.to_value()
    # Pinned: the digest of this manifest's encoding before rollouts existed.
    assert ids.sha256(man.encode()).hex() == (
        "e29a7ecd6b27ae64883600b2bd763e6494dca278e5d20a51baabe3b7c08bc0e1"
    )
    assert Manifest.decode(man.encode()) == man


def test_a_manifest_carries_its_policy_signed_with_it() -> None:
    policy = RolloutPolicy.parse("waves=1,50% soak=10m halt-after=10%")
    man = manifest(rollout=policy)
    back = Manifest.decode(man.encode())
    assert back.rollout == policy and back == man
    assert man.encode() != manifest().encode()


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"waves": [], "soak": [0], "halt_after": None, "halt_ratio": None},
        {"waves": [["count", 1]], "soak": [0], "halt_after": None, "halt_ratio": None},
        {"waves": [["share", 10000]], "soak": [-1], "halt_after": None, "halt_ratio": None},
        {"waves": [["share", 10000]], "soak": [0], "halt_after": 0, "halt_ratio": None},
        {"waves": [["share", 10000]], "soak": [0], "halt_after": None, "halt_ratio": 10001},
        {"waves": [["percent", 10000]], "soak": [0], "halt_after": None, "halt_ratio": None},
        {"waves": [["share", 10000]], "soak": [0], "halt_after": None},
        {"waves": [["share", 10000]], "soak": [0], "halt_after": None, "halt_ratio": None, "x": 1},
        {"waves": [["share", 5000], ["count", 3], ["share", 10000]], "soak": [0],
         "halt_after": None, "halt_ratio": None},
    ],
)  # fmt: skip
def test_a_malformed_policy_in_a_manifest_is_refused(bad: object) -> None:
    v = manifest().to_value()
    v["rollout"] = bad
    with pytest.raises(SchemaError):
        Manifest.decode(encoding.encode(v))


waves = (
    st.lists(st.integers(1, 50), min_size=0, max_size=3, unique=True)
    .map(sorted)
    .flatmap(
        lambda counts: st.lists(st.integers(1, FULL_SHARE - 1), max_size=4, unique=True).map(
            lambda shares: tuple(
                [Wave(count=c) for c in counts]
                + [Wave(share=s) for s in sorted(shares)]
                + [Wave(share=FULL_SHARE)]
            )
        )
    )
)


@given(
    waves,
    st.lists(st.integers(0, 30 * 86400), min_size=1, max_size=1),
    st.none() | st.integers(1, 100),
    st.none() | st.integers(1, FULL_SHARE),
)
def test_text_and_value_round_trip(
    ws: tuple[Wave, ...], soak: list[int], halt_after: int | None, halt_ratio: int | None
) -> None:
    p = RolloutPolicy(ws, tuple(soak), halt_after, halt_ratio)
    assert RolloutPolicy.parse(p.text()) == p
    assert RolloutPolicy.from_value(encoding.decode(encoding.encode(p.to_value()))) == p
