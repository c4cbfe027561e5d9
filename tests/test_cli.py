"""The ``rvqa`` console script: one-line user errors, tracebacks for bugs, a lazy parser,
resolved configs written by every command that takes ``--config``, the ``evaluate``
defaults read from the config, and ``--nprobe`` / ``--ef-search`` at inference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from rvqa import cli
from rvqa.cli import main
from rvqa.config import config_to_dict, load_config
from rvqa.errors import ConfigError, RunFolderError, UnknownIndexError, UsageError

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "faiss", "accelerate", "datasets")


# --------------------------------------------------------------------------- laziness


def test_help_and_parser_load_no_torch():
    """`rvqa --help`, every `rvqa COMMAND --help` and build_parser import no model code."""
    code = (
        "import sys\n"
        "from rvqa.cli import COMMANDS, build_parser, main\n"
        "build_parser()\n"
        "for argv in [['--help'], *([name, '--help'] for name in COMMANDS)]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY=", proc.stdout[-300:]


# --------------------------------------------------------------------------- errors


def _with_command(monkeypatch, name: str, run) -> None:
    monkeypatch.setitem(cli.COMMANDS, name, cli.COMMANDS[name]._replace(run=run))


@pytest.mark.parametrize(
    "error",
    [
        UsageError("--a and --b exclude each other"),
        ConfigError("x.yaml: unknown key 'foo'"),
        UnknownIndexError("unknown index 'nope' (loaded: a)"),
        RunFolderError("runs/x/rvqa_run.json is missing"),
        FileNotFoundError("no such file: x"),
        FileExistsError("indices/x already exists"),
        NotADirectoryError("x is not a folder"),
        IsADirectoryError("x is a folder"),
        PermissionError("x: permission denied"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_user_errors_print_one_line_and_exit_1(monkeypatch, capsys, error):
    def run(args):
        raise error

    _with_command(monkeypatch, "config", run)
    assert main(["config"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"rvqa config: error: {error}"]
    assert "'" not in err.split("error: ")[1][:1]  # a KeyError subclass is not quoted


@pytest.mark.parametrize(
    "error",
    [
        TypeError("unsupported operand"),
        KeyError("missing_key"),
        ImportError("cannot import name 'x' from 'rvqa.y'"),
        ValueError("a bug's ValueError"),
        AttributeError("'NoneType' object has no attribute 'x'"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_internal_errors_show_the_traceback(monkeypatch, capsys, error):
    def run(args):
        raise error

    _with_command(monkeypatch, "config", run)
    assert main(["config"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):"), err
    assert f"{type(error).__name__}: {error}" in err
    assert "in run\n" in err  # the frame that raised
    assert err.strip().splitlines()[-1] == (
        "rvqa config: this is a bug in rvqa; please report it with the traceback above"
    )


def test_debug_reraises_a_user_error(monkeypatch):
    def run(args):
        raise UsageError("nope")

    _with_command(monkeypatch, "config", run)
    with pytest.raises(UsageError, match="nope"):
        main(["config", "--debug"])


def test_real_user_errors_are_one_line(capsys, tmp_path):
    assert main(["config", "--set", "reader.no_such_key=1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("rvqa config: error: ") and "no_such_key" in err[0]
    assert main(["evaluate", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"rvqa evaluate: error: run folder {tmp_path / 'nowhere'} does not exist"]
    build = ["build-index", "--retriever", str(tmp_path / "noret"), "--out", str(tmp_path / "i")]
    assert main([*build, "--captions", "x.csv"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["rvqa build-index: error: --captions: x.csv does not exist (or use 'easy_vqa')"]
    (tmp_path / "c.csv").write_text("a cat\n")
    assert main([*build, "--captions", str(tmp_path / "c.csv")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot tell the format of" in err[0]
    assert main([*build, "--captions", "easy_vqa"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"retriever folder {tmp_path / 'noret'} does not exist" in err[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train-reader", "--set", "reader.val_fraction=1.5"], "val_fraction must be in (0, 1)"),
        (["train-reader", "--set", "reader.answer_vocab_size=0"], "size must be a positive"),
        (["train-retriever", "--set", "retriever.embed_dim=0"], "embed_dim must be"),
        (["train-retriever", "--set", "retriever.vision_backbone=no/such-model"], "cannot load"),
    ],
)
def test_bad_settings_are_one_line_user_errors(capsys, tmp_path, args, message):
    """Values that only fail deep inside a run still print one line, not a traceback."""
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"rvqa {args[0]}: error: "), err
    assert message in err[0]


def test_too_large_image_is_a_one_line_user_error(capsys, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (7000, 6000)).save(big)  # 42 MP: over the 40 MP limit
    args = ["ask", "--model", str(tmp_path), "--image", str(big), "--question", "what?"]
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "rvqa ask: error: " in err[0] and "pixels" in err[0], err


def test_commands_table():
    """Every command has help, examples, an argument builder and a function."""
    assert list(cli.COMMANDS) == [
        "config",
        "make-knowledge-task",
        "train-retriever",
        "evaluate-retriever",
        "build-index",
        "index-info",
        "train-reader",
        "train-reranker",
        "demo",
        "ask",
        "evaluate",
        "serve",
    ]
    for name, cmd in cli.COMMANDS.items():
        assert cmd.help and "rvqa " + name in cmd.examples, name
        assert callable(cmd.add_args) and callable(cmd.run)


# --------------------------------------------------------------------------- resolved configs


def _config_file(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def test_training_wrote_its_resolved_configs(tiny_run):
    """train-retriever / train-reader: OUTPUT_DIR/retriever/config.yaml and reader/config.yaml."""
    for part in ("retriever", "reader"):
        cfg = load_config(tiny_run / part / "config.yaml")
        assert cfg.output_dir == str(tiny_run)


def test_build_index_writes_the_resolved_config_beside_the_manifest(tiny_run, tmp_path, capsys):
    from rvqa.retriever.index import KnowledgeIndex
    from rvqa.run_layout import retriever_dir
    from tests.tiny import tiny_run_config

    cfg = tiny_run_config(tiny_run.parent)
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(json.dumps({"caption": c}) + "\n" for c in ["a cat", "a dog", "a b"]))
    out = tmp_path / "idx"
    argv = ["build-index", "--config", str(_config_file(tmp_path, cfg))]
    argv += ["--set", "index.batch_size=7", "--retriever", str(retriever_dir(tiny_run))]
    assert main([*argv, "--captions", str(jsonl), "--out", str(out)]) == 0
    written = load_config(out / "config.yaml")
    assert written.index.batch_size == 7
    cfg.index.batch_size = 7
    assert config_to_dict(written) == config_to_dict(cfg)
    index = KnowledgeIndex.load(out, verify=True)  # the extra file is tolerated
    assert len(index) == 3
    rebuilt = tmp_path / "rebuilt"
    assert main(["build-index", "--from-index", str(out), "--out", str(rebuilt)]) == 0
    assert load_config(rebuilt / "config.yaml").index.batch_size == 256  # the defaults'


def test_evaluate_writes_its_config_and_reads_its_defaults(tiny_run, tmp_path, capsys):
    """--split / --max-questions default to data.eval_split / data.max_eval_questions."""
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_run), "--no-retrieval", "--out", str(out)]
    assert main([*argv, "--set", "data.max_eval_questions=10"]) == 0
    assert "on 10 questions" in capsys.readouterr().out
    assert len(json.loads((out / "predictions.json").read_text())) == 10
    written = load_config(out / "config.yaml")
    run_cfg = load_config(tiny_run / "reader" / "config.yaml")
    assert written.data.max_eval_questions == 10 and written.data.eval_split == "test"
    run_cfg.data.max_eval_questions = 10
    assert config_to_dict(written) == config_to_dict(run_cfg)
    assert main([*argv, "--max-questions", "6", "--split", "test"]) == 0
    assert "on 6 questions" in capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert "- split: test" in summary and "- questions: 6" in summary
    assert main([*argv, "--set", "data.eval_split=nope"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert main([*argv, "--max-questions", "-1"]) == 1
    assert "--max-questions must be ≥ 0" in capsys.readouterr().err


def test_evaluate_help_documents_the_config_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "data.eval_split" in text and "data.max_eval_questions" in text
    assert "--nprobe" in text and "--ef-search" in text


def test_evaluate_retriever_end_to_end(tiny_run, tmp_path, capsys):
    from rvqa.run_layout import retriever_dir

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        yaml.safe_dump({"retriever": {"captions": {"source": "easy_vqa"}}}, sort_keys=False)
    )
    out = tmp_path / "reval"
    argv = ["evaluate-retriever", "--config", str(cfg_file), "--model"]
    argv += [str(retriever_dir(tiny_run)), "--split", "test", "--json", "--out", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}
    assert json.loads((out / "metrics.json").read_text()) == printed
    assert printed["rsum"] == pytest.approx(sum(v for k, v in printed.items() if "_r" in k))
    assert load_config(out / "config.yaml").retriever.captions.source == "easy_vqa"


# --------------------------------------------------------------------------- nprobe / ef_search


@pytest.fixture(scope="module")
def hnsw_index(tiny_run, tmp_path_factory):
    """The run's index rebuilt as HNSW (its search parameter: efSearch)."""
    from rvqa.indexing import build_index_from_config
    from tests.tiny import tiny_run_config

    out = tmp_path_factory.mktemp("hnsw") / "tiny-hnsw"
    cfg = tiny_run_config(tiny_run.parent)
    return build_index_from_config(
        cfg, from_index=cfg.index.folder(), out=out, factory="HNSW8", ef_construction=16
    )


