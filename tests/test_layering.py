"""The compiler core imports nothing above it, `import fxprune` stays light, and the library reads no
paths of this repository's surroundings (../shared)."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ABOVE_CORE = ("fxprune.export", "fxprune.training", "fxprune.search", "fxprune.apps")
CORE = sorted(list((ROOT / "fxprune").glob("*.py")) + list((ROOT / "fxprune" / "ops").glob("*.py"))
              + list((ROOT / "fxprune" / "native").glob("*.py"))
              + [ROOT / "passes" / "dependency.py", ROOT / "passes" / "rewrite.py"])


def imported_modules(path: pathlib.Path):
    """Absolute names of every module `path` imports, at any depth (function-level imports too)."""
    package = {"fxprune": "fxprune", "passes": "fxprune.passes"}.get(path.parent.name, f"fxprune.{path.parent.name}")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def test_core_imports_nothing_above_it():
    # fxprune/__init__.py names the modules above the core that load on first use
    offenders = [(p.relative_to(ROOT).as_posix(), m) for p in CORE if p != ROOT / "fxprune" / "__init__.py"
                 for m in imported_modules(p) if m.startswith(ABOVE_CORE)]
    assert offenders == []


def test_the_check_sees_a_layering_violation(tmp_path):
    bad = tmp_path / "fxprune" / "cost.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    from .training.finetune import finetune\n")
    assert "fxprune.training.finetune" in set(imported_modules(bad))


def test_import_fxprune_loads_no_training_plotting_or_apps():
    code = ("import sys, fxprune; print(sorted(m for m in sys.modules if m.startswith(('fxprune.training', "
            "'fxprune.apps', 'fxprune.export', 'matplotlib', 'torchvision'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_library_reads_no_repository_surroundings():
    for path in sorted((ROOT / "fxprune").rglob("*.py")) + sorted((ROOT / "passes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ("shared", "../shared"):
                raise AssertionError(f"{path.relative_to(ROOT)} names the shared folder: pass paths in, or read FXPRUNE_DATA")
