"""Quality of a real pretrained model on real news: SmolLM2-135M-Instruct zero-shot vs fine-tuned by phi2sum, and
Lead-1, on the XSum samples in ../shared/data/xsum, with the plain (seed) template and the chat template.

    .venv/bin/python tests/benchmarks/bench_quality.py                   # 200 validation docs, ~20 CPU min of training
    .venv/bin/python tests/benchmarks/bench_quality.py --docs 40 --train 64   # a quick look

Each template is one real `phi2sum run --config smollm2-xsum-cpu run.baseline=true` in a subprocess (train on the
train sample, then summarize the validation subset with the base model and with the adapter, then ROUGE with 95%
bootstrap intervals), so the numbers are the job's own: summary.json gives training and generation tokens/s and
peak memory. Lead-1 is the first sentence of each article, scored by the same scorer on the same documents.

Goal: the fine-tuned model's ROUGE-L beats zero-shot by at least 4 points with non-overlapping 95% intervals,
and beats Lead-1 on ROUGE-1, ROUGE-2 and ROUGE-L.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, XSUM_DIR, default_out, format_table, machine_facts, write_json

SOURCE = str(XSUM_DIR / "{split}-sample.jsonl")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=200, help="validation documents scored")
    p.add_argument("--train", type=int, default=400, help="training examples (one epoch; ~20 CPU min on 2 cores)")
    p.add_argument("--templates", default="plain,chat", help="plain, chat or both")
    p.add_argument("--extra", nargs="*", default=[], metavar="section.key=value", help="more config overrides")
    p.add_argument("--out", default=None, help="JSON results (default tests/benchmarks/results/quality-*.json)")
    return p.parse_args()


def run_template(chat: bool, args: argparse.Namespace, work: Path) -> dict:
    name = "chat" if chat else "plain"
    argv = [str(Path(sys.executable).with_name("phi2sum")), "run", "--config", "smollm2-xsum-cpu",
            f"data.source={SOURCE}", f"data.num_train={args.train}", f"data.num_eval={args.docs}",
            f"prompt.chat_template={str(chat).lower()}", "run.baseline=true", f"storage.output={work}",
            f"run.name={name}", *args.extra]
    print(f"[{name}] {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        sys.exit(f"[{name}] failed:\n{proc.stderr[-4000:]}")
    run = work / name
    summary = json.loads((run / "summary.json").read_text())
    return {"template": name, "wall_seconds": round(time.monotonic() - started, 1), "summary": summary,
            "finetuned": json.loads((run / "metrics.json").read_text()),
            "zero_shot": json.loads((run / "baseline" / "metrics.json").read_text()),
            "ids": [r for r in _ids(run / "predictions.parquet")]}


def _ids(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def lead1(ids: list[str]) -> dict:
    """Lead-1 of the same validation documents: the first sentence, scored like the models."""
    from phi2sum.eval.metrics import rouge

    records = {r["id"]: r for r in map(json.loads, (XSUM_DIR / "validation-sample.jsonl").read_text().splitlines())}
    firsts = [SENTENCE_END.split(records[i]["document"].strip(), maxsplit=1)[0] for i in ids]
    return rouge(firsts, [records[i]["summary"] for i in ids])[0]


def row(label: str, metrics: dict, extra: dict | None = None) -> dict:
    out = {"row": label, "count": metrics["count"]}
    for name in ("rouge1", "rouge2", "rougeL"):
        m = metrics[name]
        out[name] = round(100 * m["mean"], 2)
        out[f"{name}_ci"] = f"[{100 * m['low']:.1f}, {100 * m['high']:.1f}]"
    return {**out, **(extra or {})}


def main() -> None:
    args = parse_args()
    if not (XSUM_DIR / "validation-sample.jsonl").is_file():
        sys.exit(f"the XSum samples are not at {XSUM_DIR}; this benchmark needs ../shared/data/xsum")
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    runs = [run_template(t == "chat", args, work) for t in args.templates.split(",")]
    rows = [row("Lead-1 (first sentence)", lead1(runs[0]["ids"]))]
    for r in runs:
        s = r["summary"]
        gen = {"gen_tok_s": s["summarize"]["generated_tokens_per_second"], "peak_mb": s["peak_memory_mb"]["cpu_rss"]}
        rows.append(row(f"zero-shot, {r['template']} template", r["zero_shot"],
                        {"gen_tok_s": s["summarize_baseline"]["generated_tokens_per_second"],
                         "peak_mb": s["peak_memory_mb"]["cpu_rss"]}))
        rows.append(row(f"fine-tuned, {r['template']} template ({s['data']['train']['kept']} examples, "
                        f"{s['train']['seconds'] / 60:.1f} min)", r["finetuned"],
                        {**gen, "train_tok_s": s["train"]["tokens_per_second"]}))
    columns = [("row", "row", ""), ("count", "docs", "d"), ("rouge1", "R-1", ".2f"), ("rouge1_ci", "95% CI", ""),
               ("rouge2", "R-2", ".2f"), ("rouge2_ci", "95% CI", ""), ("rougeL", "R-L", ".2f"),
               ("rougeL_ci", "95% CI", ""), ("train_tok_s", "train tok/s", ".0f"), ("gen_tok_s", "gen tok/s", ".1f"),
               ("peak_mb", "peak MB", ".0f")]
    print("\n" + format_table(rows, columns))
    verdicts = []
    lead = rows[0]
    for r in runs:
        ft, zs = r["finetuned"]["rougeL"], r["zero_shot"]["rougeL"]
        gain = 100 * (ft["mean"] - zs["mean"])
        separated = ft["low"] > zs["high"]
        beats_lead = all(100 * r["finetuned"][m]["mean"] > lead[m] for m in ("rouge1", "rouge2", "rougeL"))
        verdicts.append({"template": r["template"], "rougeL_gain": round(gain, 2), "intervals_separate": separated,
                         "beats_lead1": beats_lead, "goal_met": gain >= 4 and separated and beats_lead})
        print(f"{r['template']}: ROUGE-L +{gain:.2f} over zero-shot (intervals {'separate' if separated else 'overlap'}),"
              f" {'beats' if beats_lead else 'does not beat'} Lead-1 on R-1/R-2/R-L -> goal "
              f"{'MET' if verdicts[-1]['goal_met'] else 'MISSED'}")
    path = write_json(args.out or default_out("quality"), {"machine": machine_facts(), "args": vars(args),
                                                           "rows": rows, "verdicts": verdicts,
                                                           "runs": [{k: v for k, v in r.items() if k != "ids"}
                                                                    for r in runs]})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
