"""The offline knowledge task (``rvqa.data.knowledge``, ``rvqa make-knowledge-task``):
assignments, facts, the task folder read by the official loader and the jsonl caption
source, determinism, controls, errors and the CLI."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from rvqa.cli import main
from rvqa.config import CaptionDataConfig, SplitFiles, VQADataConfig, load_config
from rvqa.data import easy_vqa_images, load_captions, load_image, load_vqa
from rvqa.data.knowledge import (
    COLORS,
    EMBLEMS,
    FACT_KINDS,
    GOODS,
    KNOWLEDGE_QUESTIONS,
    READER_CAPTION_LENGTH,
    SHAPES,
    TEST_IMAGE_ID_OFFSET,
    Emblem,
    Fact,
    augment_assignment_numbers,
    check_facts,
    emblem_facts,
    knowledge_assignment,
    knowledge_run_config,
    make_knowledge_task,
    num_assignments,
    parse_fact,
    shuffled_assignment,
)
from rvqa.errors import KnowledgeTaskError, UsageError
from rvqa.metrics import NUM_HUMAN_ANSWERS

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 30, 12
KIND_OF_TYPE = {q.question_type: q.kind for q in KNOWLEDGE_QUESTIONS}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("knowledge") / "task"
    manifest = make_knowledge_task(
        out, max_train_images=N_TRAIN, max_test_images=N_TEST, augment_assignments=5
    )
    return out, manifest


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _facts_file(path: Path) -> dict[Emblem, Fact]:
    """emblem -> its parsed fact card, from a facts JSONL file (one card per emblem)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    facts = check_facts([line["caption"] for line in lines], str(path))
    assert len({f.emblem for f in facts}) == len(facts)
    return {f.emblem: f for f in facts}


def _emblem_of_images() -> dict[int, Emblem]:
    out = {}
    for split, offset in (("train", 0), ("test", TEST_IMAGE_ID_OFFSET)):
        for im in easy_vqa_images(split):
            if im.color and im.shape:
                out[im.image_id + offset] = Emblem(im.color, im.shape)
    return out


def _vqa_config(root: Path) -> VQADataConfig:
    """A VQADataConfig written by hand (not the generated one): the folder's official files."""
    return VQADataConfig(
        source="vqa",
        splits={
            "train": SplitFiles(
                questions=str(root / "OpenEnded_knowledge_train_questions.json"),
                annotations=str(root / "knowledge_train_annotations.json"),
                images=str(root / "images/train"),
            ),
            "test": SplitFiles(
                questions=str(root / "OpenEnded_knowledge_test_questions.json"),
                annotations=str(root / "knowledge_test_A_annotations.json"),
                images=str(root / "images/test"),
            ),
            "test_B": SplitFiles(
                questions=str(root / "OpenEnded_knowledge_test_questions.json"),
                annotations=str(root / "knowledge_test_B_annotations.json"),
                images=str(root / "images/test"),
            ),
        },
    )


# --------------------------------------------------------------------------- assignments


def test_assignments_have_24_distinct_lowercase_entities_and_disjoint_names():
    assert len(EMBLEMS) == 24 == len(COLORS) * len(SHAPES)
    assert len(GOODS) >= 48 and len(set(GOODS)) == len(GOODS)
    assert all(g.isalpha() and g.islower() for g in GOODS)
    n = num_assignments()
    assert n >= 42
    numbers = [0, 1, *range(2, 42), n - 1]
    names, cities = set(), set()
    for k in numbers:
        a = knowledge_assignment(k)
        assert a.number == k and [e.emblem for e in a.entities] == list(EMBLEMS)
        for kind in FACT_KINDS:
            values = [e.value(kind) for e in a.entities]
            assert len(set(values)) == 24, (k, kind)  # distinct within an assignment
            assert all(v.isalpha() and v.islower() for v in values)
        assert {e.good for e in a.entities} <= set(GOODS)
        a_names, a_cities = {e.name for e in a.entities}, {e.city for e in a.entities}
        assert not a_names & names and not a_cities & cities, k  # disjoint across assignments
        assert not a_names & a_cities and not (a_names | a_cities) & set(GOODS)
        names |= a_names
        cities |= a_cities
    assert not names & cities
    assert knowledge_assignment(3) == knowledge_assignment(3)