def _ef_search(index) -> int:
    import faiss

    return faiss.downcast_index(index._state.cpu_index).hnsw.efSearch


def test_ef_search_reaches_the_faiss_index(tiny_run, hnsw_index):
    from rvqa import RVQA

    model = RVQA.from_pretrained(tiny_run, device="cpu", ef_search=7, nprobe=3)
    flat = model.registry.get("tiny-captions")
    assert "efSearch" not in flat.search_params and "nprobe" not in flat.search_params
    model.load_index(hnsw_index, name="h")  # the model's default applies
    h = model.registry.get("h")
    assert h.search_params == {"efSearch": 7} and _ef_search(h) == 7
    model.swap_index(hnsw_index, name="h", ef_search=11)  # an explicit value wins
    assert _ef_search(model.registry.get("h")) == 11
    built = RVQA.from_pretrained(tiny_run, device="cpu", load_indices=False)
    built.load_index(hnsw_index, name="h")
    tuned = json.loads((hnsw_index / "manifest.json").read_text())["search_params"]["efSearch"]
    assert _ef_search(built.registry.get("h")) == tuned  # without: as built
    with pytest.raises(UsageError, match="nprobe does not apply"):
        built.load_index(hnsw_index, name="h2", nprobe=4)
    with pytest.raises(UsageError, match="ef_search does not apply.*exact search"):
        built.load_index(flat.path, name="f", ef_search=4)
    with pytest.raises(UsageError, match="ef_search must be ≥ 1"):
        RVQA.from_pretrained(tiny_run, device="cpu", ef_search=0)


