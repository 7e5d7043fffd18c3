import pytest

from llamalite.config import load_config
from llamalite.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "name: x\noptim:\n  lr: 6e-4\ntrain:\n  batch_tokens: 2**19\n")
    config = load_config(path, ["train.max_steps=12", "optim.betas=[0.8, 0.99]", "model.preset=tiny"])
    assert config.optim.lr == 6e-4  # YAML 1.1 reads 6e-4 as a string; it is coerced
    assert config.train.batch_tokens == 524288
    assert config.train.max_steps == 12
    assert config.optim.betas == [0.8, 0.99]
    assert config.model.n_layer == 6 and config.model.vocab_size == 4096


def test_preset_values_yield_to_explicit_keys(tmp_path):
    path = write(tmp_path, "model:\n  preset: dmas-1.7b\n  n_layer: 2\n  vocab_size: null\n")
    config = load_config(path)
    assert config.model.n_layer == 2 and config.model.d_model == 2048 and config.model.vocab_size is None


def test_unknown_key_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step': did you mean 'train.max_steps'"):
        load_config(write(tmp_path, "train:\n  max_step: 3\n"))
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load_config(None, ["optimm.lr=1"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].text_fiel"):
        load_config(write(tmp_path, "data:\n  sources:\n    - {type: jsonl, path: a, text_fiel: t}\n"))


def test_type_errors_are_named(tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        load_config(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="train.compile must be true or false"):
        load_config(None, ["train.compile=maybe"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(None, ["train.max_steps"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_config(None, ["model.preset=huge"])


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    result = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            result.update(flat(value, f"{prefix}{key}."))
        else:
            result[f"{prefix}{key}"] = value
    return result


def test_the_efficient_configs_change_only_the_recipe_keys_of_their_paper_recipe_configs():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    recipe_keys = {"optim.name", "optim.muon_lr", "optim.muon_momentum", "optim.lr", "optim.min_lr", "optim.schedule",
                   "optim.decay_fraction", "model.qk_norm", "model.zero_init_residual", "name", "train.max_steps",
                   "train.eval_interval", "train.sample_interval", "train.save_interval", "train.milestone_interval",
                   "eval.interval", "data.out_dir"}
    for paper, efficient in (("demo.yaml", "efficient.yaml"), ("dmas-1.7b.yaml", "dmas-1.7b-efficient.yaml")):
        ours, theirs = load_config(configs / efficient).to_dict(), load_config(configs / paper).to_dict()
        changed = {key for key, value in flat(ours).items() if flat(theirs).get(key) != value}
        assert changed <= recipe_keys, changed
        assert ours["optim"]["name"] == "muon" and ours["model"]["qk_norm"] and ours["model"]["zero_init_residual"]
        assert theirs["optim"]["name"] == "adamw" and not theirs["model"]["qk_norm"]


def test_overrides_reach_into_list_items_by_index(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources:\n    - {type: text, path: a.txt}\n    - {type: jsonl, path: b.jsonl}\n")
    config = load_config(path, ["data.sources.1.max_docs=1000", "data.sources.0.path=c.txt"])
    assert [(s.type, s.path, s.max_docs) for s in config.data.sources] == [("text", "c.txt", None),
                                                                          ("jsonl", "b.jsonl", 1000)]
    with pytest.raises(ConfigError, match=r"data.sources is a list of 2, so the key after it must be an index from "
                                          r"0 to 1, e.g. data.sources.0"):
        load_config(path, ["data.sources.2.max_docs=5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.sources\[0\].max_doc': did you mean"):
        load_config(path, ["data.sources.0.max_doc=5"])