@pytest.mark.parametrize("bad", [-1, 10**6, "1", 1.0, True, None])
def test_an_assignment_that_does_not_exist_is_named(bad):
    with pytest.raises(KnowledgeTaskError) as err:
        knowledge_assignment(bad)
    assert repr(bad) in str(err.value)
    assert f"0 to {num_assignments() - 1}" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_augmentation_assignments():
    assert augment_assignment_numbers(3, 0, 1) == [2, 3, 4]
    assert augment_assignment_numbers(3, 2, 0) == [1, 3, 4]
    assert augment_assignment_numbers([9, 5], 0, 1) == [9, 5]
    for bad, match in (
        ([5, 1], "augmentation assignment 1 is the train"),
        ([5, 5], r"\[5\] are given more than once"),
        ([], "empty"),
        ([10**6], "1000000 does not exist"),
        (0, "out of range"),
        (num_assignments(), "out of range"),
    ):
        with pytest.raises(KnowledgeTaskError, match=match):
            augment_assignment_numbers(bad, 0, 1)
    with pytest.raises(TypeError):
        augment_assignment_numbers("3", 0, 1)


# --------------------------------------------------------------------------- facts


def test_parse_fact_inverts_the_fact_card():
    a = knowledge_assignment(7)
    assert a.facts() == [emblem_facts(e) for e in a.entities]
    for e in a.entities:
        text = emblem_facts(e)
        assert text == (
            f"the {e.emblem} is the emblem of {e.name}, which trades in {e.good} "
            f"and is based in {e.city}."
        )  # one card: the emblem and all three answers
        fact = parse_fact(text)
        assert fact == Fact(e.emblem, e.name, e.good, e.city)
        assert [fact.value(k) for k in FACT_KINDS] == [e.value(k) for k in FACT_KINDS]
    assert len(check_facts(a.facts(), "assignment 7", assignment=a)) == 24
    with pytest.raises(KnowledgeTaskError, match="'colour'"):
        parse_fact(a.facts()[0]).value("colour")


def test_check_facts_names_the_first_text_that_is_not_a_fact():
    facts = knowledge_assignment(0).facts()
    with pytest.raises(KnowledgeTaskError) as err:
        check_facts([facts[0], "a blue circle", facts[1]], "indices/easyvqa-captions")
    msg = str(err.value)
    assert "indices/easyvqa-captions" in msg and "text 1" in msg and "'a blue circle'" in msg
    with pytest.raises(KnowledgeTaskError, match="purple"):
        parse_fact(
            "the purple circle is the emblem of kavelo, which trades in salt and is based in meseport."
        )
    # the old one-fact-per-kind sentences are not facts any more
    with pytest.raises(KnowledgeTaskError, match="which trades in"):
        parse_fact("the red circle is the emblem of kavelo.")
    with pytest.raises(TypeError, match="string"):
        parse_fact(7)
    # a well-formed fact of another assignment is not a fact of this one
    other = knowledge_assignment(1).facts()[4]
    with pytest.raises(KnowledgeTaskError, match="not a fact of assignment 0") as err:
        check_facts([facts[0], other], "facts/B.jsonl", assignment=knowledge_assignment(0))
    assert repr(other) in str(err.value)
    # a card right in its name and city but wrong in its good is named, with the true card
    a0 = knowledge_assignment(0).entities[0]
    wrong_good = facts[0].replace(f" in {a0.good} ", " in saltpeter ")
    with pytest.raises(KnowledgeTaskError) as err:
        check_facts([wrong_good], "facts/A.jsonl", assignment=knowledge_assignment(0))
    msg = str(err.value)
    assert "text 0" in msg and repr(wrong_good) in msg and "wrong good" in msg
    assert repr(facts[0]) in msg


def test_shuffled_control_leaves_no_emblem_its_true_value():
    a = knowledge_assignment(0)
    for seed in range(5):
        s = shuffled_assignment(a, seed)
        assert sorted(s.terms()) == sorted(a.terms())  # the same values, moved
        for true, moved in zip(a.entities, s.entities):
            assert true.emblem == moved.emblem
            assert all(true.value(k) != moved.value(k) for k in FACT_KINDS)


