"""The data layer's module layout: no adapter reaches into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import rvqa.data

DATA_DIR = Path(rvqa.data.__file__).parent


def _private_imports(path: Path) -> list[str]:
    """``module.name`` for every private name imported from another ``rvqa.data`` module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rvqa.data"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    modules = sorted(DATA_DIR.glob("*.py"))
    assert {"vqa.py", "captions.py", "official.py", "hf_datasets.py", "_json.py"} <= {
        m.name for m in modules
    }
    offending = {m.name: _private_imports(m) for m in modules if _private_imports(m)}
    assert offending == {}


def test_private_import_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from rvqa.data.vqa import _Rows, VQADataset\nfrom rvqa.data._json import read_json\n"
    )
    assert _private_imports(bad) == ["rvqa.data.vqa._Rows"]
