"""Config: presets load, overrides apply and typos or bad values fail at load with the key named."""

import pytest
import yaml

from phi2sum.config import Config, load_config
from phi2sum.errors import ConfigError


def test_t4_preset_is_the_seed_recipe():
    cfg = load_config("phi2-xsum-t4")
    assert cfg.model.base == "microsoft/phi-2"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "dense"]
    assert cfg.quantization.load_in_4bit and cfg.quantization.double_quant and cfg.quantization.quant_type == "nf4"
    assert (cfg.train.learning_rate, cfg.train.lr_scheduler, cfg.train.warmup_steps) == (2e-4, "cosine", 30)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs) == (1, 8, 1.0)
    assert cfg.train.optim == "paged_adamw_8bit"
    assert (cfg.data.num_train, cfg.data.num_eval) == (1500, 150)
    assert cfg.prompt.max_length == 512 and cfg.generation.num_beams == 4
    assert cfg.prompt.template == "### Article:\n{document}\n\n### Summary:\n"


def test_defaults_equal_the_t4_preset_apart_from_gpu_pinning():
    preset = load_config("phi2-xsum-t4")
    assert preset.ray.use_gpu is True and Config().ray.use_gpu is None  # an autoscaling T4 group may start empty
    preset.ray.use_gpu = None
    assert preset.to_dict() == Config().to_dict()


def test_overrides_are_typed():
    cfg = load_config("tiny-cpu", ["train.learning_rate=1e-4", "train.max_steps=3", "lora.target_modules=q_proj,v_proj",
                                   "run.baseline=true", "data.num_eval=null"])
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.max_steps == 3
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.run.baseline is True and cfg.data.num_eval is None


@pytest.mark.parametrize("override, message", [
    ("train.learnin_rate=1e-4", "did you mean 'train.learning_rate'"),
    ("trian.epochs=1", "did you mean 'train'"),
    ("train.learning_rate=-0.1", "'train.learning_rate' is -0.1; it must be > 0"),
    ("generation.num_beams=0", "'generation.num_beams' is 0"),
    ("lora.r=sixteen", "'lora.r' must be an integer"),
    ("train.batch_size=1.5", "'train.batch_size' must be an integer"),
    ("run.baseline=maybe", "'run.baseline' must be true or false"),
    ("data.on_bad_record=ignore", "skip or error"),
    ("prompt.template=no slot", "one {document}"),
    ("run.name=a/b", "no slashes"),
    ("noequals", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config("tiny-cpu", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 1, "grad_acum": 4}}))
    with pytest.raises(ConfigError, match="train.grad_acum.*did you mean 'train.grad_accum'"):
        load_config(path)


def test_missing_config_file_lists_presets():
    with pytest.raises(ConfigError, match="tiny-cpu"):
        load_config("no-such-config")


def test_fingerprint_ignores_where_outputs_go_but_not_the_recipe():
    a = load_config("tiny-cpu")
    b = load_config("tiny-cpu", ["storage.output=s3://b/p", "run.name=x", "ray.num_workers=4"])
    c = load_config("tiny-cpu", ["lora.r=8"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config("tiny-cpu", ["run.name=abc"])
    from phi2sum.config import config_from_dict

    assert config_from_dict(yaml.safe_load(cfg.to_yaml())).to_dict() == cfg.to_dict()
