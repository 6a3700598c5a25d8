"""The dependency rules of DESIGN.md, enforced by walking imports.

* protocol/ is pure: no sockets, files, clocks, threads, trio, zeroconf or
  wasmtime, and it imports neither daemon nor tools;
* daemon/ is in rooms and arrows point down the table ``MAY_IMPORT``; it never
  imports tools;
* tools/ reaches the daemon only through ``p2pupd.daemon.api`` (benchmarks,
  which measure daemon parts directly, excepted);
* no import cycle anywhere among our modules, counting lazy imports inside
  functions and ``TYPE_CHECKING`` imports: a cycle there is a cycle in design;
* the size rules of the layout: daemon/ root at most 10 modules, no folder
  over 16.

Every import is read from the source (``ast``), whatever its level or place.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"protocol": "p2pupd.protocol", "daemon": "p2pupd.daemon", "tools": "p2pupd.tools"}
FORBIDDEN_IN_PROTOCOL = {
    "os",
    "io",
    "socket",
    "select",
    "selectors",
    "subprocess",
    "threading",
    "asyncio",
    "time",
    "pathlib",
    "shutil",
    "tempfile",
    "trio",
    "zeroconf",
    "wasmtime",
    "fcntl",
    "signal",
    "multiprocessing",
    "urllib",
    "http",
    "ssl",
    "datetime",
    "glob",
}

# daemon/'s rooms. A module's room is its folder, or for the root modules the
# name given here. Each room may import itself and the rooms listed.
ROOT_ROOMS = {
    "errors": "ground",
    "events": "ground",
    "offload": "ground",
    "heap": "ground",
    "fsutil": "ground",
    "config": "ground",
    "ops": "ops",
    "ctl": "ops",
    "api": "api",
    "__init__": "ground",
}
_GROUND = {"ground"}
_STORE = _GROUND | {"store"}
_STATE = _STORE | {"state"}
_STAGE = _STATE | {"stage"}
_APPLY = _STAGE | {"apply"}
_BUNDLES = _APPLY | {"bundles"}
_OPS = _BUNDLES | {"ops"}
MAY_IMPORT: dict[str, set[str]] = {
    "ground": _GROUND,
    "store": _STORE,
    "state": _STATE,
    "stage": _STAGE,
    "apply": _APPLY,
    "bundles": _BUNDLES,
    "ops": _OPS,
    "net": _STORE | {"net"},  # talking to peers: no node policy, no node state
    "service": _OPS | {"net", "service"},
    "api": _OPS | {"net", "service", "api"},
}
MAX_ROOT_MODULES = 10
MAX_FOLDER_MODULES = 16


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    parts = [FOLDERS[rel[0]], *rel[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    found = {module_name(p): p for f in FOLDERS for p in sorted((ROOT / f).rglob("*.py"))}
    assert found
    return found


MODULES = all_modules()


def imports(path: Path) -> set[str]:
    """Every module named by an import in ``path``: absolute, relative, lazy or not."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            for alias in node.names:  # `from pkg import module`
                if f"{mod}.{alias.name}" in MODULES:
                    out.add(f"{mod}.{alias.name}")
    return out


def ours(names: set[str]) -> set[str]:
    """The modules of this project among ``names`` (a package stands for its __init__)."""
    return {n for n in names if n in MODULES}


def files(folder: str) -> list[Path]:
    found = sorted((ROOT / folder).rglob("*.py"))
    assert found, folder
    return found


def room_of(module: str) -> str:
    parts = module.split(".")
    assert parts[:2] == ["p2pupd", "daemon"], module
    if len(parts) == 2:
        return "ground"
    if (ROOT / "daemon" / parts[2]).is_dir():
        return parts[2]
    assert parts[2] in ROOT_ROOMS, f"daemon/{parts[2]}.py has no room in ROOT_ROOMS"
    return ROOT_ROOMS[parts[2]]


def test_protocol_is_pure() -> None:
    for f in files("protocol"):
        for name in imports(f):
            top = name.split(".")[0]
            assert top not in FORBIDDEN_IN_PROTOCOL, f"{f.name} imports {name}"
            assert not name.startswith(("p2pupd.daemon", "p2pupd.tools")), (
                f"{f.name} imports {name}"
            )


def test_daemon_does_not_import_tools() -> None:
    for f in files("daemon"):
        for name in imports(f):
            assert not name.startswith("p2pupd.tools"), f"{f.name} imports {name}"


def test_daemon_rooms_import_only_downwards() -> None:
    wrong = []
    for f in files("daemon"):
        here = room_of(module_name(f))
        for name in ours(imports(f)):
            if not name.startswith("p2pupd.daemon"):
                continue
            there = room_of(name)
            if there not in MAY_IMPORT[here]:
                wrong.append(f"{module_name(f)} ({here}) -> {name} ({there})")
    assert not wrong, "imports against the flow:\n" + "\n".join(wrong)


def test_every_daemon_room_is_in_the_table() -> None:
    rooms = {p.name for p in (ROOT / "daemon").iterdir() if (p / "__init__.py").exists()}
    assert rooms <= set(MAY_IMPORT), rooms - set(MAY_IMPORT)


def test_tools_use_only_the_daemon_api() -> None:
    for f in files("tools"):
        if "bench" in f.parts:
            continue
        for name in imports(f):
            if name.startswith("p2pupd.daemon"):
                assert name in ("p2pupd.daemon", "p2pupd.daemon.api"), f"{f.name} imports {name}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        # A package's __init__ is not an edge source for its own modules' sake.
        graph[name] = {m for m in ours(imports(path)) if m != name}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_layout_sizes() -> None:
    root = [p for p in (ROOT / "daemon").glob("*.py") if p.name != "__init__.py"]
    assert len(root) <= MAX_ROOT_MODULES, sorted(p.name for p in root)
    for folder in ("daemon", "tools", "protocol"):
        for d in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            mods = [p for p in d.glob("*.py") if p.name != "__init__.py"]
            assert len(mods) <= MAX_FOLDER_MODULES, f"{d.relative_to(ROOT)}: {len(mods)} modules"


def test_component_state_has_one_writer() -> None:
    """Every component-state transition is a named operation of state/components.py."""
    writers = []
    for f in files("daemon"):
        if f.relative_to(ROOT).as_posix() in ("daemon/state/components.py", "daemon/state/statedir.py"):
            continue
        text = f.read_text()
        if ".update_state(" in text or ".write_states(" in text:
            writers.append(f.relative_to(ROOT).as_posix())
    assert not writers, f"component state written outside state/components.py: {writers}"
