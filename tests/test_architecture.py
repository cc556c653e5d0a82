"""The boundaries of docs/architecture.md, enforced: layers point one way, and protobuf-facing code stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# every packaged folder but the server itself; the client may not import the server either
OUTSIDE_SERVER = ["compression", "quality", "transfusion", "loadtest", "reliability", "pipeline", "prunefusion",
                  "clients/python/prunefusion_client"]
# the command-line entry point wires every part: `prunefusion serve` starts the server
MAY_IMPORT_SERVER = {ROOT / "prunefusion" / "cli.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_nothing_outside_the_server_imports_it():
    offenders = []
    for folder in OUTSIDE_SERVER:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in MAY_IMPORT_SERVER or "/v1/" in str(path):
                continue
            bad = sorted(m for m in imported_modules(path) if m == "prunefusion.server"
                         or m.startswith("prunefusion.server."))
            if bad:
                offenders.append(f"{path.relative_to(ROOT)}: {bad}")
    assert not offenders, "offline code imports the server:\n" + "\n".join(offenders)


def test_the_scan_sees_imports_inside_functions(tmp_path):
    """The rule above would pass vacuously if the scan missed the lazy imports this project uses everywhere."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from prunefusion.server.engines.base import collect\n"
                     "    import prunefusion.server\n")
    assert {"prunefusion.server.engines.base", "prunefusion.server"} <= imported_modules(probe)


def test_servicers_and_the_app_import_no_torch():
    """Protobuf-facing code talks to engines through their contracts only: loading the servicers and the app's
    wiring pulls in neither torch nor transformers (the engines import them when a model loads)."""
    code = ("import sys\n"
            "import prunefusion.server.app, prunefusion.server.servicers.multimodal\n"
            "import prunefusion.server.servicers.text_generation, prunefusion.server.registry\n"
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_package_folder_is_in_the_wheel():
    """pyproject lists the packages one by one: a new subpackage left out installs without it (the container
    image's server crashed at start with `No module named prunefusion.server.openai`; editable installs hide it)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(setuptools["packages"]), setuptools["package-dir"]
    found = set()
    for package, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            inside = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *inside)))
    assert found - listed == set(), f"package folders missing from pyproject's packages: {sorted(found - listed)}"
