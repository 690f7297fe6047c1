"""The package's layers, held against its imports (every import, also one
inside a function): the core never imports Flask, Werkzeug or gunicorn,
and no module imports one of a higher layer. A new module must be given a
layer here, so that where it stands is a decision, not an accident."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mgpumanager"

# Lowest first. A module may import its own layer and those below it.
LAYERS = [
    {"errors", "clock", "logs", "lease", "policy", "schedule", "procs", "commands", "presets",
     "sim"},
    {"config", "config_model", "config_reader", "yamlsafe"},
    {"gpu", "gpulock", "oslock", "client_body", "headers", "proxy", "stats"},
    {"admin", "consumers"},
    {"device", "order", "models"},
    {"room"},
    {"job", "status"},
    {"program_leases"},
    {"broker"},
    # The outside: HTTP, the server process, the command line.
    {"access"},
    {"metrics", "web", "runner", "app", "worker", "gunicorn_conf", "cli", "demo"},
]
WEB_FRAMEWORKS = {"flask", "werkzeug", "gunicorn"}
MAY_USE_WEB_FRAMEWORKS = {"web", "app", "worker", "gunicorn_conf", "cli"}
PACKAGES = ("sim", "web")             # subpackages, each one module of its layer


def layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if module in names:
            return i
    raise AssertionError(f"mgpumanager/{module} has no layer in tests/test_layers.py")


def imports_of(path: Path) -> set[str]:
    """Top-level names imported: 'config' for `from .config import X`, 'flask' for flask."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    in_sub = path.parent.name in PACKAGES
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found.add(parts[1] if parts[0] == "mgpumanager" and len(parts) > 1 else parts[0])
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0:
                parts = mod.split(".")
                found.add(parts[1] if parts[0] == "mgpumanager" and len(parts) > 1 else parts[0])
            elif node.level == 1 and in_sub:
                found.add(path.parent.name)         # within its own subpackage
            elif node.level == 1 and mod:
                found.add(mod.split(".")[0])
            elif node.level == 1:                   # `from . import x`
                found.update(a.name for a in node.names if a.name != "__version__")
            else:                                   # from a subpackage up into the package
                found.add(mod.split(".")[0] if mod else "__init__")
    return found


def modules():
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem != "__init__":
            yield path.stem, path
    for package in PACKAGES:
        for path in sorted((PACKAGE / package).glob("*.py")):
            yield package, path


def test_no_module_imports_a_higher_layer():
    wrong = []
    for name, path in modules():
        mine = layer_of(name)
        for imported in imports_of(path):
            if (PACKAGE / f"{imported}.py").exists() or imported in PACKAGES:
                if layer_of(imported) > mine:
                    wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {imported} "
                                 f"(layer {layer_of(imported)} over its {mine})")
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_no_web_framework():
    wrong = [f"{path.relative_to(PACKAGE.parent)} imports {', '.join(sorted(used))}"
             for name, path in modules()
             if name not in MAY_USE_WEB_FRAMEWORKS
             and (used := imports_of(path) & WEB_FRAMEWORKS)]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_import_that_breaks_the_layers(tmp_path):
    """The checks themselves: a core module that imported Flask or the broker would be seen."""
    bad = tmp_path / "policy.py"
    bad.write_text("from flask import request\n\ndef f():\n    from .broker import Broker\n")
    found = imports_of(bad)
    assert "flask" in found and "broker" in found
    assert layer_of("broker") > layer_of("policy")
