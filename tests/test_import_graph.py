"""fedseg's modules import each other without circles, and the server and the sites keep to
their own code (issue #14).

Why a test: circles were dodged with imports inside functions and under ``TYPE_CHECKING``
(``server/job.py`` <-> ``server/secure_rounds.py``, ``client/app.py`` <-> ``client/secure.py``),
which hid them from Python but not from the reader. The graph here counts EVERY import
statement, wherever it stands, so a dodged circle fails as well as a real one. The second part
is the deployment rule: the ServerApp never loads code that reads a site's images (nor torch:
``phases/initial_model.py``), and the site's agent never loads server code.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import fedseg

ROOT = Path(fedseg.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """fedseg module -> the fedseg modules it imports anywhere in its source."""
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, level - 1 packages up
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import mod`
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
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


def test_the_circle_finder_finds_a_dodged_circle() -> None:
    g = import_graph()
    assert "fedseg.server.secure_rounds" in g["fedseg.server.job"]
    g["fedseg.server.secure_rounds"].add("fedseg.server.job")  # what a TYPE_CHECKING import was
    assert any({"fedseg.server.job", "fedseg.server.secure_rounds"} <= set(c) for c in circles(g))


def test_no_import_circles() -> None:
    assert circles(import_graph()) == []


def _loaded_after_importing(prefix: str, run: str = "") -> list[str]:
    """The modules loaded after importing every module of the package ``prefix`` (and running
    ``run``), in a fresh interpreter."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"pkg = importlib.import_module({prefix!r})\n"
        f"for m in pkgutil.walk_packages(pkg.__path__, {prefix!r} + '.'):\n"
        "    importlib.import_module(m.name)\n"
        f"{run}\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


SITE_ONLY = ("fedseg.client", "fedseg.training", "fedseg.models", "fedseg.data.io",
             "fedseg.data.dataset", "torch", "monai", "nibabel", "SimpleITK")


def test_the_server_loads_no_site_code_nor_torch() -> None:
    """Every server module, and the class list a secure evaluation sum is laid out with (the
    only label logic the server runs)."""
    run = ("from types import SimpleNamespace as NS\n"
           "from fedseg.server.secure_apply import eval_classes\n"
           "assert eval_classes(NS(plan=NS(labels={'background': 0, 'disc': [1, 2], 'cup': 2})))"
           " == ['1,2', '2']")
    loaded = _loaded_after_importing("fedseg.server", run)
    bad = [m for m in loaded if m.startswith(SITE_ONLY) and m != "fedseg.data.dataset_json"]
    assert bad == []


def test_the_site_loads_no_server_code() -> None:
    loaded = _loaded_after_importing("fedseg.client")
    assert [m for m in loaded if m.startswith("fedseg.server")] == []
