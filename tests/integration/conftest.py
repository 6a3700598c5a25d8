"""Fixtures shared by integration test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from _dist import ArtifactBuildError, base_interpreter, build_artifact, this_arch


@pytest.fixture(scope="session")
def dist_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline installer artifact of this checkout, for this CPU and CPython,
    built once per session (the first build fills build/dist-cache from the index)."""
    if this_arch() is None:
        pytest.skip("the artifacts are for x86_64 and aarch64 only")
    if not base_interpreter().exists():
        pytest.skip(f"no base interpreter at {base_interpreter()}")
    try:
        return build_artifact(tmp_path_factory.mktemp("artifact"))
    except ArtifactBuildError as exc:
        pytest.fail(str(exc))