@pytest.mark.parametrize("command", ["ask", "evaluate"])
def test_cli_ef_search_flag_reaches_the_index(tiny_run, hnsw_index, tmp_path, monkeypatch, command):
    import easy_vqa

    from rvqa.pipeline import KnowledgeIndex

    loaded = []
    original = KnowledgeIndex.load.__func__

    def spy(cls, *args, **kwargs):
        index = original(cls, *args, **kwargs)
        loaded.append(index)
        return index

    monkeypatch.setattr(KnowledgeIndex, "load", classmethod(spy))
    if command == "ask":
        argv = ["ask", "--model", str(tiny_run), "--image", easy_vqa.get_test_image_paths()[0]]
        argv += ["--question", "what shape is it?", "--device", "cpu", "--json"]
    else:
        argv = ["evaluate", "--model", str(tiny_run), "--max-questions", "4"]
        argv += ["--out", str(tmp_path / "e")]
    assert main([*argv, "--index", str(hnsw_index), "--ef-search", "9"]) == 0
    hnsw = [i for i in loaded if i.name == "tiny-hnsw"]
    assert len(hnsw) == 1 and _ef_search(hnsw[0]) == 9


def test_evaluate_reads_ef_search_from_the_config(tiny_run, hnsw_index, tmp_path, monkeypatch):
    from rvqa.pipeline import KnowledgeIndex

    seen = []
    original = KnowledgeIndex.load.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("ef_search"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(KnowledgeIndex, "load", classmethod(spy))
    argv = ["evaluate", "--model", str(tiny_run), "--max-questions", "4", "--index"]
    argv += [str(hnsw_index), "--set", "index.ef_search=5", "--out", str(tmp_path / "e")]
    assert main(argv) == 0
    assert seen == [None, 5]  # the Flat run index as built; the HNSW one with the config's
