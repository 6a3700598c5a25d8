"""The rollout policy a publisher puts in a signed release: waves, soak, failure budget.

A policy says how a release spreads through a site:

* **waves**: cumulative sizes, each an absolute count of nodes (``1``) or a
  share of them (``10%``, two decimals at most: stored in basis points). Sizes
  are counted *per platform* (see ``waves``), so ``1`` gives every platform
  its own canary. The last wave is always 100 %; counts come before shares
  and each grows on the one before.
* **soak**: how long every node of a wave must have run the release,
  committed, before the next wave starts (seconds; one value for all waves or
  one per wave but the last, whose soak has nothing to hold back).
* **failure budget**: the brake is pulled when failed nodes reach
  ``halt_after`` (a count), or when failures reach ``halt_ratio`` basis points
  of the nodes that tried the release. With neither given, one failure brakes.

The policy travels inside the release manifest (``Manifest.rollout``), so it
is signed by the release role with everything else; a release without one
spreads as before (every node applies on arrival). ``parse`` reads the
``publish --rollout`` text form; ``from_value`` checks a decoded one and
raises ``SchemaError`` for anything out of shape or bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from p2pupd.protocol.errors import SchemaError

FULL_SHARE = 10_000  # basis points: 100 %
MAX_WAVES = 16
MAX_WAVE_COUNT = 10_000  # nodes; a site is bounded at 10,000 anyway
MAX_SOAK_SECONDS = 30 * 24 * 3600
_DURATION = re.compile(r"(\d{1,7})(s|m|h|d)?")
_SHARE = re.compile(r"(\d{1,3})(?:\.(\d{1,2}))?%")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


@dataclass(frozen=True)
class Wave:
    """One wave's cumulative size: ``count`` nodes, or ``share`` basis points of them."""

    count: int | None = None
    share: int | None = None

    def size(self, nodes: int) -> int:
        """How many of ``nodes`` (one platform's) this wave reaches, cumulatively."""
        if self.count is not None:
            return min(nodes, self.count)
        assert self.share is not None
        return -(-self.share * nodes // FULL_SHARE)  # ceil without floats

    def text(self) -> str:
        if self.count is not None:
            return str(self.count)
        assert self.share is not None
        whole, frac = divmod(self.share, 100)
        return f"{whole}%" if not frac else f"{whole}.{frac:02d}".rstrip("0") + "%"


@dataclass(frozen=True)
class RolloutPolicy:
    """See the module docstring. Build with ``parse`` or ``from_value`` (both check)."""

    waves: tuple[Wave, ...]
    soak: tuple[int, ...]  # seconds per wave; the last wave's is unused
    halt_after: int | None = None
    halt_ratio: int | None = None  # basis points

    def __post_init__(self) -> None:
        _check(self)

    def soak_of(self, wave: int) -> int:
        """Seconds wave ``wave`` must run committed before the next one starts."""
        return self.soak[min(wave, len(self.soak) - 1)]

    def exceeded(self, failures: int, attempted: int) -> bool:
        """True when ``failures`` (of ``attempted`` nodes that tried) exceed the budget."""
        if failures <= 0:
            return False
        if self.halt_after is None and self.halt_ratio is None:
            return True
        if self.halt_after is not None and failures >= self.halt_after:
            return True
        if self.halt_ratio is not None:
            return failures * FULL_SHARE >= self.halt_ratio * max(attempted, failures)
        return False

    def text(self) -> str:
        """The ``publish --rollout`` form of this policy (``parse`` reads it back)."""
        parts = ["waves=" + ",".join(w.text() for w in self.waves)]
        soaks = set(self.soak[: max(1, len(self.waves) - 1)])
        if len(soaks) == 1:
            parts.append(f"soak={_duration_text(self.soak[0])}")
        else:
            parts.append("soak=" + ",".join(_duration_text(s) for s in self.soak))
        if self.halt_after is not None:
            parts.append(f"halt-after={self.halt_after}")
        if self.halt_ratio is not None:
            parts.append(f"halt-after={Wave(share=self.halt_ratio).text()}")
        return " ".join(parts)

    # -- encoding (inside the manifest) ----------------------------------------

    def to_value(self) -> dict[str, Any]:
        return {
            "waves": [["count", w.count] if w.count is not None else ["share", w.share]
                      for w in self.waves],
            "soak": list(self.soak),
            "halt_after": self.halt_after,
            "halt_ratio": self.halt_ratio,
        }  # fmt: skip

    @classmethod
    def from_value(cls, v: Any) -> RolloutPolicy:
        """Build a policy from a decoded value; ``SchemaError`` on a bad shape or bound."""
        if not isinstance(v, dict) or set(v) != {"waves", "soak", "halt_after", "halt_ratio"}:
            raise SchemaError("rollout policy must be a map of waves, soak, halt_after, halt_ratio")
        waves_v, soak_v = v["waves"], v["soak"]
        if not isinstance(waves_v, list) or not 1 <= len(waves_v) <= MAX_WAVES:
            raise SchemaError(f"rollout waves must be a list of 1 to {MAX_WAVES}")
        waves: list[Wave] = []
        for w in waves_v:
            if not isinstance(w, list) or len(w) != 2 or w[0] not in ("count", "share"):
                raise SchemaError("rollout wave must be ['count', n] or ['share', basis points]")
            n = _int(
                w[1], "rollout wave size", 1, MAX_WAVE_COUNT if w[0] == "count" else FULL_SHARE
            )
            waves.append(Wave(count=n) if w[0] == "count" else Wave(share=n))
        if not isinstance(soak_v, list) or not 1 <= len(soak_v) <= MAX_WAVES:
            raise SchemaError(f"rollout soak must be a list of 1 to {MAX_WAVES} durations")
        soak = tuple(_int(s, "rollout soak", 0, MAX_SOAK_SECONDS) for s in soak_v)
        ha, hr = v["halt_after"], v["halt_ratio"]
        return cls(
            waves=tuple(waves),
            soak=soak,
            halt_after=None if ha is None else _int(ha, "rollout halt_after", 1, MAX_WAVE_COUNT),
            halt_ratio=None if hr is None else _int(hr, "rollout halt_ratio", 1, FULL_SHARE),
        )

    @classmethod
    def parse(cls, text: str) -> RolloutPolicy:
        """Read the ``publish --rollout`` form, e.g. ``waves=1,10%,50%,100% soak=30m halt-after=1``.

        Fields are separated by blanks or ``;``; ``canary=N`` is shorthand for a
        first wave of N nodes. A missing final 100 % wave is added. Raises
        ``SchemaError`` naming what is wrong.
        """
        waves: list[Wave] = []
        canary: int | None = None
        soak: tuple[int, ...] = (0,)
        halt_after: int | None = None
        halt_ratio: int | None = None
        seen: set[str] = set()
        for item in re.split(r"[;\s]+", text.strip()):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not value:
                raise SchemaError(f"rollout: {item!r:.40} is not key=value")
            kind = key + ("%" if key == "halt-after" and value.endswith("%") else "")
            if kind in seen:  # halt-after may be given once as a count, once as a ratio
                raise SchemaError(f"rollout: {key} given twice")
            seen.add(kind)
            if key == "waves":
                waves = [_parse_wave(x) for x in value.split(",")]
            elif key == "canary":
                canary = _int(_parse_int(value, key), "rollout canary", 1, MAX_WAVE_COUNT)
            elif key == "soak":
                soak = tuple(_parse_duration(x) for x in value.split(","))
            elif key == "halt-after":
                if value.endswith("%"):
                    share = _parse_wave(value).share
                    assert share is not None
                    halt_ratio = share
                else:
                    halt_after = _int(_parse_int(value, key), "rollout halt-after", 1,
                                      MAX_WAVE_COUNT)  # fmt: skip
            else:
                raise SchemaError(
                    f"rollout: unknown field {key!r:.20} (waves, canary, soak, halt-after)"
                )
        if canary is not None:
            if waves and waves[0] != Wave(count=canary):
                waves.insert(0, Wave(count=canary))
            elif not waves:
                waves = [Wave(count=canary)]
        if not waves:
            raise SchemaError("rollout: waves=... (or canary=N) is required")
        if waves[-1] != Wave(share=FULL_SHARE):
            waves.append(Wave(share=FULL_SHARE))
        if len(soak) not in (1, len(waves) - 1, len(waves)):
            raise SchemaError(
                f"rollout: soak gives {len(soak)} durations for {len(waves)} waves "
                f"(give one, or one per wave but the last)"
            )
        if len(soak) == len(waves) - 1 and len(soak) > 1:
            soak = (*soak, soak[-1])
        return cls(tuple(waves), soak, halt_after, halt_ratio)


def _check(p: RolloutPolicy) -> None:
    if not 1 <= len(p.waves) <= MAX_WAVES or not 1 <= len(p.soak) <= MAX_WAVES:
        raise SchemaError(f"rollout: 1 to {MAX_WAVES} waves and soak durations")
    if p.waves[-1] != Wave(share=FULL_SHARE):
        raise SchemaError("rollout: the last wave must be 100%")
    last_count, last_share, shares_started = 0, 0, False
    for w in p.waves:
        if (w.count is None) == (w.share is None):
            raise SchemaError("rollout: a wave is a count or a share, not both")
        if w.count is not None:
            if shares_started:
                raise SchemaError("rollout: node counts come before percentages in waves")
            if not last_count < w.count <= MAX_WAVE_COUNT:
                raise SchemaError("rollout: wave counts must grow (1 to 10000)")
            last_count = w.count
        else:
            assert w.share is not None
            shares_started = True
            if not last_share < w.share <= FULL_SHARE:
                raise SchemaError("rollout: wave percentages must grow, up to 100%")
            last_share = w.share
    if any(not 0 <= s <= MAX_SOAK_SECONDS for s in p.soak):
        raise SchemaError("rollout: soak must be 0 to 30 days")
    if p.halt_after is not None and not 1 <= p.halt_after <= MAX_WAVE_COUNT:
        raise SchemaError("rollout: halt-after must be 1 to 10000 failures")
    if p.halt_ratio is not None and not 1 <= p.halt_ratio <= FULL_SHARE:
        raise SchemaError("rollout: halt-after ratio must be 0.01% to 100%")


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise SchemaError(f"{what} must be an integer in [{lo}, {hi}]")
    return v


def _parse_int(text: str, key: str) -> int:
    if not text.isdigit() or len(text) > 7:
        raise SchemaError(f"rollout: {key}={text!r:.20} is not a whole number")
    return int(text)


def _parse_wave(text: str) -> Wave:
    m = _SHARE.fullmatch(text)
    if m:
        bp = int(m.group(1)) * 100 + int((m.group(2) or "0").ljust(2, "0"))
        return Wave(share=_int(bp, "rollout wave percentage (basis points)", 1, FULL_SHARE))
    return Wave(count=_int(_parse_int(text, "wave"), "rollout wave count", 1, MAX_WAVE_COUNT))


def _parse_duration(text: str) -> int:
    m = _DURATION.fullmatch(text)
    if not m:
        raise SchemaError(f"rollout: soak {text!r:.20} is not a duration like 90s, 10m, 2h, 1d")
    return _int(int(m.group(1)) * _UNIT[m.group(2)], "rollout soak", 0, MAX_SOAK_SECONDS)


def _duration_text(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
