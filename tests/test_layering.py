"""The direction of imports (docs/architecture.md, "Layout"), read from the source with `ast`.

Layers, high to low: entry points -> serving -> offload -> models -> kernels. A module may import its
own layer and any lower one, never a higher one. The harness (appliance.bench: benchmarks,
appliance.testbed: processes and networks to run the product in, appliance.drills: chaos and soak)
sits beside the product: it may import anything, and only entry points may import it (`appliance
bench-*` runs it). Imports
inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("appliance", "offload", "models", "kernels")
ENTRY_POINTS = (
    "appliance.cli",
    "appliance.ctl",
    "appliance.admin_client",
    "appliance.config",
    "appliance.worker_cli",
    "appliance.console",
    "appliance.startup",
)
# The package root holds only `__version__`, the one place of the version: every layer may read it.
ROOT_MODULE = "appliance"
HARNESS = ("appliance.bench", "appliance.testbed", "appliance.drills")
RANKS = {"root": -1, "kernels": 0, "models": 1, "offload": 2, "serving": 3, "entry points": 4}

# Known upward imports, each with why it is there; the test fails on any other, and on one listed
# here that has gone (so the list stays true).
KNOWN = {
    ("kernels.tensorrt_backend", "models.gguf_file"): "TensorRT engines are built from the model file ...",
    ("kernels.tensorrt_backend", "models.onnx_export"): "... through the ONNX graph of a layer range",
    ("kernels.tensorrt_backend", "models.llama"): "... sized by LlamaConfig",
}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer(module: str) -> str | None:
    """The layer of one of our modules ("harness" for the bench, testbed and drills), None for anything not ours."""
    if any(within(module, package) for package in HARNESS):
        return "harness"
    if module == ROOT_MODULE:
        return "root"
    if within(module, "appliance.serving"):
        return "serving"
    if module in ENTRY_POINTS:
        return "entry points"
    for package in ("offload", "models", "kernels"):
        if within(module, package):
            return package
    return None


def imports(module: str, source: str, is_package: bool = False) -> set[str]:
    """Every module `source` imports, anywhere in it: `from a import b` counts as a.b when a.b is
    one of ours (a submodule), else as a; relative imports are resolved against `module`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if layer(f"{base}.{alias.name}") == "harness" else base)
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[tuple[str, str]]:
    """(module, imported) for each import against the direction of the layers."""
    here = layer(module)
    bad = []
    for target in sorted(imports(module, source, is_package)):
        there = layer(target)
        if there is None or here == "harness":
            continue
        if there == "harness":
            if here != "entry points":
                bad.append((module, target))
        elif RANKS[there] > RANKS[here]:
            bad.append((module, target))
    return bad


def our_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def test_no_module_imports_against_the_layers():
    modules = our_modules()
    assert [m for m in modules if layer(m) is None] == [], "a module in no layer: place it in ENTRY_POINTS or a package"
    found = set()
    for module, path in modules.items():
        found.update(violations(module, path.read_text(), path.name == "__init__.py"))
    assert sorted(found - set(KNOWN)) == [], "imports against the layers (docs/architecture.md, Layout)"
    assert sorted(set(KNOWN) - found) == [], "listed as known but no longer there: take them off KNOWN"


def test_the_checker_sees_what_it_must():
    """A bad import is reported wherever it hides; the allowed directions are not."""
    inside_a_function = "def f():\n    from appliance.serving.app import create_app\n"
    assert violations("models.fake", inside_a_function) == [("models.fake", "appliance.serving.app")]
    assert violations("offload.fake", "import appliance.testbed.netsim\n") == [
        ("offload.fake", "appliance.testbed.netsim")
    ]
    assert violations("appliance.serving.fake", "from appliance import bench\n") == [
        ("appliance.serving.fake", "appliance.bench")
    ]
    assert violations("appliance.serving.fake", "from appliance.startup import load_engine\n") == [
        ("appliance.serving.fake", "appliance.startup")
    ]
    assert violations("kernels.fake", "from . import reference\nfrom ..models import llama\n") == [
        ("kernels.fake", "models")
    ]
    assert violations("appliance.serving.fake", "from appliance import __version__\n") == []
    allowed = "import numpy\nfrom models.llama import Llama\nfrom offload.pki import Identity\nfrom kernels import x\n"
    assert violations("appliance.serving.fake", allowed) == []
    assert violations("appliance.cli", "from appliance.bench.engine import run\n") == []  # entry point -> harness
    assert violations("appliance.bench.fake", "from appliance.cli import app\n") == []  # the harness uses anything
    assert violations("appliance.testbed.fake", "from appliance.cli import app\n") == []
    assert violations("appliance.serving.fake", "from appliance.drills import soak\n") != []  # product -/-> harness


def test_generate_loads_no_grpc():
    """`appliance generate` on this machine alone never loads grpc (nor the offload client it serves)."""
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['appliance', 'generate', 'Hi', '-n', '1']\n"
        "try:\n    runpy.run_module('appliance.cli', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'offload.client'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=os.environ)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_serving_loads_no_torch():
    """The server, the worker and the admin CLI never load torch or PEFT (on-device training, offload/train.py,
    is the `.[train]` extra)."""
    probe = (
        "import sys\n"
        "import appliance.cli, appliance.ctl, appliance.serving.app, appliance.worker_cli, offload.coordinator\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'peft', 'transformers')))\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=os.environ)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
