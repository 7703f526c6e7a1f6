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
    from phi2sum.model import lora_targets

    assert lora_targets(Config().lora.target_modules, "phi") == preset.lora.target_modules  # `auto`, for Phi
    preset.lora.target_modules = ["auto"]
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
    ("train.batch_size=1.5", "'train.batch_size' is '1.5'; it must be an integer >= 1, or auto"),
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


# --- bad values are one line at load, before any model loads ----------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train.epochs=inf", "'train.epochs' must be a finite number"),
    ("train.learning_rate=.nan", "'train.learning_rate' must be a finite number"),
    ("train.seed=-1", "'train.seed' is -1; it must be in [0, 2**32)"),
    ("data.seed=99999999999", "'data.seed' is 99999999999"),
    ("generation.max_prompt_tokens=4", "'generation.max_prompt_tokens' is 4"),
    ("generation.max_new_tokens=250", "'generation.max_new_tokens' is 250; it must be at least 8 below prompt.max_length"),
    ("storage.output=", "'storage.output' is ''"),
    ("storage.output=s3://", "'storage.output' is 's3://'"),
    ("storage.output=s3:/bucket/x", "s3://bucket[/prefix]"),
    ("storage.output=gs://bucket/x", "other schemes are not supported"),
    ("model.adapter=s3:///adapter", "'model.adapter' is 's3:///adapter'"),
])
def test_bad_values_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny-cpu", [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_good_locations_pass():
    for output in ("runs", "/tmp/x", "s3://my-bucket", "s3://my-bucket/runs/a"):
        assert load_config("tiny-cpu", [f"storage.output={output}"]).storage.output == output


def test_text_settings_keep_what_was_typed():
    cfg = load_config("tiny-cpu", ["prompt.template=### Article: {document} ### Summary:", "run.name=2024"])
    assert cfg.prompt.template == "### Article: {document} ### Summary:"  # not cut at ' #' (a YAML comment)
    assert load_config("tiny-cpu", ["prompt.template=Summarize: {document}"]).prompt.template == "Summarize: {document}"
    quoted = load_config("tiny-cpu", ['prompt.template="Article:\\n{document}\\nSummary:\\n"'])
    assert quoted.prompt.template == "Article:\n{document}\nSummary:\n"  # double quotes: YAML escapes
    assert cfg.run.name == "2024" and load_config("tiny-cpu", ["model.adapter=null"]).model.adapter is None


def test_a_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text.*save the file as UTF-8"):
        load_config(str(path))


def test_optimizer_and_scheduler_names_are_transformers_own():
    from phi2sum.config import check_trainer_names

    check_trainer_names(load_config("phi2-xsum-t4"))
    with pytest.raises(ConfigError, match="'train.optim' is 'paged_adamw_8bitt'.*did you mean 'paged_adamw_8bit'"):
        check_trainer_names(load_config("phi2-xsum-t4", ["train.optim=paged_adamw_8bitt"]))
    with pytest.raises(ConfigError, match="'train.lr_scheduler' is 'cosinus'"):
        check_trainer_names(load_config("phi2-xsum-t4", ["train.lr_scheduler=cosinus"]))
