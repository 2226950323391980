"""The import layers of docs/architecture.md, enforced: import-linter's contracts in pyproject.toml, plus what
import-linter cannot see (app.py and cli.py are single-file modules, which it does not accept as roots)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "pyproject.toml"
PACKAGES = ("models", "interp")
FACES = ("app.py", "cli.py")
# import-linter (and tomllib) need Python >= 3.11; requirements-dev.txt installs it there
needs_linter = pytest.mark.skipif(sys.version_info < (3, 11), reason="import-linter needs Python >= 3.11")


def lint_imports(cwd: Path, *contracts: str) -> subprocess.CompletedProcess:
    """Run the `lint-imports` command (this interpreter's import-linter) on `cwd`'s pyproject.toml."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    args = [sys.executable, "-c", code, "pyproject.toml", "--no-cache", "--no-logo"]
    for c in contracts:
        args += ["--contract", c]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "PYTHONPATH": ""}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def contracts() -> list[dict]:
    return tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]["contracts"]


def layer_modules() -> list[tuple[str, bool]]:
    """(module, optional) for every module named in the layers contract, top layer first."""
    (layers,) = [c for c in contracts() if c["type"] == "layers"]
    out = []
    for layer in layers["layers"]:
        for name in layer.replace("|", ":").split(":"):
            name = name.strip()
            optional = name.startswith("(")
            out.append((name.strip("()"), optional))
    return out


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every absolute import anywhere in a file (also inside functions)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
    return out


def source_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return files + [ROOT / f for f in FACES]


@needs_linter
class TestContracts:
    def test_the_repository_keeps_every_contract(self):
        """`lint-imports pyproject.toml` passes on the working tree; on failure the linter's report is shown."""
        res = lint_imports(ROOT)
        assert res.returncode == 0, f"import-linter found broken contracts:\n{res.stdout}\n{res.stderr}"

    def test_every_module_belongs_to_a_layer(self):
        """A new module under models/ or interp/ must be placed in a layer, or the layers contract cannot see it."""
        names = [n for n, _ in layer_modules()]
        loose = []
        for p in source_files()[:-len(FACES)]:
            mod = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            if mod in PACKAGES:
                continue
            if not any(mod == n or mod.startswith(n + ".") for n in names):
                loose.append(mod)
        assert not loose, f"modules in no layer of pyproject.toml's layers contract: {loose}"


def _write(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def skeleton(tmp_path: Path) -> Path:
    """An empty copy of the layout (every layer module a package, no imports) with this repo's contracts."""
    for name, _ in layer_modules():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            init = tmp_path.joinpath(*parts[:i], "__init__.py")
            if not init.exists():
                _write(init)
    for face in FACES:
        _write(tmp_path / face)
    (tmp_path / "pyproject.toml").write_text(CONFIG.read_text())
    return tmp_path


@needs_linter
class TestTheContractsCanFail:
    """The same contracts on a skeleton of the layout: kept when empty, broken by one wrong import."""

    def test_an_empty_skeleton_keeps_them(self, skeleton):
        res = lint_imports(skeleton)
        assert res.returncode == 0, res.stdout + res.stderr

    def test_downward_imports_are_allowed(self, skeleton):
        _write(skeleton / "interp" / "tasks" / "__init__.py", "import interp.scorers\nimport models.shapes\n")
        _write(skeleton / "interp" / "heatmaps" / "__init__.py", "import interp.lse\nimport models.trace\n")
        _write(skeleton / "models" / "trace" / "__init__.py", "import models.attention_capture\n")
        res = lint_imports(skeleton)
        assert res.returncode == 0, res.stdout + res.stderr

    def test_an_upward_import_breaks_the_layers(self, skeleton):
        _write(skeleton / "models" / "shapes" / "__init__.py", "\n\nfrom interp.tasks import x\n")
        res = lint_imports(skeleton, "layers")
        assert res.returncode == 1
        assert "models.shapes is not allowed to import interp.tasks" in res.stdout
        assert "models.shapes -> interp.tasks (l.3)" in res.stdout

    def test_an_indirect_upward_import_breaks_the_layers(self, skeleton):
        _write(skeleton / "interp" / "lse" / "__init__.py", "import models.shapes\n")
        _write(skeleton / "models" / "shapes" / "__init__.py", "import interp.figures\n")
        assert lint_imports(skeleton, "layers").returncode == 1

    def test_gradio_below_the_app_breaks_the_forbidden_contract(self, skeleton):
        _write(skeleton / "interp" / "heatmaps" / "__init__.py", "import gradio as gr\n")
        res = lint_imports(skeleton, "no-gradio-below-app")
        assert res.returncode == 1
        assert "interp.heatmaps -> gradio" in res.stdout

    def test_importing_a_face_from_below_breaks_the_forbidden_contract(self, skeleton):
        _write(skeleton / "models" / "loading" / "__init__.py", "from cli import main\n")
        assert lint_imports(skeleton, "no-gradio-below-app").returncode == 1


class TestFaces:
    """app.py and cli.py: import-linter cannot take single-file modules as roots, so these are checked here."""

    @pytest.mark.parametrize("face, forbidden", [("cli.py", ("gradio", "gradio_client", "app")), ("app.py", ("cli",))])
    def test_faces_are_independent_and_only_the_app_imports_gradio(self, face, forbidden):
        bad = [f"{face}:{line} imports {mod}" for mod, line in imports_of(ROOT / face)
               if mod.split(".")[0] in forbidden]
        assert not bad, bad


def test_no_sys_path_hacks_in_the_sources():
    """No `sys.path.insert` under models/, interp/, app.py, cli.py (pyproject's pytest `pythonpath` covers tests)."""
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in source_files()
           for i, line in enumerate(p.read_text().splitlines(), 1) if "sys.path.insert" in line]
    assert not bad, bad


def test_every_name_a_module_exports_exists():
    """Each `__all__` entry of models/ and interp/ names something its module defines or imports (a stale entry
    breaks `from module import *` and misleads a reader), read from the source so nothing is imported."""
    stale = []
    for p in source_files()[:-len(FACES)]:
        tree = ast.parse(p.read_text(), str(p))
        defined, exported = set(), []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            defined.add(n.id)
                            if n.id == "__all__" and isinstance(node.value, (ast.List, ast.Tuple)):
                                exported = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
        stale += [f"{p.relative_to(ROOT)}: {n}" for n in exported if n not in defined]
    assert not stale, f"__all__ names nothing of that name: {stale}"
