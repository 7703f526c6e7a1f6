"""The `phi2sum` command: thin wrappers over the library, one subcommand per stage.

Every subcommand takes `--config` (a YAML path or a preset name from jobs/configs) and `section.key=value`
overrides. A problem the user can fix prints one line (`phi2sum: error: ...`) and exits 2; a stack trace
means a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from phi2sum.errors import ConfigError, Phi2SumError

DEMO_CONFIG = "tiny-cpu"
EXAMPLES = """examples:
  phi2sum demo                                              # tiny model, synthetic data, CPU, a few minutes
  phi2sum run --config jobs/configs/phi2-xsum-t4.yaml       # the Phi-2 + XSum recipe on one GPU
  phi2sum run --config tiny-cpu train.max_steps=20 storage.output=s3://bucket/runs
  phi2sum summarize --config tiny-cpu model.adapter=runs/my-run/adapter run.name=preds-1
  phi2sum evaluate --predictions runs/my-run/predictions.parquet
  phi2sum report runs/my-run
  phi2sum plan --config jobs/configs/phi2-xsum-t4.yaml --gpu T4
"""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "botocore", "filelock", "fsspec", "httpx", "datasets", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_warning()


def _load(args):
    from phi2sum.config import load_config

    return load_config(args.config, args.overrides)


def cmd_run(args) -> None:
    from phi2sum.pipeline import run_local

    _report_outputs(run_local(_load(args)))


def cmd_train(args) -> None:
    if args.ray:
        from phi2sum.ray_train import train_on_ray

        _report_outputs(train_on_ray(_load(args)))
        return
    from phi2sum.pipeline import run_local

    _report_outputs(run_local(_load(args), stages=("train",)))


def cmd_summarize(args) -> None:
    if args.ray:
        from phi2sum.evaluate import evaluate_output
        from phi2sum.ray_summarize import Shard, summarize_on_ray

        if not args.output:
            raise ConfigError("summarize --ray needs --output (a folder or s3:// prefix for the shard outputs)")
        cfg = _load(args)
        done = summarize_on_ray(cfg, args.output, Shard.parse(args.shard))
        print(f"{done['shard']}: {done['rows']} summaries in {args.output}")
        if Shard.parse(args.shard).count == 1 and args.evaluate:
            print(format_metrics(evaluate_output(args.output)))
        return
    from phi2sum.pipeline import run_local

    _report_outputs(run_local(_load(args), stages=("summarize", "evaluate")))


def cmd_evaluate(args) -> None:
    from phi2sum import storage
    from phi2sum.evaluate import evaluate_predictions

    predictions = args.predictions
    if not predictions.endswith(".parquet"):
        predictions = storage.join(predictions, "predictions.parquet")
    metrics_uri = args.metrics or storage.join(predictions.rsplit("/", 1)[0], "metrics.json")
    metrics = evaluate_predictions(predictions, metrics_uri)
    print(format_metrics(metrics))
    print(f"metrics: {metrics_uri}")


def cmd_report(args) -> None:
    from phi2sum.report import write_report

    print(f"report: {write_report(args.run)}")


def cmd_plan(args) -> None:
    from phi2sum.plan import main_text

    print(main_text(_load(args), gpu=args.gpu, model_config=args.model_config))


def cmd_demo(args) -> None:
    from phi2sum import storage
    from phi2sum.config import load_config
    from phi2sum.pipeline import run_local

    cfg = load_config(args.config or DEMO_CONFIG, ["run.baseline=true", *args.overrides])
    run = run_local(cfg)
    _report_outputs(run)
    before = storage.read_json(run.path("baseline", "metrics.json")) if run.has("baseline", "metrics.json") else None
    after = storage.read_json(run.path("metrics.json"))
    if before:
        print("\nROUGE F1 x100     before (base model)   after (fine-tuned)")
        for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            print(f"  {name:<10} {100 * before[name]['mean']:>18.2f} {100 * after[name]['mean']:>20.2f}")
    from phi2sum.report import write_report

    print(f"\nreport: {storage.join(write_report(run.uri), 'report.md')}")


def format_metrics(metrics: dict) -> str:
    lines = [f"ROUGE F1 x100 over {metrics['count']} examples (95% bootstrap interval):"]
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        m = metrics[name]
        if m["mean"] is not None:
            lines.append(f"  {name:<10} {100 * m['mean']:6.2f}  [{100 * m['low']:.2f}, {100 * m['high']:.2f}]")
    return "\n".join(lines)


def _report_outputs(run) -> None:
    from phi2sum import storage

    print(f"\nrun {run.cfg.run.name}: outputs in {run.uri}")
    for uri in storage.list_files(run.uri):
        if "/checkpoints/" not in uri:
            print(f"  {uri}")
    if run.has("metrics.json"):
        print(format_metrics(storage.read_json(run.path("metrics.json"))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi2sum", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="QLoRA fine-tuning of a small LLM for summarization, batch summarization and ROUGE "
                    "evaluation, locally or on a Ray cluster, with artifacts on a local path or S3.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str, config_required: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
        p.add_argument("--config", "-c", required=False, default=None,
                       help="YAML config file or preset name in jobs/configs (tiny-cpu, phi2-xsum-t4); "
                            "default: the built-in Phi-2/XSum recipe" + (" (demo: tiny-cpu)" if name == "demo" else ""))
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="config overrides, e.g. train.max_steps=20 storage.output=s3://bucket/runs")
        p.set_defaults(func=func)
        return p

    add("run", cmd_run, "train, summarize the eval split and score it, in this process (local mode)")
    tr = add("train", cmd_train, "fine-tune LoRA adapters only; writes adapter/ and train_log.parquet")
    tr.add_argument("--ray", action="store_true", help="train with Ray Train (ray.num_workers workers, ray.address)")
    sm = add("summarize", cmd_summarize,
             "summarize the eval split with model.adapter (or the base model) and score it")
    sm.add_argument("--ray", action="store_true", help="summarize with a Ray Data actor pool (ray.actors)")
    sm.add_argument("--output", help="with --ray: where the shard outputs go (a folder or s3:// prefix)")
    sm.add_argument("--shard", help="with --ray: only shard i/n of the dataset, e.g. 3/8")
    sm.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="with --ray: do not score")
    add("demo", cmd_demo, "the whole job on the embedded tiny model and synthetic data, offline on CPU; "
                          "prints ROUGE before vs after fine-tuning")
    pl = add("plan", cmd_plan, "estimate per-worker GPU memory and speed for a config; says whether it fits a GPU")
    pl.add_argument("--gpu", default="T4", help="T4 (default), L4, A10G, A100-40GB, A100-80GB, H100, H200")
    pl.add_argument("--model-config", default=None, help="a model config.json to take the shapes from")
    rp = sub.add_parser("report", help="write <run>/report/: plots, predictions and report.md for a run",
                        description="read a run folder (local or s3://) and write <run>/report/ with the loss curve, "
                                    "ROUGE chart, dataset analysis, sample and all predictions, and report.md")
    rp.add_argument("run", help="the run folder, e.g. runs/my-run or s3://bucket/runs/my-run")
    rp.set_defaults(func=cmd_report)
    ev = sub.add_parser("evaluate", help="score a predictions.parquet (file or run folder) with ROUGE",
                        description="score a predictions.parquet (a file or a run folder, local or s3://) with "
                                    "ROUGE-1/2/L/Lsum and write metrics.json beside it")
    ev.add_argument("--predictions", "-p", required=True, help="predictions.parquet or the folder holding it")
    ev.add_argument("--metrics", "-m", default=None, help="where to write metrics.json (default: beside it)")
    ev.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.verbose)
        args.func(args)
    except Phi2SumError as exc:
        from phi2sum.storage import redact

        print(f"phi2sum: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("phi2sum: interrupted; rerun the same command (same run.name) to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
