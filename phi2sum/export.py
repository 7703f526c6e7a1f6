"""`phi2sum export RUN --to DIR`: a trained run as one merged model folder that plain transformers loads.

Why: a merged model serves anywhere (`AutoModelForCausalLM.from_pretrained(DIR)`, vLLM, TGI, a GGUF converter) with
neither PEFT nor bitsandbytes installed, and generates as fast as the base model. Merges fail silently in known
ways -- the merged weights equal the base's, or the adapter's effect is erased on the way (peft#2586,
unsloth#2516); a cast overflows fp16; the config still says 4-bit -- so the written folder is reloaded the way a
user would load it and checked against the run's own model (the trained base as the run used it, 4-bit when it
was, with the adapter unmerged) on documents of the run's eval split, before anything is published:

* the adapter changes the base at all (zeroed or erased LoRA weights would export the base model);
* the export carries the adapter's whole effect on the logits (not 0%, as when the merge lost it) and is clearly
  nearer to adapter-on-base than to the base without the adapter (not a merge that changed or doubled it);
* the largest absolute logit difference over the prompt positions within `--max-logit-diff`;
* greedy output token ids identical on every document, or parted only at a near-tie: where the two models'
  logits for the next token differ by no more than that limit (a rounding flip, not a different model).

The folder is built and checked in a local temp folder, then published with `storage.upload_dir` and a completion
marker written last: a local DIR appears only when complete, an S3 one is complete only once its marker is there.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from typing import Any

import yaml

from phi2sum import storage
from phi2sum.adapters import load_for_inference
from phi2sum.config import Config, config_from_dict, prompt_token_budget
from phi2sum.data import load_split
from phi2sum.errors import ConfigError, ExportError, ModelError, Phi2SumError, StorageError
from phi2sum.prompt import encode_prompt
from phi2sum.run import ADAPTER
from phi2sum.storage.uris import split_s3

log = logging.getLogger(__name__)

KIND = "phi2sum-export"
PARITY = "parity.json"
DTYPES = ("float16", "bfloat16", "float32")
# Default --max-logit-diff per dtype (the coarser of the export's and the reference's compute dtype): about 2.5-25
# times the largest difference measured against adapter-on-base on CPU (SmolLM2-135M: float32 1.8e-4, float16 0.19,
# bfloat16 1.31; tiny Phi: 9e-6, 0.014, 0.11). Rounding grows with depth and logit scale; a lost or doubled merge is
# caught by the adapter's share below, which rounding does not move, and a changed model by greedy decoding.
DEFAULT_MAX_LOGIT_DIFF = {"float32": 5e-3, "float16": 0.5, "bfloat16": 4.0}
MIN_ADAPTER_EFFECT = 1e-4  # largest |logit change| the adapter makes on the base; below: it changes nothing
# The share of the adapter's effect on the logits the export carries: the projection of (export - base) on
# (adapter-on-base - base), 1 = all of it, 0 = the base; rounding noise orthogonal to the adapter's effect does not
# move it. A strong adapter's effect is not linear in its weights (merged twice it read 0.95-1.15 on tiny models),
# so the export must also be clearly nearer (mean |logit difference|) to adapter-on-base than to the base.
CARRIED = (0.9, 1.1)
SEPARATION = 2.0


# --- the run ---------------------------------------------------------------------------------------------------


def read_run_config(run: str) -> Config:
    """The run's config.yaml as the run trained with it (base model, quantization, prompt, generation)."""
    where = storage.join(run, "config.yaml")
    try:
        data = yaml.safe_load(storage.read_text(where))
    except StorageError as exc:
        raise StorageError(f"cannot read the run's config at {where} ({str(exc).splitlines()[0][:200]}); pass a "
                           "run folder (<storage.output>/<run.name>) that holds config.yaml") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML ({str(exc).splitlines()[0]}); restore the run's "
                          "config.yaml") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is not a mapping of config sections; restore the run's config.yaml")
    try:
        return config_from_dict(data)
    except Phi2SumError as exc:
        raise ConfigError(f"{where} does not validate with this version of phi2sum ({exc})") from None


def trained_adapter(run: str) -> str:
    """`<run>/adapter`, when training wrote it completely (its completion marker is there)."""
    adapter = storage.join(run, ADAPTER)
    if not storage.is_complete(adapter):
        raise ModelError(f"{adapter} is missing or incomplete (no {storage.COMPLETE}): the run has not finished "
                         "training; finish it with `phi2sum train` (same config and run.name), then export")
    return adapter