def test_reader_caption_length_fits_the_longest_fact_of_any_assignment():
    """READER_CAPTION_LENGTH = MiniLM tokens (no [CLS]/[SEP]) of the longest fact there is."""
    from tokenizers import Tokenizer

    from rvqa.towers.backbones import packaged_minilm_path

    tok = Tokenizer.from_file(str(packaged_minilm_path() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    facts = [f for k in range(num_assignments()) for f in knowledge_assignment(k).facts()]
    longest = max(len(e.ids) for e in tok.encode_batch(facts, add_special_tokens=False))
    assert longest == READER_CAPTION_LENGTH


# --------------------------------------------------------------------------- the task folder


def test_official_loader_reads_every_split_with_answers_of_its_assignment(task):
    root, manifest = task
    emblem_of = _emblem_of_images()
    facts = {
        "A": _facts_file(root / "facts/A.jsonl"),
        "B": _facts_file(root / "facts/B.jsonl"),
    }
    cfg = _vqa_config(root)
    test_ids = None
    for split, role, n_images in (
        ("train", "A", N_TRAIN),
        ("test", "A", N_TEST),
        ("test_B", "B", N_TEST),
    ):
        ds = load_vqa(cfg, split)
        assert len(ds) == 3 * n_images == manifest["splits"][split]["num_questions"]
        ids = sorted({r.image_id for r in ds})
        assert len(ids) == n_images
        if split == "train":
            assert max(ids) < TEST_IMAGE_ID_OFFSET
        else:
            assert min(ids) >= TEST_IMAGE_ID_OFFSET
            assert test_ids in (None, ids)  # test and test_B: the same questions
            test_ids = ids
        types = {r.question_type for r in ds}
        assert types == set(KIND_OF_TYPE)
        for r in ds:
            assert len(r.answers) == NUM_HUMAN_ANSWERS and len(set(r.answers)) == 1
            assert r.answer_type == "other"
            kind = KIND_OF_TYPE[r.question_type]
            card = facts[role][emblem_of[r.image_id]]  # one card answers every question
            assert r.answers[0] == r.multiple_choice_answer == card.value(kind)
        for path in {r.image for r in ds}:
            assert path.endswith(".jpg") and os.path.isfile(path)
        img = load_image(ds[0].image)
        assert img.mode == "RGB" and img.size == (64, 64)
    assert manifest["chance_accuracy"] == {
        "whose emblem is": 1 / 24,
        "what does the owner": 1 / 24,
        "where is the owner": 1 / 24,
        "overall": 1 / 24,
    }


def test_test_and_test_B_differ_in_every_name_and_city(task):
    root, manifest = task
    cfg = _vqa_config(root)
    a, b = load_vqa(cfg, "test"), load_vqa(cfg, "test_B")
    assert [r.question_id for r in a] == [r.question_id for r in b]
    same = {t: 0 for t in KIND_OF_TYPE}
    for x, y in zip(a, b):
        same[x.question_type] += x.answers[0] == y.answers[0]
    assert same == manifest["test_B_answers_same_as_A"]
    assert same["whose emblem is"] == same["where is the owner"] == 0
    assert all(
        x.answers[0] != y.answers[0]
        for x, y in zip(a, b)
        if x.question_type != "what does the owner"
    )


def test_generated_run_config_reads_the_task(task):
    root, manifest = task
    cfg = load_config(root / "knowledge.yaml")
    assert Path(cfg.data.splits["train"].questions).is_absolute()
    assert len(load_vqa(cfg.data, "test_B")) == 3 * N_TEST
    assert cfg.index.name == "knowledge-A" and cfg.reader.top_k == 1
    assert cfg.reader.term_worlds.endswith("worlds-with-swap.json")
    assert cfg.reader.max_caption_length == READER_CAPTION_LENGTH
    facts = load_captions(cfg.index.captions)
    assert [r.caption for r in facts] == knowledge_assignment(0).facts()
    assert all(r.image is None for r in facts)
    pairs = load_captions(cfg.retriever.captions)
    assert len(pairs) == N_TRAIN == manifest["num_retriever_captions"]  # one card per image
    assert all(os.path.isfile(r.image) for r in pairs)


def test_jsonl_caption_source_reads_every_fact_file(task):
    root, manifest = task
    for label in ("A", "B", "A-shuffled"):
        corpus = load_captions(
            CaptionDataConfig(source="jsonl", path=str(root / f"facts/{label}.jsonl"))
        )
        assert len(corpus) == 24 == manifest["num_facts"][label]
        parsed = check_facts([r.caption for r in corpus], label)
        assert [f.emblem for f in parsed] == list(EMBLEMS)  # one card per emblem
        assert [r.caption_id for r in corpus] == [f"{label}-{e.color}-{e.shape}" for e in EMBLEMS]
    check_facts(
        [
            r.caption
            for r in load_captions(
                CaptionDataConfig(source="jsonl", path=str(root / "facts/B.jsonl"))
            )
        ],
        "B",
        assignment=knowledge_assignment(1),
    )


def test_shuffled_fact_file_is_wrong_for_every_emblem(task):
    root, _ = task
    true = knowledge_assignment(0)
    shuffled = _facts_file(root / "facts/A-shuffled.jsonl")
    assert sorted(shuffled) == list(EMBLEMS)
    owners = {e.name: e for e in true.entities}
    for e in true.entities:
        card = shuffled[e.emblem]
        for kind in FACT_KINDS:
            assert card.value(kind) != e.value(kind)
        moved = owners[card.name]  # a whole entity of A, moved from another emblem
        assert moved.emblem != e.emblem and (card.good, card.city) == (moved.good, moved.city)


def test_retriever_captions_are_the_image_emblems_cards_under_augmentation_assignments(task):
    root, manifest = task
    augment = manifest["augment_assignments"]
    assert augment == [2, 3, 4, 5, 6]
    emblem_of = _emblem_of_images()
    b_terms = set(knowledge_assignment(1).terms()) - set(GOODS)
    a_terms = set(knowledge_assignment(0).terms()) - set(GOODS)
    rows = [
        json.loads(line) for line in (root / "retriever_captions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == len({row["image_id"] for row in rows}) == N_TRAIN  # one card per image
    used = set()
    for row in rows:
        fact = parse_fact(row["caption"])
        assert fact.emblem == emblem_of[row["image_id"]]
        assert row["image"].startswith("images/train/")  # relative to the task folder
        owners = [
            k for k in augment if knowledge_assignment(k).entity(fact.emblem).name == fact.name
        ]
        assert len(owners) == 1
        check_facts([row["caption"]], "row", assignment=knowledge_assignment(owners[0]))
        used.add(owners[0])
        assert not set(row["caption"].rstrip(".").replace(",", "").split()) & (b_terms | a_terms)
    assert len(used) > 1  # names vary across captions


def test_worlds_never_hold_B_terms_and_worlds_with_swap_does(task):
    root, _ = task
    a, b = knowledge_assignment(0), knowledge_assignment(1)
    worlds = json.loads((root / "worlds.json").read_text())
    swap = json.loads((root / "worlds-with-swap.json").read_text())
    assert worlds["base"] == swap["base"] == 0
    assert list(worlds["worlds"]) == ["2", "3", "4", "5", "6"]
    assert list(swap["worlds"]) == ["2", "3", "4", "5", "6", "1"]
    b_names = {e.name for e in b.entities} | {e.city for e in b.entities}
    for k, table in worlds["worlds"].items():
        other = knowledge_assignment(int(k))
        assert list(table) == a.terms()  # every A term, mapped
        assert list(table.values()) == other.terms()  # to the same emblem's value in k
        assert not (set(table) | set(table.values())) & b_names
    assert list(swap["worlds"]["1"].values()) == b.terms()
    assert {k: v for k, v in swap["worlds"].items() if k != "1"} == worlds["worlds"]


def test_manifest_counts_and_tables(task):
    root, manifest = task
    assert json.loads((root / "task.json").read_text()) == manifest
    assert manifest["train_assignment"] == 0 and manifest["swap_assignment"] == 1
    assert manifest["splits"]["train"]["questions_per_type"] == dict.fromkeys(KIND_OF_TYPE, N_TRAIN)
    assert manifest["splits"]["test_B"]["assignment"] == 1
    assert manifest["emblems"]["A"] == knowledge_assignment(0).table()
    assert manifest["emblems"]["B"] == knowledge_assignment(1).table()
    images = {s: len(easy_vqa_images(s)) for s in ("train", "test")}
    usable = {s: images[s] - manifest["skipped_images"][s] for s in images}
    assert all(0 < manifest["skipped_images"][s] < images[s] / 4 for s in images)
    assert all(usable[s] >= 100 for s in usable)
    assert not any(str(root) in line for line in (root / "task.json").read_text().splitlines())


def test_generation_is_deterministic(task, tmp_path):
    root, _ = task
    first = _files(root)
    make_knowledge_task(
        root,
        max_train_images=N_TRAIN,
        max_test_images=N_TEST,
        augment_assignments=5,
        overwrite=True,
    )
    assert _files(root) == first  # byte-identical, the same folder
    other = tmp_path / "again"
    make_knowledge_task(
        other, max_train_images=N_TRAIN, max_test_images=N_TEST, augment_assignments=5
    )
    second = _files(other)
    assert second.keys() == first.keys()
    # Only the run config names its folder (absolute data paths).
    assert {k for k in first if first[k] != second[k]} == {"knowledge.yaml"}
    assert second["knowledge.yaml"] == first["knowledge.yaml"].replace(
        str(root).encode(), str(other).encode()
    )
    make_knowledge_task(
        other,
        max_train_images=N_TRAIN,
        max_test_images=N_TEST,
        augment_assignments=5,
        seed=1,
        overwrite=True,
    )
    changed = {k for k, v in _files(other).items() if second[k] != v}
    assert changed == {"facts/A-shuffled.jsonl", "retriever_captions.jsonl", "task.json"}


def test_bad_options_are_errors_before_anything_is_written(tmp_path):
    out = tmp_path / "t"
    with pytest.raises(KnowledgeTaskError, match="both 3"):
        make_knowledge_task(out, train_assignment=3, swap_assignment=3)
    with pytest.raises(KnowledgeTaskError, match=r"swap assignment \(B\) -2 does not exist"):
        make_knowledge_task(out, swap_assignment=-2)
    with pytest.raises(UsageError, match="max_train_images"):
        make_knowledge_task(out, max_train_images=0)
    with pytest.raises(TypeError, match="seed"):
        make_knowledge_task(out, seed="x")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_an_existing_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        make_knowledge_task(out, max_train_images=2, max_test_images=2)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    make_knowledge_task(out, max_train_images=2, max_test_images=2, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "task.json").is_file()


def test_repository_config_is_the_run_config_of_data_knowledge():
    data = yaml.safe_load((REPO / "configs/knowledge.yaml").read_text())
    assert data == knowledge_run_config("data/knowledge")
    cfg = load_config(REPO / "configs/knowledge.yaml")
    assert (
        cfg.data.splits["test_B"].annotations == "data/knowledge/knowledge_test_B_annotations.json"
    )


# --------------------------------------------------------------------------- CLI


def test_cli_makes_the_task_and_prints_counts_and_next_commands(tmp_path, capsys):
    out = tmp_path / "kt"
    args = ["make-knowledge-task", str(out), "--max-train-images", "6", "--max-test-images", "4"]
    assert (
        main(
            [
                *args,
                "--train-assignment",
                "4",
                "--swap-assignment",
                "9",
                "--augment-assignments",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    manifest = json.loads((out / "task.json").read_text())
    assert manifest["train_assignment"] == 4 and manifest["swap_assignment"] == 9
    assert manifest["augment_assignments"] == [0, 1, 2]
    assert re.search(r"train +6 images +18 questions +\(answers of assignment 4\)", printed)
    assert re.search(r"test_B +4 images +12 questions +\(answers of assignment 9\)", printed)
    assert "4.17" in printed
    assert f"--set index.captions.path={out}/facts/B.jsonl --out indices/knowledge-B" in printed
    # every printed rvqa command parses
    from rvqa.cli import build_parser

    for line in printed.splitlines():
        if line.strip().startswith("rvqa "):
            build_parser().parse_args(line.split()[1:])

    # errors: one line, exit 1
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--swap-assignment", "0"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "both 0" in err[0]
    assert main([*args, "--overwrite", "--train-assignment", "99999"]) == 1
    err = capsys.readouterr().err
    assert "rvqa make-knowledge-task: error: train assignment (A) 99999 does not exist" in err
