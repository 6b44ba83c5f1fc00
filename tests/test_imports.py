"""Imports are light and change nothing: checked in fresh interpreters, where nothing was imported before."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lit_adamerging

PACKAGE = Path(lit_adamerging.__file__).parent
HEAVY = ("lightning", "open_clip", "timm", "torchvision", "matplotlib")
LAZY_PACKAGES = ("lit_adamerging", "lit_adamerging.data", "lit_adamerging.models")


def package_modules() -> list[str]:
    """Every module of the package, from its files (importing a package to walk it would import it)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def run_python(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


# Imports the core, notes which heavy libraries came with it, then imports every module of the
# package and lists, in import order, the other modules that came with them.
FIRST_IMPORTS = """
import importlib, json, sys
before = set(sys.modules)
import lit_adamerging.merging
import lit_adamerging.methods
heavy = sorted(name for name in sys.argv[1].split(",") if name in sys.modules)
for module in sys.argv[2].split(","):
    importlib.import_module(module)
others = [name for name in sys.modules if name not in before and name.split(".")[0] != "lit_adamerging"]
print(json.dumps({"heavy": heavy, "others": others}))
"""

# Imports those other modules first, so that what they change on import is part of the baseline;
# then every module of the package, and reports what changed.
STATE_UNCHANGED = """
import importlib, json, logging, os, sys, warnings
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception:
        pass  # an alias or a module that only imports as part of another

def state():
    import torch
    loggers = {"": logging.getLogger()}
    loggers.update({name: logger for name, logger in logging.Logger.manager.loggerDict.items()
                    if isinstance(logger, logging.Logger)})
    found = {
        "warnings.filters": repr(warnings.filters),
        "logging": {name: repr((logger.level, logger.handlers, logger.filters, logger.propagate, logger.disabled))
                    for name, logger in loggers.items() if not name.startswith("lit_adamerging")},
        "logging.disable": logging.root.manager.disable,
        "os.environ": dict(os.environ),
        "sys.path": list(sys.path),
        "torch": repr((torch.get_default_dtype(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                       torch.is_grad_enabled(), torch.get_float32_matmul_precision())),
        "matplotlib.pyplot imported": "matplotlib.pyplot" in sys.modules,
    }
    if "matplotlib" in sys.modules:
        found["matplotlib backend"] = repr(sys.modules["matplotlib"].rcParams._get("backend"))
    if "open_clip" in sys.modules:
        found["open_clip models"] = sys.modules["open_clip"].list_models()
    if "jsonargparse" in sys.modules:
        found["jsonargparse yaml loader"] = repr(sys.modules["jsonargparse"].get_loader("yaml"))
    return found

before = state()
for module in sys.argv[2].split(","):
    importlib.import_module(module)
after = state()
changed = {key: [before.get(key), after.get(key)] for key in after if before.get(key) != after.get(key)}
ours = {name: repr((logger.level, logger.handlers)) for name, logger in logging.Logger.manager.loggerDict.items()
        if name.startswith("lit_adamerging") and isinstance(logger, logging.Logger)
        and (logger.level != logging.NOTSET or logger.handlers)}
print(json.dumps({"changed": changed, "configured loggers": ours, "imported": len(sys.argv[2].split(","))}))
"""


@pytest.mark.slow  # imports every module in fresh interpreters
def test_core_imports_torch_only_and_no_import_changes_global_state():
    modules = package_modules()
    assert {"lit_adamerging.merging.merge", "lit_adamerging.cli", "lit_adamerging.benchmarks.mini"} <= set(modules)
    first = run_python(FIRST_IMPORTS, ",".join(HEAVY), ",".join(modules))
    assert first["heavy"] == []  # lit_adamerging.merging and .methods: torch (and yaml) only
    assert {"lightning", "open_clip", "timm", "matplotlib"} <= {name.split(".")[0] for name in first["others"]}

    report = run_python(STATE_UNCHANGED, json.dumps(first["others"]), ",".join(modules))
    assert report["imported"] == len(modules)
    assert report["changed"] == {}
    assert report["configured loggers"] == {}


def type_checking_imports(package: str) -> dict[str, str]:
    """``{name: module}`` of the ``if TYPE_CHECKING:`` imports in ``package``'s ``__init__.py``."""
    tree = ast.parse(Path(importlib.import_module(package).__file__).read_text())
    blocks = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    assert len(blocks) == 1, package
    imports = [node for node in blocks[0].body if isinstance(node, ast.ImportFrom)]
    assert all(alias.asname == alias.name for node in imports for alias in node.names)  # explicit re-exports
    return {alias.name: node.module for node in imports for alias in node.names}


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_exports_resolve_and_match_what_type_checkers_see(package):
    module = importlib.import_module(package)
    declared = type_checking_imports(package)
    assert sorted(module.__all__) == sorted(declared)
    for name, origin in declared.items():
        assert getattr(module, name) is getattr(importlib.import_module(origin), name), name
        assert name in dir(module)
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018
