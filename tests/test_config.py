import logging
from pathlib import Path

import pytest
import yaml

from rvqa.cli import main
from rvqa.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_all_shipped_configs_load():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "tiny.yaml", "coco_vqav2.yaml", "okvqa.yaml"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig)


def test_full_scale_recipes_name_hub_checkpoints():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "coco_vqav2.yaml")
    assert cfg.retriever.vision_backbone.startswith("google/vit")
    assert cfg.reader.text_backbone == "bert-base-uncased"
    assert cfg.data.splits["val"].annotations.endswith("v2_mscoco_val2014_annotations.json")
    assert cfg.data.splits["test-dev"].annotations is None


def test_defaults_are_the_demo():
    assert load_config(None) == RunConfig()
    assert RunConfig().data.source == "easy_vqa"


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("reader:\n  learnig_rate: 0.1\n")
    with pytest.raises(
        ConfigError,
        match=r"bad\.yaml.*unknown key 'reader\.learnig_rate'.*Did you mean 'reader\.learning_rate'",
    ):
        load_config(path)


def test_nested_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  splits:\n    val:\n      question: q.json\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data\.splits\.val\.question'"):
        load_config(path)


def test_wrong_type_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("reader:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"reader\.batch_size: got 'many', expected an integer"):
        load_config(path)
    with pytest.raises(ConfigError, match="expected one of 'no', 'fp16', 'bf16'"):
        config_from_dict({"retriever": {"mixed_precision": "fp8"}})
    with pytest.raises(ConfigError, match="expected true or false"):
        config_from_dict({"index": {"dedupe": "yes please"}})


def test_bare_no_is_the_choice_no(tmp_path):
    # YAML 1.1 reads `no` as false: `mixed_precision: no` and `--set ...=no` mean "no"
    path = tmp_path / "mp.yaml"
    path.write_text("reader:\n  mixed_precision: no\n")
    assert load_config(path).reader.mixed_precision == "no"
    cfg = load_config(None, ["retriever.mixed_precision=bf16", "retriever.mixed_precision=no"])
    assert cfg.retriever.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"retriever\.mixed_precision: got True"):
        config_from_dict({"retriever": {"mixed_precision": True}})


def test_malformed_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("reader: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: malformed YAML"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_type_checked():
    cfg = load_config(
        None,
        [
            "reader.learning_rate=1e-4",
            "reader.max_grad_norm=null",
            "data.splits.val.questions=q.json",
        ],
    )
    assert cfg.reader.learning_rate == pytest.approx(1e-4)
    assert isinstance(cfg.reader.learning_rate, float)
    assert cfg.reader.max_grad_norm is None
    assert cfg.data.splits["val"].questions == "q.json"
    cfg = load_config(None, ["retriever.captions.splits=[train, val]", "reader.top_k=3"])
    assert cfg.retriever.captions.splits == ["train", "val"] and cfg.reader.top_k == 3
    with pytest.raises(ConfigError, match="unknown key 'reader.lr'"):
        load_config(None, ["reader.lr=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["reader.top_k=2.5"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["reader.top_k"])


def test_save_roundtrip(tmp_path):
    cfg = load_config(None, ["reader.top_k=3", "data.splits.val.questions=q.json"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert again == cfg
    assert config_to_dict(again)["reader"]["top_k"] == 3


def test_cli_config_and_errors(capsys):
    assert main(["config", "--set", "reader.top_k=7"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["reader"]["top_k"] == 7
    assert main(["config", "--set", "reader.nope=1"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "rvqa config: error: override 'reader.nope=1': unknown key 'reader.nope'"


def test_renamed_key_of_older_run_folders_still_loads(tmp_path):
    # A run folder's config.yaml written before `retriever.temperature` was renamed
    # `init_temperature` (the model config's name): `rvqa evaluate --model RUN` reads it.
    path = tmp_path / "config.yaml"
    path.write_text("retriever:\n  temperature: 0.05\n  margin: 0.3\n")
    cfg = load_config(path)
    assert cfg.retriever.init_temperature == pytest.approx(0.05)
    assert cfg.retriever.margin == pytest.approx(0.3)
    assert "temperature" not in config_to_dict(cfg)["retriever"]
    path.write_text("retriever:\n  temperature: 0.05\n  init_temperature: 0.1\n")
    with pytest.raises(
        ConfigError,
        match=r"retriever\.temperature is the old name of retriever\.init_temperature; "
        r"give only retriever\.init_temperature",
    ):
        load_config(path)


def test_removed_key_of_older_run_folders_still_loads(tmp_path, caplog):
    # `retriever.cache_images` (pixels of every image in memory) is gone: images stream
    # through DataLoader workers. Saved config.yaml files hold `cache_images: null`.
    path = tmp_path / "config.yaml"
    path.write_text("retriever:\n  cache_images: null\n  margin: 0.3\n")
    with caplog.at_level(logging.WARNING, logger="rvqa.config"):
        cfg = load_config(path)
    assert cfg.retriever.margin == pytest.approx(0.3) and not caplog.text
    assert "cache_images" not in config_to_dict(cfg)["retriever"]
    path.write_text("retriever:\n  cache_images: true\n")
    with caplog.at_level(logging.WARNING, logger="rvqa.config"):
        load_config(path)
    assert "retriever.cache_images is no longer used and is ignored" in caplog.text
