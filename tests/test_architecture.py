"""The package layout and the layers of ARCHITECTURE.md, checked against the code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import rvqa

REPO = Path(__file__).resolve().parents[1]


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )


@pytest.mark.parametrize("module", ["rvqa", "rvqa.metrics", "rvqa.config", "rvqa.data"])
def test_light_modules_load_neither_torch_nor_faiss(module):
    proc = _run_python(
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('torch', 'faiss', 'transformers', 'accelerate') "
        "if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"import {module} loaded {proc.stdout.strip()}"


def test_one_top_level_import_package(tmp_path):
    """retriever/ and reader/ are rvqa.retriever / rvqa.reader; no top-level names of ours.

    Run from a neutral folder, as a user's program runs (the repository root itself
    is on ``sys.path`` under ``python -m pytest``, where its folders shadow anything).
    CI installs PyPI's ``reader`` and ``retriever`` beside rvqa: then the names must
    resolve to those distributions, next to ours. Resolved, not imported: whether a
    third-party package imports is its own business (PyPI's retriever 3.1 imports
    ``pkg_resources``, which setuptools 81 removed and torch 2.13 now pulls in).
    """
    code = (
        "import importlib.util, json, rvqa.reader, rvqa.retriever\n"
        "out = {'rvqa.reader': rvqa.reader.__file__, 'rvqa.retriever': rvqa.retriever.__file__}\n"
        "for name in ('reader', 'retriever'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    if spec is not None:\n"
        "        out[name] = spec.origin\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    # (rvqa/retriever and rvqa/reader are symlinks to these folders, for import-linter)
    assert Path(found["rvqa.retriever"]).resolve().parent == REPO / "retriever"
    assert Path(found["rvqa.reader"]).resolve().parent == REPO / "reader"
    for name in ("reader", "retriever"):
        if name in found:  # another distribution's package, importable beside rvqa
            assert found[name] and not Path(found[name]).is_relative_to(REPO), found


def test_packages_list_covers_every_package_folder():
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    mapping = conf["package-dir"]
    found = set()
    for init in REPO.glob("rvqa/**/__init__.py"):
        found.add(".".join(init.parent.relative_to(REPO).parts))
    for pkg, folder in mapping.items():
        for init in (REPO / folder).glob("**/__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((pkg, *rel)))
    assert found == listed, f"pyproject packages {sorted(listed)} vs folders {sorted(found)}"


def test_version_is_the_distribution_version():
    from importlib.metadata import version

    assert rvqa.__version__ == version("rvqa")


def _lint_imports(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(repo / ".ci" / "lint-imports")],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_layers_contract_holds_and_catches_an_upward_import(tmp_path):
    proc = _lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "KEPT" in proc.stdout and "BROKEN" not in proc.stdout

    # The same check on a copy where the metrics layer reaches up into the pipeline.
    copy = tmp_path / "repo"
    copy.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, copy / part)
    for part in ("rvqa", "retriever", "reader", ".ci"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    metrics = copy / "rvqa" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n\ndef _up():\n    import rvqa.pipeline  # noqa\n")
    broken = _lint_imports(copy)
    assert broken.returncode != 0
    assert "rvqa.metrics is not allowed to import rvqa.pipeline" in broken.stdout


def test_lazy_export_tables_resolve():
    """Every name a package exports lazily imports (a stale module path would not)."""
    import rvqa.reader

    for package in (rvqa, rvqa.reader):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
