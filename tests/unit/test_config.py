"""The TOML configuration file: every option, defaults, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pupd.daemon.config import FileConfig, load_config
from p2pupd.daemon.errors import ConfigError

FULL = """
[node]
state_dir = "/srv/p2pupd"

[network]
listen = "169.254.77.1:7707"
peers = ["10.0.0.5:7707", "[fe80::1]:7707"]
mdns = false
mdns_interfaces = ["169.254.77.1"]
bandwidth_limit = "5M"
gossip_interval = 10
peer_timeout = 600
max_peers = 40
view_target = 8
view_max = 12
passive_view = 100
per_host = 4
mdns_beacons = 3

[import]
watch = ["/media", "/run/media"]

[metrics]
listen = "127.0.0.1:9477"

[log]
level = "debug"
"""


def test_full_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(FULL)
    c = load_config(p)
    assert c == FileConfig(
        state_dir=Path("/srv/p2pupd"),
        listen="169.254.77.1:7707",
        peers=("10.0.0.5:7707", "[fe80::1]:7707"),
        mdns=False,
        mdns_interfaces=("169.254.77.1",),
        bandwidth_limit="5M",
        gossip_interval=10.0,
        peer_timeout=600.0,
        max_peers=40,
        view_target=8,
        view_max=12,
        passive_view=100,
        per_host=4,
        mdns_beacons=3,
        watch=(Path("/media"), Path("/run/media")),
        metrics_listen="127.0.0.1:9477",
        log_level="debug",
    )


def test_absent_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "none.toml") == FileConfig()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml", required=True)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[nettwork]\nmdns = true\n", "unknown section [nettwork]"),
        ("[network]\nmdsn = true\n", "unknown option network.mdsn"),
        ("[network]\nmdns = 'yes'\n", "network.mdns has the wrong type"),
        ("[network]\npeers = [1, 2]\n", "network.peers must be a list of strings"),
        ("[log]\nlevel = 'loud'\n", "[log] level must be one of"),
        ("[network\n", "not valid TOML"),
        ("[network]\ngossip_interval = 0\n", "gossip_interval must be positive"),
        ("[network]\ngossip_interval = true\n", "wrong type"),
        ("[network]\npeer_timeout = 0.5\n", "peer_timeout must be between 1 and 3600"),
        ("[network]\npeer_timeout = 7200\n", "peer_timeout must be between 1 and 3600"),
    ],
)
def test_bad_files_are_refused_clearly(tmp_path: Path, text: str, words: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert words in str(exc.value)
    assert str(p) in str(exc.value)


def test_shipped_example_config_is_valid_and_documents_every_option() -> None:
    from p2pupd.daemon.config import _SCHEMA

    example = Path(__file__).resolve().parents[2] / "tools" / "systemd" / "config.toml"
    load_config(example, required=True)
    text = example.read_text()
    for section, keys in _SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} = " in text, f"{section}.{key} is not documented in the example"


def test_rollout_section(tmp_path: Path) -> None:
    key = "ab" * 32
    p = tmp_path / "c.toml"
    p.write_text(f'[rollout]\noperators = ["{key}"]\nreport_interval = 5\nsettle = 2\n')
    cfg = load_config(p).rollout
    assert cfg is not None and cfg.operators == (bytes.fromhex(key),)
    assert cfg.report_interval == 5.0 and cfg.settle == 2.0 and cfg.live is None
    for bad, words in (
        ('operators = ["abc"]', "not a node key"),
        ("settle = 0", "must be positive"),
        ("live = -1", "automatic"),
    ):
        p.write_text(f"[rollout]\n{bad}\n")
        with pytest.raises(ConfigError, match=words):
            load_config(p)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[network]\nmax_peers = 100000\n", "max_peers must be between"),
        ("[network]\nview_max = 1\n", "view_max must be between"),
        ("[network]\nview_target = 20\nview_max = 10\n", "view_target must not exceed view_max"),
        ("[network]\nper_host = 0\n", "per_host must be between"),
        ('[network]\nmdns_beacons = "many"\n', "wrong type"),
    ],
)
def test_peer_bounds_are_checked(tmp_path: Path, text: str, words: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(p)