def run_identity(cfg: Config, run: str) -> dict[str, Any]:
    """What the completion marker says the export was made from (the same name and fingerprint = the same run)."""
    return {"kind": KIND, "run": run, "run_name": cfg.run.name, "config_fingerprint": cfg.fingerprint(),
            "base": cfg.model.base, "quantization": "nf4 4-bit" if cfg.quantization.load_in_4bit else "none"}


def export_config(cfg: Config) -> Config:
    """The run's config for loading here: its recorded adapter is not the one exported, and a GPU it named may be
    absent on this machine (the CPU then reproduces the same numbers more slowly)."""
    import torch

    cfg.model.adapter = None
    if cfg.model.device.startswith("cuda") and not torch.cuda.is_available():
        log.info("the run used model.device=%s; exporting on the CPU", cfg.model.device)
        cfg.model.device = "cpu"
    return cfg


# --- the destination -------------------------------------------------------------------------------------------


def _normalized(uri: str) -> str:
    return uri.rstrip("/") if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def check_destination(dest: str, run: str, identity: dict[str, Any], force: bool) -> None:
    """Refuse a DIR that would destroy the run, or that holds something else (another run's export, other files)
    unless `force`; a complete export of this same run is replaced (another dtype, a newer phi2sum)."""
    target, source = _normalized(dest), _normalized(run)
    adapter = _normalized(storage.join(run, ADAPTER))
    if source == target or source.startswith(target + "/") or target == adapter or target.startswith(adapter + "/"):
        raise ConfigError(f"--to {dest} would replace the run folder {run} or its adapter; export to a folder "
                          "outside them, e.g. <run>/merged")
    if storage.is_s3(dest) and not split_s3(dest)[1]:
        raise ConfigError(f"--to {dest} is a bucket root; give a prefix, e.g. {storage.join(dest, 'merged')}")
    files = storage.list_relative(dest)
    if not files or force:
        return
    marker = storage.read_json(storage.join(dest, storage.COMPLETE)) if storage.COMPLETE in files else None
    if isinstance(marker, dict) and marker.get("kind") == KIND:
        if (marker.get("run_name"), marker.get("config_fingerprint")) == \
                (identity["run_name"], identity["config_fingerprint"]):
            return
        raise ConfigError(f"{dest} holds a complete export of another run ({marker.get('run')}, run "
                          f"{marker.get('run_name')}); choose another --to, or pass --force to replace it")
    raise ConfigError(f"{dest} already holds {len(files)} file(s) that are not a complete phi2sum export (e.g. "
                      f"{files[0]}); choose an empty --to, or pass --force to replace them")


# --- the merged folder -----------------------------------------------------------------------------------------


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ConfigError(f"--dtype {name} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def generation_settings(cfg: Config, tokenizer) -> dict[str, Any]:
    """The run's generation settings as generation_config.json keys (beam settings only with beams: transformers
    refuses to save them otherwise)."""
    g = cfg.generation
    beams = dict(num_beams=g.num_beams, length_penalty=g.length_penalty, early_stopping=g.early_stopping) \
        if g.num_beams > 1 else {"num_beams": 1}
    return dict(max_new_tokens=g.max_new_tokens, no_repeat_ngram_size=g.no_repeat_ngram_size, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **beams)


def generation_config(cfg: Config, tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, **generation_settings(cfg, tokenizer))


def _write_generation_settings(folder: str, settings: dict[str, Any]) -> None:
    """transformers writes only the values that differ from its defaults; the run's are all written, so the file
    says what the run used (a default of a later transformers cannot change it)."""
    path = os.path.join(folder, "generation_config.json")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**saved, **settings}, f, indent=2, sort_keys=True)


def write_merged(cfg: Config, adapter: str, folder: str, dtype: str) -> None:
    """The base (dequantized when 4-bit) with the adapter merged in, cast to `dtype`, with its tokenizer and
    generation settings: a folder `from_pretrained` loads with neither PEFT nor bitsandbytes."""
    from phi2sum.devices import free_memory

    model, tokenizer = load_for_inference(cfg, adapter, merged=True)
    model = model.to(torch_dtype(dtype))
    if hasattr(model.config, "quantization_config"):  # dequantize() removes it; a stale one would need bitsandbytes
        del model.config.quantization_config
    model.generation_config = generation_config(cfg, tokenizer)
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    _write_generation_settings(folder, generation_settings(cfg, tokenizer))
    del model
    free_memory()
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        if "quantization_config" in json.load(f):
            raise ExportError("the merged config.json still has a quantization_config; report this as a bug")


