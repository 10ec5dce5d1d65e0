"""The top-level names are also names of unrelated PyPI packages: they must resolve to this repo."""
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["trainer", "retrieval", "cluster", "jobs"])
def test_package_imports_from_this_repository(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_trainer_imports_no_distributed_stack():
    """trainer/ runs in one process: importing it must not pull in Ray, DeepSpeed or MLflow."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, trainer\n"
            "for m in pkgutil.walk_packages(trainer.__path__, 'trainer.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = [n for n in ('ray', 'deepspeed', 'mlflow') if n in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "", f"trainer imported {out.stdout.strip()}"



def _imports(root: Path = REPO) -> dict[str, set[str]]:
    """{module: the project's modules it imports}, at module level and inside functions alike, for
    trainer/, cluster/, retrieval/ and jobs/ under `root` (read with ast, nothing imported)."""
    import ast

    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for package in ("trainer", "cluster", "retrieval", "jobs") for p in (root / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                # `from . import x` and `from pkg import module` name modules; other names are
                # attributes of `base`.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (its modules in order, the first again at the end), or []."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_import_graph_sees_every_kind_of_import(tmp_path):
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "__init__.py").write_text("")
    (tmp_path / "trainer" / "a.py").write_text("from .b import x\n\ndef f():\n    from trainer import c\n")
    (tmp_path / "trainer" / "b.py").write_text("import trainer.c\nx = 1\n")
    (tmp_path / "trainer" / "c.py").write_text("def g():\n    from . import a\n")
    graph = _imports(tmp_path)
    assert graph == {"trainer": set(), "trainer.a": {"trainer.b", "trainer.c"}, "trainer.b": {"trainer.c"},
                     "trainer.c": {"trainer.a"}}
    assert _cycle(graph) == ["trainer.a", "trainer.b", "trainer.c", "trainer.a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_trainer_modules_import_each_other_without_a_cycle():
    """A cycle works only while one of its imports stays inside a function, and hides which module
    builds on which: checkpoints are read in trainer.training.checkpoint, on top of trainer.modules.model."""
    graph = _imports()
    assert {"trainer.config", "trainer.utils.errors"} <= graph["trainer.modules.model"]
    trainer = {name: {m for m in found if m.split(".")[0] == "trainer"}
               for name, found in graph.items() if name.split(".")[0] == "trainer"}
    assert _cycle(trainer) == [], " -> ".join(_cycle(trainer))


# Lowest first: a module imports only from its own floor or those below it.
FLOORS = ["trainer.utils", "trainer.config", "trainer.data", "trainer.modules", "trainer.training",
          "retrieval", "cluster", "jobs"]


def _floor(module: str) -> int:
    return max(i for i, floor in enumerate(FLOORS) if module == floor or module.startswith(floor + "."))


def test_no_import_runs_up_a_floor():
    """The folders show the architecture: utils < config < data < modules < training inside trainer/,
    then retrieval, cluster (Ray and DeepSpeed around trainer/ and retrieval/), jobs (the recipes)."""
    graph = _imports()
    assert {m for m in graph if m.startswith("trainer.")} >= {
        "trainer.utils.paths", "trainer.data.corpus", "trainer.modules.batched", "trainer.training.engine"}
    up = [f"{m} -> {t}" for m, found in sorted(graph.items()) if m != "trainer"
          for t in sorted(found) if t != "trainer" and _floor(t) > _floor(m)]
    assert up == [], "imports up a floor:\n" + "\n".join(up)


def test_imports_are_at_the_top_or_say_why():
    """An import inside a function names its reason in a comment on its line or just above its
    block of imports (a heavy import a command line must not pay for, an import that must come
    after a setting, a private module inside a try); any other import is at the top."""
    import ast

    silent = []
    for package in ("trainer", "cluster", "retrieval", "jobs"):
        for path in sorted((REPO / package).rglob("*.py")):
            lines = path.read_text(encoding="utf-8").split("\n")
            tree = ast.parse("\n".join(lines))
            top = {id(node) for node in tree.body}
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                    continue
                above = node.lineno - 2
                while above >= 0 and "#" not in lines[above] and (
                        not lines[above].strip() or lines[above].strip().startswith(("import ", "from "))):
                    above -= 1
                said = above >= 0 and (lines[above].strip().startswith("#") or (
                    "#" in lines[above] and lines[above].strip().startswith(("import ", "from "))))
                if "#" not in lines[node.lineno - 1] and not said:
                    silent.append(f"{path.relative_to(REPO)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert silent == [], "imports inside functions without a reason:\n" + "\n".join(silent)


def test_the_readme_room_table_names_every_package_folder():
    """The README's table of rooms is the map a newcomer reads first: every package folder (and
    trainer/config.py) has its row, and no row names a folder that is gone."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| room | what it holds |"):].split("\n\n")[0]
    rows = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    folders = {f"{p.parent.relative_to(REPO).as_posix()}/" for package in ("trainer", "retrieval", "cluster", "jobs")
               for p in (REPO / package).rglob("__init__.py")}
    assert folders | {"trainer/config.py", "benchmarks/"} == rows
