"""The serving package's import graph, read from the source with ast (nothing is imported): no cycle, no
module importing a layer above its own, and the lightweight modules stay light."""

import ast
from collections.abc import Iterator
from pathlib import Path

SERVING = Path(__file__).resolve().parents[1] / "serving"

# Lowest first. A module imports modules of its own layer and of the layers below it, never above.
LAYERS = [
    {
        "contract",
        "errors",
        "commandline",
        "config",
        "eventloop",
        "security",
        "proto",
        "mnist",
    },  # plain data, helpers
    {"statistics", "metrics", "buckets", "images", "runtime", "batcher", "repository"},  # models, batches
    {"rpc", "kserve", "classify", "control", "http"},  # the servicers, the supervisor-worker protocol, HTTP
    {"process"},  # what every server process does alike
    {"server", "supervisor"},  # one server process; the supervisor of several
    {"cli"},  # mnist-serve: the composition root
]
# Beside the server: the clients and the load tester build on the two lowest layers and on what is listed
# here (whole groups, or single modules: the HTTP codec and status mapping serve both ends of the wire);
# nothing in the layers imports them.
BESIDE = {
    "channels": set(),
    "client": {"channels"},
    "bench": {"channels", "client", "http.tensors", "http.status"},
}
SIBLINGS = {"server", "supervisor"}  # neither imports the other: the command composes them
COMMAND_LINE = {
    "commandline": {"config", "cli", "client", "bench"}
}  # flag helpers: configs and commands only
NEVER = {"torch", "training"}  # no serving module imports these (a serving-only install has no PyTorch)
LIGHT = {"config": {"onnxruntime", "grpc"}}  # importing the module (and all it imports) loads none of these


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVING.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SERVING.rglob("*.py")}


def imported(path: Path, name: str) -> Iterator[str]:
    """Every module `name` imports, at any depth of its code (a deferred import counts too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


GRAPH = {name: set(imported(path, name)) for name, path in MODULES.items()}


def group(module: str) -> str:
    """The unit the rules speak of: the module below serving, or the subpackage (bench, proto)."""
    return module.split(".")[1] if module.count(".") else module


def layer(module: str) -> int | None:
    return next((rank for rank, modules in enumerate(LAYERS) if group(module) in modules), None)


def internal_edges() -> Iterator[tuple[str, str]]:
    for source, targets in GRAPH.items():
        for target in targets:
            if target.split(".")[0] == "serving" and target != "serving" and group(source) != group(target):
                yield source, target


def test_every_module_has_its_place() -> None:
    placed = set().union(*LAYERS) | set(BESIDE)
    assert {group(m) for m in MODULES if m != "serving"} <= placed


def test_no_import_points_up_or_into_the_clients() -> None:
    wrong = []
    for source, target in internal_edges():
        src, dst = group(source), group(target)
        if src in BESIDE:
            listed = dst in BESIDE[src] or target.removeprefix("serving.") in BESIDE[src]
            allowed = listed or (layer(target) is not None and layer(target) <= 1)
        else:
            allowed = dst not in BESIDE and layer(target) <= layer(source)
        if not allowed:
            wrong.append(f"{source} -> {target}")
    assert wrong == []


def test_the_server_and_the_supervisor_never_import_each_other() -> None:
    assert [(s, t) for s, t in internal_edges() if {group(s), group(t)} <= SIBLINGS] == []


def test_the_flag_helpers_serve_only_configurations_and_commands() -> None:
    for helper, users in COMMAND_LINE.items():
        assert {group(s) for s, t in internal_edges() if group(t) == helper} <= users


def test_the_import_graph_has_no_cycle() -> None:
    edges = {m: {t for t in GRAPH[m] if t in MODULES and t != m} for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for target in sorted(edges[module]):
            if cycle := visit(target, [*path, module]):
                return cycle
        done.add(module)
        return None

    cycles = [cycle for module in sorted(MODULES) if (cycle := visit(module, []))]
    assert cycles == []


def test_serving_never_imports_these_packages() -> None:
    assert {(m, t) for m, targets in GRAPH.items() for t in targets if t.split(".")[0] in NEVER} == set()


def test_light_modules_import_nothing_heavy() -> None:
    for module, heavy in LIGHT.items():
        reached, todo = set(), [f"serving.{module}"]
        while todo:
            current = todo.pop()
            if current in reached or current not in MODULES:
                continue
            reached.add(current)
            todo += GRAPH[current]
        external = {t.split(".")[0] for m in reached for t in GRAPH[m]}
        assert external & heavy == set(), sorted(reached)


def test_the_graph_is_read_right() -> None:
    """The rules above only mean something if the graph holds the edges the code has."""
    assert "serving.repository" in GRAPH["serving.control"]
    assert "serving.eventloop" in GRAPH["serving.cli"]  # `from serving import eventloop`
    assert {"serving.server", "serving.supervisor"} <= GRAPH["serving.cli"]
    assert "onnxruntime" in GRAPH["serving.runtime"]
    assert "serving.bench.loadgen" in GRAPH["serving.bench.cli"]