# --- the parity check ------------------------------------------------------------------------------------------


def prompts_of(cfg: Config, tokenizer, records: list[dict[str, str]]) -> list[list[int]]:
    """The documents encoded exactly as the run summarizes them."""
    budget = prompt_token_budget(cfg)
    return [encode_prompt(tokenizer, cfg.prompt.template, r["document"], budget, cfg.prompt.chat_template).ids
            for r in records]


def greedy(model, input_ids, max_new_tokens: int, eos_id: int, pad_id: int) -> list[int]:
    """Greedy new token ids, whatever generation_config.json the model carries."""
    import torch

    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         num_beams=1, max_new_tokens=max_new_tokens, no_repeat_ngram_size=0, length_penalty=1.0,
                         early_stopping=False, eos_token_id=eos_id, pad_token_id=pad_id)
    return out[0, input_ids.shape[1]:].tolist()


def compare_document(reference, exported, ids: list[int], max_new_tokens: int, tokenizer, limit: float) -> dict:
    """Prompt-position logits of the exported model, adapter-on-base and the base alone (the adapter disabled in
    the same model), and both models' greedy tokens."""
    import torch

    x = torch.tensor([ids], device=next(reference.parameters()).device)
    ref, base, out = _logits(reference, exported, x)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ref_tokens, out_tokens = greedy(reference, x, max_new_tokens, eos, pad), greedy(exported, x, max_new_tokens, eos, pad)
    first = next((i for i, (a, b) in enumerate(zip(ref_tokens, out_tokens)) if a != b),
                 None if len(ref_tokens) == len(out_tokens) else min(len(ref_tokens), len(out_tokens)))
    effect = (ref - base).double()
    row = {"prompt_tokens": len(ids), "finite": bool(torch.isfinite(out).all()),
           "effect_dot": float(((out - base).double() * effect).sum()), "effect_norm2": float((effect * effect).sum()),
           "max_diff": _max(out, ref), "max_diff_to_base": _max(out, base), "adapter_effect": _max(ref, base),
           "mean_diff": _mean(out, ref), "mean_diff_to_base": _mean(out, base), "mean_adapter_effect": _mean(ref, base),
           "greedy_identical": first is None, "first_greedy_difference": first, "near_tie": None,
           "greedy_tokens": ref_tokens, "exported_greedy_tokens": out_tokens if first is not None else None}
    if first is not None and first < min(len(ref_tokens), len(out_tokens)):
        row["near_tie"] = near_tie(reference, exported, x, ref_tokens[:first], ref_tokens[first], out_tokens[first],
                                   limit)
    return row


def _logits(reference, exported, x):
    import torch

    with torch.no_grad():
        ref = reference(input_ids=x).logits[0].float()
        with reference.disable_adapter():
            base = reference(input_ids=x).logits[0].float()
        return ref, base, exported(input_ids=x).logits[0].float()


def near_tie(reference, exported, x, prefix: list[int], ours: int, theirs: int, limit: float) -> dict[str, Any]:
    """Where greedy parted: the two models' logits for the next token after the common prefix. A flip is rounding
    (`explained`) when the models' logits there differ by no more than the limit: the two tokens were then within
    twice that of each other, a near-tie any change of dtype may break either way."""
    import torch

    step = torch.cat([x, torch.tensor([prefix], dtype=x.dtype, device=x.device)], dim=1)
    with torch.no_grad():
        ref = reference(input_ids=step).logits[0, -1].float()
        out = exported(input_ids=step).logits[0, -1].float()
    diff = _max(out, ref)
    return {"reference_margin": float(ref[ours] - ref[theirs]), "exported_margin": float(out[theirs] - out[ours]),
            "max_diff_there": diff, "explained": diff <= limit}


def _max(a, b) -> float:
    return float((a - b).abs().max())


def _mean(a, b) -> float:
    return float((a - b).abs().mean())


