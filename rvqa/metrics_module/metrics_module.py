"""Folder entry point: ``evaluate.load("<...>/rvqa/metrics_module")`` loads this file.

``evaluate`` looks for ``<folder>/<folder name>.py``; the metric itself lives in
``vqa_accuracy.py`` (re-exported here, so there is one implementation).
"""

from .vqa_accuracy import VQAAccuracy

__all__ = ["VQAAccuracy"]
