"""The shape of the code: no import cycle among tunelab's modules (function-level imports included), every
registered task type has what the Task protocol names, and nothing outside tunelab/tasks branches on a task
type's name (it asks the task)."""

import ast
import re
from pathlib import Path

import pytest

from tunelab.tasks import REGISTRY, Task

ROOT = Path(__file__).resolve().parents[1] / "tunelab"


def module_graph() -> dict[str, set[str]]:
    """tunelab module -> the tunelab modules it imports anywhere in its code (package __init__ imports of a
    module's own package aside: `import tunelab.tasks.ner` runs tunelab/tasks/__init__ first either way)."""
    mods = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and not m.startswith(t + "."):
                    edges[m].add(t)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(v):
        state[v] = "open"
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == "open":
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = "done"
        path.pop()
        return None

    for v in sorted(edges):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_no_import_cycle():
    edges = module_graph()
    assert "tunelab.train.step" in edges and "tunelab.runtime" in edges["tunelab.train.step"]
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_recipes_do_not_import_each_others_helpers():
    edges = module_graph()
    recipes = {"tunelab.train.supervised", "tunelab.multitask.train", "tunelab.rl.train"}
    for r in recipes:
        # RL's warm start runs the supervised recipe (train()); it borrows nothing else from it
        allowed = {"tunelab.train.supervised"} if r == "tunelab.rl.train" else set()
        assert edges[r] & recipes <= allowed, r
    rl = (ROOT / "rl" / "train.py").read_text()
    assert re.findall(r"from tunelab\.train\.supervised import (.+)", rl) == ["train as supervised"]


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_task_type_has_what_the_protocol_names(kind):
    cls = REGISTRY[kind]
    names = set(Task.__annotations__) | {n for n, v in vars(Task).items()
                                         if not n.startswith("_") and callable(getattr(Task, n))}
    instance_only = {"labels", "pad", "max_length", "new_tokens_bound"}  # set in __init__ (or a property)
    missing = [n for n in sorted(names - instance_only) if not hasattr(cls, n)]
    assert not missing, f"{cls.__name__} lacks {missing}"
    assert cls.kind == kind


BRANCH = re.compile(r"""(==|!=|\bin\b)\s*[(\[{]?\s*["'](ner|classify|generate)["']|["'](ner|classify|generate)["']\s*(==|!=)""")


def test_no_branch_on_a_task_name_outside_tasks():
    hits = []
    for f in ROOT.rglob("*.py"):
        if f.parent.name == "tasks":
            continue
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if BRANCH.search(line.split("#")[0]):
                hits.append(f"{f.relative_to(ROOT.parent)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)
    assert BRANCH.search('if kind == "generate":') and BRANCH.search('kind in ("ner", "classify")')