def check_parity(cfg: Config, adapter: str, folder: str, records: list[dict[str, str]], limit: float) -> dict:
    """parity.json: the folder reloaded with plain `from_pretrained` against adapter-on-base, document by document."""
    from transformers import AutoModelForCausalLM

    reference, tokenizer = load_for_inference(cfg, adapter, merged=False)
    device = next(reference.parameters()).device
    exported = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    rows = [{"id": record["id"], **compare_document(reference, exported, ids, cfg.generation.max_new_tokens,
                                                    tokenizer, limit)}
            for record, ids in zip(records, prompts_of(cfg, tokenizer, records))]
    report = parity_summary(rows, limit)
    report.update(loaded_dtype=str(exported.dtype).removeprefix("torch."), device=str(device),
                  loaded_quantized=getattr(exported, "hf_quantizer", None) is not None,
                  reference=f"{'4-bit NF4 base' if cfg.quantization.load_in_4bit else 'base'} + adapter (PEFT, "
                            f"unmerged), {str(reference.dtype).removeprefix('torch.')} compute")
    report["failure"] = parity_failure(report)
    report["passed"] = report["failure"] is None
    return report


def parity_summary(rows: list[dict[str, Any]], limit: float) -> dict[str, Any]:
    """The numbers over all documents (the largest difference anywhere; the mean over documents of their means)."""
    n = len(rows)
    return {
        "documents": n, "prompt_positions": sum(r["prompt_tokens"] for r in rows),
        "finite": all(r["finite"] for r in rows), "max_logit_diff_limit": limit,
        "adapter_carried": sum(r["effect_dot"] for r in rows) / max(sum(r["effect_norm2"] for r in rows), 1e-300),
        "adapter_carried_range": list(CARRIED), "min_adapter_effect": MIN_ADAPTER_EFFECT,
        "separation_required": SEPARATION,
        "max_logit_diff": max(r["max_diff"] for r in rows),
        "max_logit_diff_to_base": max(r["max_diff_to_base"] for r in rows),
        "adapter_effect": max(r["adapter_effect"] for r in rows),
        "mean_logit_diff": sum(r["mean_diff"] for r in rows) / n,
        "mean_logit_diff_to_base": sum(r["mean_diff_to_base"] for r in rows) / n,
        "mean_adapter_effect": sum(r["mean_adapter_effect"] for r in rows) / n,
        "greedy_identical": sum(r["greedy_identical"] for r in rows),
        "greedy_near_ties": sum(bool(r["near_tie"] and r["near_tie"]["explained"]) for r in rows),
        "per_document": rows,
    }


def parity_failure(p: dict[str, Any]) -> str | None:
    """Why the export does not match the run's model (None when it does), most basic cause first."""
    if p["loaded_quantized"]:
        return "the exported folder loads as a quantized model; report this as a bug"
    if not p["finite"]:
        return (f"the exported model's logits are not finite ({p['loaded_dtype']} overflowed); export with "
                "--dtype bfloat16 or float32")
    if p["adapter_effect"] <= MIN_ADAPTER_EFFECT:
        return (f"the adapter changes nothing: its largest effect on the base's logits is {p['adapter_effect']:.3g}, "
                "so the export would be the base model (lora_B all zero, or weights erased?); retrain the run")
    rounding = (f"; or {p['loaded_dtype']} rounding erased a small adapter: try --dtype float32"
                if p["loaded_dtype"] != "float32" else "")
    if not CARRIED[0] <= p["adapter_carried"] <= CARRIED[1]:
        return (f"the merge does not carry the adapter: the exported model has {p['adapter_carried']:.0%} of its effect "
                f"on the logits, not 100% (a merge that lost or doubled it, see peft#2586, unsloth#2516{rounding})")
    if p["mean_logit_diff_to_base"] < SEPARATION * p["mean_logit_diff"]:
        return (f"the exported model is not clearly nearer to adapter-on-base (mean |logit difference| "
                f"{p['mean_logit_diff']:.3g}) than to the base without it ({p['mean_logit_diff_to_base']:.3g}; "
                f"{SEPARATION:g}x needed: a merge that changed the adapter, see peft#2586, unsloth#2516{rounding})")
    if p["max_logit_diff"] > p["max_logit_diff_limit"]:
        return (f"the exported model's logits differ from adapter-on-base by up to {p['max_logit_diff']:.3g} (limit "
                f"{p['max_logit_diff_limit']:.3g}); export with --dtype float32, or raise --max-logit-diff")
    parted = [r for r in p["per_document"] if not r["greedy_identical"] and not (r["near_tie"] or {}).get("explained")]
    if parted:
        return (f"greedy output differs from adapter-on-base on {len(parted)} of {p['documents']} documents beyond "
                f"a near-tie (first: {parted[0]['id']}, token {parted[0]['first_greedy_difference']}); export with "
                "--dtype float32")
    return None


