"""The job config: `schema` (typed sections, defaults = the seed recipe), `loading` (YAML, presets, overrides),
`checks` (values). Import what you need from here."""

from phi2sum.config.checks import check_location, check_trainer_names, prompt_token_budget, validate
from phi2sum.config.loading import config_from_dict, load_config, parse_override, preset_names, resolve_config_path
from phi2sum.config.schema import (Config, DataSettings, GenerationSettings, LoraSettings, ModelSettings,
                                   PromptSettings, QuantizationSettings, RaySettings, RunSettings, StorageSettings,
                                   TrainSettings, decisive, fingerprint)

__all__ = ["check_location", "check_trainer_names", "Config", "DataSettings", "GenerationSettings", "LoraSettings", "ModelSettings", "PromptSettings",
           "QuantizationSettings", "RaySettings", "RunSettings", "StorageSettings", "TrainSettings", "config_from_dict",
           "decisive", "fingerprint", "load_config", "parse_override", "preset_names", "prompt_token_budget",
           "resolve_config_path", "validate"]
