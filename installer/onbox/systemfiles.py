"""The files outside the version directory: the systemd unit, the udev rule,
the config (only when absent), the state dir and the PATH link; and telling a
running systemd and udev about them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from layout import DEFAULT_PREFIX, Layout, write_atomic
from preflight import RefusedError

UNIT_NAME = "p2pupd.service"
UDEV_NAME = "99-p2pupd-usb.rules"
STATE_DIR = "/var/lib/p2pupd"


def render_unit(text: str, lay: Layout) -> str:
    """The unit with ExecStart naming this prefix's ``current`` launcher, and the
    prefix among the paths the daemon may write (it updates itself there)."""
    default = f"{DEFAULT_PREFIX}/current/bin/p2pupd"
    if f"ExecStart={default} " not in text:
        raise RefusedError(f"systemd/{UNIT_NAME} in the artifact does not start {default}")
    lines = []
    for line in text.replace(default, lay.command).splitlines(keepends=True):
        if line.startswith("ReadWritePaths="):
            key, _, paths = line.rstrip("\n").partition("=")
            line = key + "=" + " ".join(
                lay.prefix if p == DEFAULT_PREFIX else p for p in paths.split()
            ) + "\n"
        lines.append(line)
    return "".join(lines)


def install_system_files(lay: Layout, artifact: Path, unit: str | None, udev: bool) -> list[str]:
    """The unit (``render_unit``'s text, if any), udev rule, config (only if
    absent) and state dir; returns what changed, in words."""
    done: list[str] = []
    src = artifact / "systemd"
    unit_path = lay.at(f"/etc/systemd/system/{UNIT_NAME}")
    if unit is not None and write_atomic(unit_path, unit.encode(), 0o644):
        done.append(f"wrote /etc/systemd/system/{UNIT_NAME}")
    if udev:
        rule = (src / UDEV_NAME).read_bytes()
        if write_atomic(lay.at(f"/etc/udev/rules.d/{UDEV_NAME}"), rule, 0o644):
            done.append(f"wrote /etc/udev/rules.d/{UDEV_NAME}")
    config = lay.at("/etc/p2pupd/config.toml")
    if not config.exists():
        write_atomic(config, (src / "config.toml").read_bytes(), 0o644)
        done.append("wrote /etc/p2pupd/config.toml")
    state = lay.at(STATE_DIR)
    if not state.exists():
        state.mkdir(parents=True, mode=0o700)
        state.chmod(0o700)
        done.append(f"created {STATE_DIR} (0700)")
    return done


def reload_services(lay: Layout, changed: list[str]) -> list[str]:
    """Tell a running systemd and udev about new files (only on the real root)."""
    notes: list[str] = []
    if lay.root != Path("/"):
        return notes

    def run(*argv: str) -> None:
        if shutil.which(argv[0]) is None:
            return
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if r.returncode != 0:
            notes.append(f"warning: {' '.join(argv)}: {r.stderr.strip() or r.returncode}")

    systemd_up = Path("/run/systemd/system").is_dir()
    if systemd_up and any(UNIT_NAME in c for c in changed):
        run("systemctl", "daemon-reload")
    if any(UDEV_NAME in c for c in changed):
        run("udevadm", "control", "--reload")
    if systemd_up and shutil.which("systemctl"):
        active = subprocess.run(
            ["systemctl", "is-active", "--quiet", UNIT_NAME], timeout=60, check=False
        )
        if active.returncode == 0:
            notes.append(f"the daemon still runs the old version: systemctl restart {UNIT_NAME}")
    return notes
