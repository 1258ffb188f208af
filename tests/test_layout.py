"""The package's layout: imports flow one way (no cycles), the command lines stay thin."""
import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "aaa_fast")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def package_imports() -> dict[str, set[str]]:
    """Every aaa_fast module and the aaa_fast modules it imports (anywhere in the file)."""
    graph = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            module = module_name(path)
            is_package = name == "__init__.py"
            deps = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = module.split(".")
                        base = base[:len(base) - node.level + (1 if is_package else 0)]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    candidates = [target] + [f"{target}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    candidates = [a.name for a in node.names]
                else:
                    continue
                deps.update(c for c in candidates if c.startswith("aaa_fast"))
            graph[module] = deps
    known = set(graph)
    return {m: {d for d in deps if d in known and d != m} for m, deps in graph.items()}


def test_the_graph_walker_sees_the_imports():
    graph = package_imports()
    assert "aaa_fast.trainer" in graph["aaa_fast.run"] and "aaa_fast.ops" in graph["aaa_fast.attack"]
    assert "aaa_fast.ops.api" in graph["aaa_fast.ops"]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph `edges` as [a, b, ..., a], or None (depth-first search)."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == "open":
                return path[path.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    graph = package_imports()
    # a package's __init__ re-exporting its submodules is not a cycle of the code
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert find_cycle(edges) is None


def test_the_command_lines_are_thin():
    """train.py parses and resolves arguments; evaluate.py reads a run's settings; the run itself
    lives in aaa_fast.run, so neither CLI imports the other."""
    graph = package_imports()
    assert "aaa_fast.train" not in graph["aaa_fast.evaluate"] and "aaa_fast.evaluate" not in graph["aaa_fast.train"]
    for cli in ("train", "evaluate"):
        tree = ast.parse(open(os.path.join(PACKAGE, f"{cli}.py")).read())
        functions = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert set(functions) <= {"build_parser", "resolve_defaults", "main"}, functions