# --- the command -----------------------------------------------------------------------------------------------


def export_run(run: str, dest: str, dtype: str = "float16", parity_docs: int = 8, max_logit_diff: float | None = None,
               force: bool = False) -> dict[str, Any]:
    """Merge, check, publish; returns parity.json's content. Raises a one-line Phi2SumError (nothing published)
    when the run cannot be read or the check fails."""
    torch_dtype(dtype)
    if parity_docs < 1:
        raise ConfigError(f"--parity-docs {parity_docs}: the check needs at least one document")
    cfg = export_config(read_run_config(run))
    limit = default_limit(cfg, dtype) if max_logit_diff is None else max_logit_diff
    adapter = trained_adapter(run)
    identity = run_identity(cfg, run)
    check_destination(dest, run, identity, force)
    records = load_split(cfg.data, cfg.data.eval_split, parity_docs).records
    with tempfile.TemporaryDirectory(prefix=".phi2sum-export-", dir=_work_parent(dest)) as work:
        local_adapter = os.path.join(work, ADAPTER)
        storage.download_dir(adapter, local_adapter)  # once, for both models (also when the run is on S3)
        folder = os.path.join(work, "model")
        os.mkdir(folder)  # mode from the umask (mkdtemp's 0700 would be copied into a local DIR)
        write_merged(cfg, local_adapter, folder, dtype)
        report = {"dtype": dtype, "run": run, **check_parity(cfg, local_adapter, folder, records, limit)}
        if not report["passed"]:
            raise ExportError(f"export of {run} not published, parity check failed: {report['failure']}")
        storage.write_json(os.path.join(folder, PARITY), report)
        storage.upload_dir(folder, dest, marker={**identity, "dtype": dtype, "prompt": _prompt_info(cfg),
                                                 "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return report


def default_limit(cfg: Config, dtype: str) -> float:
    """--max-logit-diff's default: that of the coarser of the export dtype and the reference's compute dtype (a run
    computed in fp16 on a T4 is itself only fp16-close to any export)."""
    from phi2sum.devices import compute_dtype, resolve_device

    computed = str(compute_dtype(cfg, resolve_device(cfg))).removeprefix("torch.")
    return max(DEFAULT_MAX_LOGIT_DIFF[dtype], DEFAULT_MAX_LOGIT_DIFF.get(computed, 0.0))


def _work_parent(dest: str) -> str | None:
    """Local work space beside a local DIR (same disk, not a small /tmp); the system's temp folder for S3."""
    if storage.is_s3(dest):
        return None
    parent = os.path.dirname(_normalized(dest))
    os.makedirs(parent, exist_ok=True)
    return parent


def _prompt_info(cfg: Config) -> dict[str, Any]:
    """How to prompt the exported model as the run did (it is not part of a transformers folder)."""
    return {"template": cfg.prompt.template, "chat_template": cfg.prompt.chat_template,
            "max_prompt_tokens": prompt_token_budget(cfg)}


def describe(report: dict[str, Any], dest: str) -> str:
    """What the command prints."""
    near = f" (+{report['greedy_near_ties']} parted at a near-tie)" if report["greedy_near_ties"] else ""
    return "\n".join([
        f"exported {report['run']} -> {dest} ({report['dtype']}, loads with plain transformers)",
        f"parity on {report['documents']} eval documents ({report['prompt_positions']} prompt positions) against "
        f"{report['reference']}:",
        f"  greedy tokens identical     {report['greedy_identical']}/{report['documents']}{near}",
        f"  max |logit diff|            {report['max_logit_diff']:.3g} (limit {report['max_logit_diff_limit']:.3g}), "
        f"mean {report['mean_logit_diff']:.3g}",
        f"  adapter effect carried      {report['adapter_carried']:.1%} (the adapter moves the base's logits by up to "
        f"{report['adapter_effect']:.3g}, mean {report['mean_adapter_effect']:.3g})",
        f"parity: {storage.join(dest, PARITY)}",
    ])
