"""Shared pytest setup: offline, deterministic, small thread pools."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A whole tiny run folder (retriever, index, reader), built once per test session."""
    from tests.tiny import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def flat_data(tmp_path_factory):
    """A Flat knowledge index of 3,000 vectors with its arrays (index tests)."""
    from tests.index_helpers import make_flat_data

    return make_flat_data(tmp_path_factory.mktemp("flat"))


@pytest.fixture(scope="module")
def clustered_data():
    """Clustered vectors and queries for approximate-index tests."""
    from tests.index_helpers import make_clustered_data

    return make_clustered_data()
