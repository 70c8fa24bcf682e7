import pytest

from codiemb.config import load_config
from codiemb.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=1e-4", "model.max_length.query=32", "sampler.policy=temperature"])
    assert cfg.train.lr == 1e-4
    assert cfg.model.max_length.query == 32
    assert cfg.sampler.policy == "temperature"


def test_unknown_key_names_its_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-4\n  lrr: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'train.lrr'"):
        load_config(f)


def test_wrong_type_names_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("scaling:\n  num_workers: many\n")
    with pytest.raises(ConfigError, match=r"'scaling.num_workers'"):
        load_config(f)


def test_invalid_yaml_names_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+ invalid YAML"):
        load_config(f)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/c.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_override_into_list(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  datasets:\n    - {name: a, task: sts, path: x.jsonl, score_range: [0, 5]}\n")
    cfg = load_config(f, ["data.datasets.0.batch_size=8"])
    assert cfg.data.datasets[0].batch_size == 8


def test_duplicate_dataset_names(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  datasets:\n    - {name: a, task: sts, path: x}\n    - {name: a, task: sts, path: y}\n")
    with pytest.raises(ConfigError, match="unique"):
        load_config(f)


def test_roundtrip_yaml(tmp_path):
    cfg = load_config(None, ["run.seed=7"])
    f = tmp_path / "r.yaml"
    f.write_text(cfg.to_yaml())
    assert load_config(f) == cfg
    assert cfg.flat()["run.seed"] == 7
