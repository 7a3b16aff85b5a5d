"""The package's layering rule, checked by parsing every module's imports (so it stays true).

- A module under ``stages/`` never imports another stage module: a stage that needs another's output
  reads the artifact through ``pva_sae.rundir``.
- The stages package (``stages/__init__``) is the one module that calls the stages: each command's stage work,
  ``run_pipeline`` (`pva-sae run`) and ``run_stage`` (the Python API's stage calls, in ``pipeline``). ``pipeline``
  and the CLI import the stages package, never a stage module.
- Library modules (everything but ``stages/``, ``pipeline`` and the CLI) never import ``stages/``, ``pipeline``
  or ``cli``. ``api`` (configs, reading a run's results) is a library module like the others.
- Only the package ``__init__`` and the CLI import lazily; elsewhere imports of the package's own
  modules and of torch sit at the top of the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "pva_sae"
TOP = {"stages", "pipeline", "cli", "__main__"}   # __main__ is `python -m pva_sae`, i.e. the CLI
CALLS_STAGES = ("stages", "__init__")   # the stages package: the only module but a stage's own that imports one
LAZY_OK = {("__init__",), ("cli",)}


def _modules() -> list[tuple[tuple[str, ...], Path]]:
    return [(p.relative_to(ROOT).with_suffix("").parts, p) for p in sorted(ROOT.rglob("*.py"))]


def _imports(path: Path) -> list[tuple[str, ast.AST, bool]]:
    """(absolute module name, node, whether at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import (use absolute pva_sae.* imports)")
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.extend((name, node, id(node) in top_level) for name in names)
    return out


def _internal(name: str) -> tuple[str, ...] | None:
    parts = name.split(".")
    return tuple(parts[1:]) if parts[0] == "pva_sae" and len(parts) > 1 else None


def test_the_package_has_the_layered_layout():
    for sub in ("stages", "rundir", "data", "execution", "model", "sae", "stats", "default"):
        assert (ROOT / sub / "__init__.py").is_file(), sub
    stages = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    assert stages == STAGE_NAMES


@pytest.mark.parametrize("parts, path", _modules(), ids=lambda v: "/".join(v) if isinstance(v, tuple) else "")
def test_imports_follow_the_layering_rule(parts, path):
    for name, _, _ in _imports(path):
        target = _internal(name)
        if not target:
            continue
        if parts[0] not in TOP and parts != ("__init__",):  # the package entry point re-exports the API
            assert target[0] not in TOP, f"library module {'/'.join(parts)} imports {name}"
        stage = target[1] if target[0] == "stages" and len(target) > 1 and target[1] in STAGE_NAMES else None
        if stage and parts != CALLS_STAGES:
            assert parts[0] == "stages", f"{'/'.join(parts)} imports {name}: only the stages package calls the stages"
            assert stage == parts[1], f"{path} imports stage {name}"


STAGE_NAMES = {"build", "analyze", "validate", "steer", "report", "ablate", "attention", "merge"}


@pytest.mark.parametrize("parts, path", _modules(), ids=lambda v: "/".join(v) if isinstance(v, tuple) else "")
def test_package_and_torch_imports_sit_at_the_top(parts, path):
    if parts in LAZY_OK:
        return
    lazy = [name for name, node, at_top in _imports(path)
            if not at_top and (_internal(name) or name.split(".")[0] == "torch")
            and not _inside_type_checking(path, node)]
    assert not lazy, f"{path}: imports inside functions: {sorted(set(lazy))}"


def _inside_type_checking(path: Path, node: ast.AST) -> bool:
    tree = ast.parse(path.read_text())
    for block in tree.body:
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
            if any(n.lineno == node.lineno for n in ast.walk(block) if isinstance(n, (ast.Import, ast.ImportFrom))):
                return True
    return False


def _rule_breaks(tmp_path, monkeypatch, module: str, source: str, match: str) -> None:
    """A package holding only ``module`` (a path under pva_sae/) with ``source`` fails the layering rule."""
    path = tmp_path / "pva_sae" / module
    path.parent.mkdir(parents=True)
    path.write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path / "pva_sae")
    [(parts, found)] = _modules()
    with pytest.raises(AssertionError, match=match):
        test_imports_follow_the_layering_rule(parts, found)


def test_checker_catches_a_stage_importing_a_stage(tmp_path, monkeypatch):
    _rule_breaks(tmp_path, monkeypatch, "stages/steer.py", "from pva_sae.stages.build import build_dataset\n",
                 "imports stage")


def test_checker_catches_a_library_module_importing_a_stage(tmp_path, monkeypatch):
    _rule_breaks(tmp_path, monkeypatch, "summary.py", "from pva_sae.stages.ablate import ablate\n",
                 "library module summary imports")


def test_checker_catches_the_cli_importing_a_stage(tmp_path, monkeypatch):
    _rule_breaks(tmp_path, monkeypatch, "cli.py", "def cmd():\n    from pva_sae.stages.build import build_dataset\n",
                 "only the stages package calls the stages")


def test_checker_catches_the_api_module_importing_a_stage(tmp_path, monkeypatch):
    _rule_breaks(tmp_path, monkeypatch, "pipeline.py", "from pva_sae.stages.steer import steer\n",
                 "only the stages package calls the stages")
