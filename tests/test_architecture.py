"""The layers, checked on the source: only ``raypets/stages/`` and the faces import Ray or a stage; nothing in the
package imports the CLI. Imports inside functions count too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "raypets"
# The command line and the demo call the stages; the package's __init__.py names each stage's function for notebooks,
# imported on first use only (PEP 562), so that `import raypets` imports neither Ray nor a stage (tested below).
FACES = {"cli.py", "demo.py", "__init__.py"}


def imported_modules(source: str, module: str) -> set[str]:
    """Every module ``source`` imports (absolute names; relative imports resolved against ``module``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from raypets import stages`
    return names


def layer_violations(package: Path) -> list[str]:
    """``file: imports X`` for each import that points the wrong way in the package folder ``package``."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        module = ".".join([package.name, *relative.with_suffix("").parts])
        in_stages = relative.parts[0] == "stages"
        for name in sorted(imported_modules(path.read_text(), module)):
            top = name.split(".")[0]
            if top == "ray" and not (in_stages or str(relative) in FACES):
                problems.append(f"{relative}: imports {name} (only raypets/stages/ and the faces import Ray)")
            if name.startswith(f"{package.name}.stages") and not (in_stages or str(relative) in FACES):
                problems.append(f"{relative}: imports {name} (only the faces import the stages)")
            if name == f"{package.name}.cli" and str(relative) != "cli.py":
                problems.append(f"{relative}: imports {name} (nothing imports the command line)")
    return problems


def test_only_the_stages_and_the_faces_import_ray_or_a_stage_and_nothing_imports_the_cli():
    assert layer_violations(PACKAGE) == []


def test_the_check_catches_a_wrong_way_import(tmp_path):
    package = tmp_path / "raypets"
    for name, text in {
        "metrics.py": "def f():\n    import ray.data\n",  # inside a function: still an import
        "data/decode.py": "from ..stages import train\n",
        "stages/train.py": "import ray\nfrom raypets import cli\n",
        "cli.py": "from raypets.stages.train import train\n",
        "demo.py": "import ray\n",
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    assert layer_violations(package) == [
        "data/decode.py: imports raypets.stages (only the faces import the stages)",
        "data/decode.py: imports raypets.stages.train (only the faces import the stages)",
        "metrics.py: imports ray.data (only raypets/stages/ and the faces import Ray)",
        "stages/train.py: imports raypets.cli (nothing imports the command line)",
    ]


def test_importing_the_package_imports_neither_ray_nor_torch():
    """Ray Data workers and the Ray-free modules import ``raypets``: it stays light, its stage functions lazy."""
    check = "import raypets, sys; assert not {'ray', 'torch'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=PACKAGE.parent)
