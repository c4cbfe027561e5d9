"""Caption corpus preparation (rvqa.retriever.index.corpus): validation, dedupe,
ids, and sharded multi-process encoding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rvqa.distributed import shard_bounds
from rvqa.retriever.index import (
    KnowledgeIndex,
    build_index,
    build_index_from_embeddings,
)
from tests.index_helpers import (
    CORPUS,
    REPO,
    Caption,
    HashEncoder,
    unit_rows,
)


def test_bad_corpus_raises_clear_errors(tmp_path):
    enc = HashEncoder()
    out = tmp_path / "i"
    with pytest.raises(ValueError, match="empty"):
        build_index(enc, [], out)
    with pytest.raises(TypeError, match="caption 1 must be a string"):
        build_index(enc, ["ok", 3], out)
    with pytest.raises(ValueError, match="caption 1 is empty"):
        build_index(enc, ["ok", "   "], out)
    with pytest.raises(ValueError, match="2 ids for 3 captions"):
        build_index(enc, ["a", "b", "c"], out, ids=[1, 2])
    with pytest.raises(ValueError, match="unique"):
        build_index(enc, ["a", "b"], out, ids=[7, 7])
    with pytest.raises(TypeError, match="all integers or all strings"):
        build_index(enc, ["a", "b"], out, ids=[1, "b"])
    with pytest.raises(ValueError, match="at least 1248"):  # 39 * 32
        build_index(enc, [f"c{i}" for i in range(500)], out, factory="IVF32,Flat")
    with pytest.raises(ValueError, match="invalid faiss factory"):
        build_index(enc, ["a"], out, factory="NotAnIndex")
    with pytest.raises(ValueError, match="L2-normalised"):
        build_index_from_embeddings(2 * unit_rows(3, 8), ["a", "b", "c"], None, out, "fp")
    assert not out.exists()


def test_dedupe_keeps_first_id(tmp_path):
    enc = HashEncoder()
    caps = ["a red circle", "a blue square", " a red circle ", "a blue square", "green"]
    path = build_index(enc, caps, tmp_path / "d", ids=[10, 11, 12, 13, 14])
    index = KnowledgeIndex.load(path)
    assert len(index) == 3
    assert index.manifest["dedupe"] == {"enabled": True, "input_count": 5, "removed": 2}
    [r] = index.search(enc.embed_texts(["a red circle"]), 1)
    assert r.ids == [10] and r.captions == ["a red circle"]
    kept = build_index(enc, caps, tmp_path / "nd", dedupe=False)
    assert len(KnowledgeIndex.load(kept)) == 5


def test_caption_objects_carry_ids(tmp_path):
    enc = HashEncoder()
    corpus = [Caption("a red circle", 101), Caption("a blue square", 205)]
    index = KnowledgeIndex.load(build_index(enc, corpus, tmp_path / "o"), enc)
    [r] = index.search_images(["a blue square"], 2)
    assert r.ids == [205, 101] and r.captions[0] == "a blue square"
    with pytest.raises(ValueError, match="ids given twice"):
        build_index(enc, corpus, tmp_path / "o2", ids=[1, 2])


def test_shard_bounds_cover_everything():
    for n in (0, 1, 5, 10, 11):
        bounds = [shard_bounds(n, 3, r) for r in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(2))


TORCHRUN_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from accelerate import Accelerator
from rvqa.retriever.index import build_index
from tests.index_helpers import CORPUS, HashEncoder

out = Path(sys.argv[1])
acc = Accelerator()
assert acc.num_processes == 2, acc.num_processes
enc = HashEncoder()
build_index(enc, CORPUS, out / "mp", factory="Flat", embeddings_dtype="float32",
            accelerator=acc, show_progress=False)
(out / f"rank{{acc.process_index}}.json").write_text(json.dumps({{"encoded": enc.encoded}}))
acc.wait_for_everyone()
acc.end_training()
"""


def test_two_process_build_equals_one_process(tmp_path):
    script = tmp_path / "mp_build.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT.format(repo=str(REPO))))
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    counts = [json.loads((tmp_path / f"rank{r}.json").read_text())["encoded"] for r in (0, 1)]
    assert counts == [48, 49]  # 97 distinct captions after dedupe, split contiguously
    single = build_index(
        HashEncoder(), CORPUS, tmp_path / "single", factory="Flat", embeddings_dtype="float32"
    )
    mp, one = KnowledgeIndex.load(tmp_path / "mp"), KnowledgeIndex.load(single)
    np.testing.assert_array_equal(
        np.load(tmp_path / "mp" / "embeddings.npy"), np.load(single / "embeddings.npy")
    )
    assert mp._state.caption_col.to_pylist() == one._state.caption_col.to_pylist()
    assert mp._state.id_col.to_pylist() == one._state.id_col.to_pylist()
    assert mp.manifest["dedupe"] == one.manifest["dedupe"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
