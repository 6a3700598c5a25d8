"""Health checks and update hooks: what decides between commit and rollback.

Theory of operation. After the swap the new version is live but not committed.
Three checks may run, in order, each able to veto it: the release's
``post-apply`` hook, its ``health`` hook (WebAssembly modules named by sha256
in the signed manifest, run by ``hooks.HookRunner``), then the node's own
health command with its deadline. Any failure raises, and the applier swaps
the old version back and marks the release bad on this node. A ``pre-apply``
hook runs on the staged tree before the swap; its failure discards the stage.

Every hook run, passing or not, is logged (event ``hook``) and recorded in the
component's history (event ``hook``) with the tail of its stdout and stderr, so
an operator can read why a hook refused a release after the fact; the failure
itself is then recorded by the applier (``refused`` or ``health-failed``).
Hook limits are the node's (``NodeConfig.hooks``), never the release's.

The seam is ``HealthCheck``: any callable ``(config, manifest) -> None`` that
raises ``HealthCheckFailedError``. ``run_health_command`` is the default;
tests and other policies plug in their own.

The health command runs in its own process group with stdin closed and its
output going to an unlinked temp file (so a chatty command cannot fill memory);
on time-out the whole group is killed, so a shell's children cannot keep it
alive past the deadline. The last line of its output explains a failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from p2pupd.daemon.errors import HealthCheckFailedError, HookError, StorageError
from p2pupd.daemon.events import log
from p2pupd.daemon.fsutil import storage_error
from p2pupd.daemon.state import components
from p2pupd.daemon.state.statedir import ComponentConfig
from p2pupd.protocol.manifest import Manifest

if TYPE_CHECKING:
    from p2pupd.daemon.apply.hooks import HookResult, HookRunner
    from p2pupd.daemon.state.node import Node

HealthCheck = Callable[[ComponentConfig, Manifest], None]

OUTPUT_TAIL_BYTES = 4096
# Per stream, in a hook's history entry: the history holds up to HISTORY_LIMIT
# entries in one document, so it keeps tails, not the whole captured output.
HOOK_HISTORY_OUTPUT_CHARS = 1024


def run_health_command(cfg: ComponentConfig, man: Manifest) -> None:
    """Run the component's health command with its deadline.

    Raises ``HealthCheckFailedError`` on a non-zero exit, a time-out, or a
    command that cannot be started. No command configured: passes.
    """
    if not cfg.health_cmd:
        return
    env = dict(os.environ)
    env.update(
        P2PUPD_COMPONENT=cfg.name,
        P2PUPD_VERSION=man.version,
        P2PUPD_SERIAL=str(man.serial),
        P2PUPD_TARGET=str(cfg.target),
        P2PUPD_KIND=cfg.kind,
    )
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                list(cfg.health_cmd),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise HealthCheckFailedError(
                f"health check could not start: {exc.strerror or exc}"
            ) from None
        try:
            rc = proc.wait(timeout=cfg.health_seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise HealthCheckFailedError(
                f"health check timed out after {cfg.health_seconds:g}s"
            ) from None
        except BaseException:
            _kill_group(proc)
            raise
        if rc != 0:
            raise HealthCheckFailedError(f"health check exited with {rc}{_tail(out)}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(out: IO[bytes]) -> str:
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - OUTPUT_TAIL_BYTES))
    lines = out.read().decode(errors="replace").strip().splitlines()
    return f": {lines[-1][:200]}" if lines else ""


class Hooks:
    """Runs a release's WebAssembly hooks for one node (the runner is made on first use)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._runner: HookRunner | None = None

    def run(
        self,
        point: str,
        cfg: ComponentConfig,
        man: Manifest,
        tree: Path,
        old: str | None,
        view: Path | None = None,
    ) -> HookResult | None:
        """Run hook ``point`` of ``man`` over ``tree`` if the release has one.

        ``tree`` is a directory, or the image of a file target: then shown to
        the hook as the only file of the directory ``view`` (made and removed
        here; beside the image, for the hard link). Returns the result, or
        ``None`` when there is no such hook. Raises ``HookError`` when the hook
        fails (reason included) and ``NotFoundError`` if its module is not stored.
        """
        ref = man.hooks.get(point)
        if ref is None:
            return None
        from p2pupd.daemon.apply.hooks import (  # wasmtime loads only when a hook runs
            HookRunner,
            hook_env,
        )

        module = self.node.store.get_bytes(ref.sha256)
        if self._runner is None:
            limits = self.node.config.hooks
            self._runner = HookRunner(
                self.node.state.cache_dir / "hooks", limits.fuel, limits.memory_bytes,
                limits.seconds,
            )  # fmt: skip
        with contextlib.ExitStack() as stack:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="p2pupd-hook-")))
            if not tree.is_dir():
                where = view or tree.parent / f".{tree.name}.p2pupd-hookview"
                tree = stack.enter_context(_file_view(tree, man, where))
            result = self._runner.run(
                point, module, ref.sha256, tree, scratch, hook_env(cfg.name, old, man.version)
            )
        self._record(cfg, man, result)
        if not result.ok:
            raise HookError(f"{point} hook: {result.reason}")
        return result

    def _record(self, cfg: ComponentConfig, man: Manifest, result: HookResult) -> None:
        """Log ``result`` and add it, with its output's tails, to the component's history."""
        log(
            "hook", component=cfg.name, serial=man.serial, point=result.point, ok=result.ok,
            reason=result.reason, seconds=result.seconds, fuel=result.fuel_used,
            cached=result.cached, stdout=result.stdout or None, stderr=result.stderr or None,
        )  # fmt: skip
        verdict = "passed" if result.ok else "failed"
        detail = f"{result.point} hook {verdict}: {result.reason} ({result.seconds:.2f}s)"
        for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
            if text.strip():
                detail += f"\n{name}: {_tail_chars(text.strip(), HOOK_HISTORY_OUTPUT_CHARS)}"
        try:
            components.hook_ran(self.node, cfg.name, man, detail)
        except StorageError as exc:  # the verdict matters more than its record
            log("hook-record-failed", logging.WARNING, component=cfg.name, reason=str(exc))


def _tail_chars(text: str, limit: int) -> str:
    """Return the last ``limit`` characters of ``text``, marked when cut."""
    return text if len(text) <= limit else "…" + text[-limit:]


@contextlib.contextmanager
def _file_view(image: Path, man: Manifest, view: Path) -> Iterator[Path]:
    """Yield the directory ``view`` holding ``image`` (hard link) under its manifest name."""
    try:
        shutil.rmtree(view, ignore_errors=True)
        view.mkdir(mode=0o700)
        os.link(image, view / man.files[0].path.rpartition("/")[2])
    except OSError as exc:
        shutil.rmtree(view, ignore_errors=True)
        raise storage_error(exc, "prepare hook view of", image) from None
    try:
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)
