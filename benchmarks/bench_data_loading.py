"""Memory and time of reading the official VQAv2 files: ``json.load`` vs rvqa's streaming reader.

Writes a synthetic questions + annotations pair in the official format at each
size (VQAv2 train2014: 443,757 questions about 82,783 images, 10 answers each,
~750 bytes of JSON per annotation), then reads it with
:func:`rvqa.data.read_vqa_files` in a fresh subprocess per (size, reader):

* ``json.load``: the reader as it was before streaming — each file parsed whole
  with ``json.load`` and then checked item by item into the same columns (the
  streaming function is replaced by one that does exactly that);
* ``stream``: rvqa as it is (``ijson``, one 1 MiB chunk of items at a time).

Each child reports its peak resident memory (``ru_maxrss``), the resident memory
just after importing rvqa (``base``) and just after reading with the dataset
still alive (``kept``: what the columns hold, plus what the allocator did not
give back), and the wall time of the read.

    python benchmarks/bench_data_loading.py --sizes 27000 443757 --work /tmp/rvqa-bench-data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS_PER_IMAGE = 443_757 / 82_783  # VQAv2 train2014
_WORDS = [f"w{i}" for i in range(3000)] + ["yes", "no"] * 600 + [str(i) for i in range(20)] * 30
_TYPES = [f"what type {i}" for i in range(65)]


def write_split(folder: Path, n_questions: int, seed: int = 0) -> dict[str, Path]:
    """Official-format questions + annotations files with ``n_questions`` questions."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    q_path = folder / "v2_OpenEnded_mscoco_train2014_questions.json"
    a_path = folder / "v2_mscoco_train2014_annotations.json"
    n_images = max(1, round(n_questions / QUESTIONS_PER_IMAGE))
    image_ids = rng.sample(range(1, 581_930), n_images)  # distinct COCO-range ids
    rows = [
        (image_ids[i % n_images] * 1000 + i // n_images, image_ids[i % n_images])
        for i in range(n_questions)
    ]
    with open(q_path, "w", encoding="utf-8") as f:
        f.write(
            '{"info": {"description": "synthetic VQAv2"}, "task_type": "Open-Ended", '
            '"data_type": "mscoco", "license": {"name": "CC BY 4.0"}, "data_subtype": '
            '"train2014", "questions": ['
        )
        for k, (qid, image_id) in enumerate(rows):
            words = " ".join(rng.choices(_WORDS[:3000], k=rng.randint(3, 8)))
            q = {"image_id": image_id, "question": f"What is the {words}?", "question_id": qid}
            f.write(("," if k else "") + json.dumps(q))
        f.write("]}")
    with open(a_path, "w", encoding="utf-8") as f:
        f.write(
            '{"info": {"description": "synthetic VQAv2"}, "license": {"name": "CC BY 4.0"}, '
            '"data_subtype": "train2014", "annotations": ['
        )
        for k, (qid, image_id) in enumerate(rows):
            answers = rng.choices(_WORDS, k=10)
            a = {
                "question_type": rng.choice(_TYPES),
                "multiple_choice_answer": answers[0],
                "answers": [
                    {
                        "answer": x,
                        "answer_confidence": rng.choice(["yes", "maybe", "no"]),
                        "answer_id": j + 1,
                    }
                    for j, x in enumerate(answers)
                ],
                "image_id": image_id,
                "answer_type": rng.choice(["yes/no", "number", "other"]),
                "question_id": qid,
            }
            f.write(("," if k else "") + json.dumps(a))
        f.write("]}")
    return {"questions": q_path, "annotations": a_path, "images": folder / "train2014"}


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _stream_via_json_load(path, what, arrays, values=None):
    """The pre-streaming reader: the whole document from ``json.load``, then its items."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for key in values or {}:
        if key in data:
            values[key] = data[key]
    for key in arrays:
        for i, item in enumerate(data[key]):
            yield key, i, item


def child(mode: str, questions: str, annotations: str, images: str) -> None:
    """Read one split (in this fresh process) and print the figures as JSON."""
    import gc

    import rvqa.data.official as official
    from rvqa.data import read_vqa_files

    if mode == "json.load":
        official.stream_json = _stream_via_json_load
    gc.collect()
    base = _rss_now_mb()
    t = time.perf_counter()
    ds = read_vqa_files(questions, annotations, images)
    seconds = time.perf_counter() - t
    gc.collect()
    kept = _rss_now_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "questions": len(ds),
                "seconds": seconds,
                "base_mb": base,
                "kept_mb": kept,
                "peak_mb": peak,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[27_000, 443_757],
        help="questions per synthetic split",
    )
    ap.add_argument("--work", default="/tmp/rvqa-bench-data", help="where the files go")
    ap.add_argument(
        "--child", nargs=4, metavar=("MODE", "Q", "A", "IMAGES"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    for n in args.sizes:
        folder = Path(args.work) / f"vqa{n}"
        paths = write_split(folder, n)
        mb = sum(p.stat().st_size for p in (paths["questions"], paths["annotations"])) / 2**20
        for mode in ("json.load", "stream"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode, *map(str, paths.values())],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                sys.exit(f"{mode} reader failed on {n} questions:\n{proc.stderr}")
            out = proc.stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append((n, mb, mode, r))
            print(
                f"{n:>8,} questions ({mb:,.0f} MB JSON)  {mode:<9}  read {r['seconds']:6.1f} s  "
                f"peak RSS {r['peak_mb']:7,.0f} MB  kept {r['kept_mb']:6,.0f} MB  "
                f"(after import {r['base_mb']:,.0f} MB)",
                flush=True,
            )
    print(
        "\n| questions | JSON (MB) | reader | read (s) | peak RSS (MB) | RSS kept (MB) | peak − after import (MB) |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for n, mb, mode, r in rows:
        print(
            f"| {n:,} | {mb:,.0f} | {mode} | {r['seconds']:.1f} | {r['peak_mb']:,.0f} | "
            f"{r['kept_mb']:,.0f} | {r['peak_mb'] - r['base_mb']:,.0f} |"
        )


if __name__ == "__main__":
    main()
