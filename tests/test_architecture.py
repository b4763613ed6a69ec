"""The shape of the code: no import cycles anywhere in src/slmops (imports inside functions
count too: a lazy import only hides a cycle), the layers of docs/development.md respected,
one back-end class per back end, and nothing global changed by importing slmops."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every slmops module -> the slmops modules it imports (at any depth of its code)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            visit(node)
    return out


def test_no_import_cycles():
    graph = _imports()
    # a package's __init__ re-exporting its own modules is not a cycle between rooms
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name + ".").startswith(t + ".")}
    assert _cycles(graph) == []


# Lower layers never import higher ones (docs/development.md, "Layers").
LAYERS = [
    {"slmops.errors", "slmops.logs", "slmops.about", "slmops.machine", "slmops.interrupts"},
    {"slmops.config"},
    {"slmops.data", "slmops.methods", "slmops.models", "slmops.outputs"},
    {"slmops.train", "slmops.inference"},
    {"slmops.evaluate", "slmops.deploy", "slmops.report", "slmops.compare"},
    {"slmops.finetune_recipe", "slmops.serve"},
    {"slmops.workflow"},
    {"slmops.tune"},  # searches over finetune configs and workflows
    {"slmops.cli"},
]
# The bundle format (deploy/adapters.py, deploy/bundle.py) sits beside inference: the ONNX back
# end reads it, and export writes it.
FORMAT_MODULES = {"slmops.deploy.adapters", "slmops.deploy.bundle"}


def _layer(module: str) -> int:
    if module in FORMAT_MODULES:
        return 3
    for level, rooms in enumerate(LAYERS):
        if any(module == room or module.startswith(room + ".") for room in rooms):
            return level
    return len(LAYERS)  # slmops/__init__: the public API, on top


def test_layers_only_import_downwards():
    wrong = []
    for module, targets in _imports().items():
        for target in targets:
            if _layer(target) > _layer(module) and module != "slmops":
                wrong.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    # inference.torch_backend computes the loss the way training does (train.loss.plain_loss): same layer
    assert wrong == []


def test_one_backend_class_each_and_every_user_on_it():
    """generate/chat, evaluate, the parity check and the trainer's generation metrics all run
    models through slmops.inference; nothing else subclasses or re-implements a back end."""
    from slmops.inference.base import Backend

    backends = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", getattr(b, "attr", None)) == "Backend" for b in node.bases):
                backends.add((_module_name(path), node.name))
    assert backends == {("slmops.inference.torch_backend", "TorchBackend"), ("slmops.inference.onnx_backend", "OnnxBackend")}
    assert Backend is not None
    users = {"slmops.cli.generate", "slmops.evaluate.run", "slmops.deploy.parity", "slmops.finetune_recipe", "slmops.serve"}
    graph = _imports()
    for user in users:
        assert any(t.startswith("slmops.inference") for t in graph[user]), user
    # no module outside inference calls transformers' generate or onnxruntime_genai itself
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        if name.startswith("slmops.inference") or name.startswith("slmops.deploy.export"):
            continue
        text = path.read_text()
        imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(text)) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        assert "onnxruntime_genai" not in imported or name.startswith("slmops.deploy"), name
        assert ".generate(" not in text, f"{name} generates without the inference layer"


def test_importing_slmops_changes_nothing_global():
    """Importing every module leaves torch's settings, the logging tree and sys.path alone."""
    code = (
        "import sys, logging, torch; before = (list(sys.path), torch.get_num_threads(), torch.get_default_dtype(), "
        "logging.getLogger().level, len(logging.getLogger().handlers));"
        "import pkgutil, importlib, slmops\n"
        "for m in pkgutil.walk_packages(slmops.__path__, 'slmops.'): importlib.import_module(m.name)\n"
        "after = (list(sys.path), torch.get_num_threads(), torch.get_default_dtype(), logging.getLogger().level, "
        "len(logging.getLogger().handlers)); assert before == after, (before, after); print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
