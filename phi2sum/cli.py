"""The `phi2sum` command, and through it every `python -m jobs.*` entry point: one parser, one error handler.

Every subcommand takes `--config` (a YAML path or a preset name) and `section.key=value` overrides, in any
order. The Ray jobs' own arguments (`output=`, `shard=`, `predictions=`) are accepted in the same key=value
form, so `python -m jobs.summarize ... output=s3://b/p shard=3/8` and `phi2sum summarize --ray --output ...`
are the same call. A problem the user can fix prints one line (`phi2sum: error: ...`) and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from phi2sum.console import format_before_after, format_metrics, run_command, setup_logging
from phi2sum.errors import ConfigError

DEMO_CONFIG = "tiny-cpu"
# The demo also scores the zero-shot base, and ROUGE of 16 validation summaries every 60 of its 240 steps
DEMO_OVERRIDES = ("run.baseline=true", "train.rouge_steps=60", "train.rouge_documents=16")
JOB_ARGUMENTS = ("output", "shard", "predictions")  # key=value arguments that are not config keys
EXAMPLES = """examples:
  phi2sum demo                                              # tiny model, synthetic data, CPU, a few minutes
  phi2sum run --config phi2-xsum-t4                         # the Phi-2 + XSum recipe on one GPU
  phi2sum run --config tiny-cpu train.max_steps=20 storage.output=s3://bucket/runs
  phi2sum summarize --config tiny-cpu model.adapter=runs/my-run/adapter run.name=preds-1
  phi2sum summarize --ray --config tiny-cpu output=preds/p1 shard=0/2   # Ray Data (what jobs.summarize runs)
  phi2sum evaluate --predictions runs/my-run/predictions.parquet
  phi2sum report runs/my-run
  phi2sum export runs/my-run --to models/my-run            # merged model folder, checked against the run's model
  phi2sum compare runs/my-run/baseline runs/my-run          # fine-tuned - zero-shot, paired bootstrap
  phi2sum plan --config phi2-xsum-t4 --gpu T4
"""


def _config(args):
    from phi2sum.config import load_config

    return load_config(args.config, args.overrides)


def split_job_arguments(args) -> None:
    """Move `output=`/`shard=`/`predictions=` from the overrides to their options (`--output` etc.)."""
    overrides = []
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if sep and key in JOB_ARGUMENTS and hasattr(args, key):
            if getattr(args, key) not in (None, value):
                raise ConfigError(f"{key} is given twice ({getattr(args, key)} and {value}); give it once")
            setattr(args, key, value)
        else:
            overrides.append(item)
    args.overrides = overrides


# --- commands ------------------------------------------------------------------------------------------------


def cmd_run(args) -> None:
    cfg = _config(args)  # first: a bad config is one line before the heavy imports below
    from phi2sum.local import run_local

    _print_run(run_local(cfg))


def cmd_train(args) -> None:
    cfg = _config(args)
    if args.ray:
        from phi2sum.distributed.train import train_on_ray

        run = train_on_ray(cfg)
        print(f"adapter: {run.adapter_uri}")
        return
    from phi2sum.local import run_local

    _print_run(run_local(cfg, stages=("train",)))


def cmd_summarize(args) -> None:
    cfg = _config(args)
    if not args.ray:
        from phi2sum.local import run_local

        _print_run(run_local(cfg, stages=("summarize", "evaluate")))
        return
    from phi2sum.outputs import Shard

    if not args.output:
        raise ConfigError("summarizing on Ray needs output=<folder or s3:// prefix> (or --output) for the shards")
    shard = Shard.parse(args.shard)
    from phi2sum.distributed.summarize import summarize_on_ray

    done = summarize_on_ray(cfg, args.output, shard)
    print(f"{done['shard']}: {done['rows']} summaries in {args.output}")
    if shard.count == 1 and args.evaluate:
        from phi2sum.eval.scoring import evaluate_output

        print(format_metrics(evaluate_output(args.output)))


def cmd_evaluate(args) -> None:
    from phi2sum.eval.scoring import evaluate

    if not args.predictions:
        raise ConfigError("evaluate needs predictions=<predictions.parquet, a run folder or a summarize output>")
    references = None
    if args.config or args.overrides:  # a dataset to take references from, joined by id
        from phi2sum.data import load_split

        cfg = _config(args)
        references = {r["id"]: r["summary"] for r in load_split(cfg.data, cfg.data.eval_split, None).records}
    metrics, metrics_uri = evaluate(args.predictions, references, metrics_uri=args.metrics)
    print(format_metrics(metrics))
    print(f"metrics: {metrics_uri}")


def cmd_compare(args) -> None:
    from phi2sum.eval.compare import compare, default_out_dir, load_scores, render_markdown, write_comparison

    result = compare(load_scores(args.a), load_scores(args.b), intersect=args.intersect, n_samples=args.samples,
                     seed=args.seed)
    out = write_comparison(result, args.out or default_out_dir(args.a, args.b))
    print(render_markdown(result))
    print(f"comparison: {out}")


def cmd_export(args) -> None:
    from phi2sum.export import describe, export_run

    report = export_run(args.run, args.to, dtype=args.dtype, parity_docs=args.parity_docs,
                        max_logit_diff=args.max_logit_diff, force=args.force)
    print(describe(report, args.to))


def cmd_report(args) -> None:
    from phi2sum.report import write_report

    print(f"report: {write_report(args.run)}")


def cmd_plan(args) -> None:
    from phi2sum.plan import main_text

    print(main_text(_config(args), gpu=args.gpu, model_config=args.model_config))


def cmd_demo(args) -> None:
    from phi2sum import storage
    from phi2sum.config import load_config
    from phi2sum.local import run_local
    from phi2sum.report import write_report

    run = run_local(load_config(args.config or DEMO_CONFIG, [*DEMO_OVERRIDES, *args.overrides]))
    _print_run(run)
    if run.has("baseline", "metrics.json"):
        before = storage.read_json(run.path("baseline", "metrics.json"))
        print("\n" + format_before_after(before, storage.read_json(run.path("metrics.json"))))
    print(f"\nreport: {storage.join(write_report(run.uri), 'report.md')}")


def _print_run(run) -> None:
    from phi2sum import storage

    print(f"\nrun {run.cfg.run.name}: outputs in {run.uri}")
    for uri in storage.list_files(run.uri):
        if "/checkpoints/" not in uri:
            print(f"  {uri}")
    if run.has("metrics.json"):
        print(format_metrics(storage.read_json(run.path("metrics.json"))))


# --- the parser ----------------------------------------------------------------------------------------------


def build_parser(prog: str = "phi2sum") -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (for help and the command name) and each command's own parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES, parents=[common],
        description="QLoRA fine-tuning of a small LLM for summarization, batch summarization and ROUGE "
                    "evaluation, locally or on a Ray cluster, with artifacts on a local path or S3.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, func: Callable, help_text: str, configurable: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
        if configurable:
            p.add_argument("--config", "-c", default=None,
                           help="YAML config file or preset name (tiny-cpu, phi2-xsum-t4); default: the built-in "
                                "Phi-2/XSum recipe" + (" (demo: tiny-cpu)" if name == "demo" else ""))
            p.add_argument("overrides", nargs="*", metavar="section.key=value",
                           help="config overrides, e.g. train.max_steps=20 storage.output=s3://bucket/runs")
        p.set_defaults(func=func)
        commands[name] = p
        return p

    add("run", cmd_run, "train, summarize the eval split and score it, in this process (local mode)")
    tr = add("train", cmd_train, "fine-tune LoRA adapters only; writes adapter/ and train_log.parquet")
    tr.add_argument("--ray", action="store_true", help="train with Ray Train (ray.num_workers workers, ray.address)")
    sm = add("summarize", cmd_summarize,
             "summarize the eval split with model.adapter (or the base model) and score it")
    sm.add_argument("--ray", action="store_true", help="summarize with a Ray Data actor pool (ray.actors)")
    sm.add_argument("--output", help="with --ray: where the shard outputs go (a folder or s3:// prefix); or output=")
    sm.add_argument("--shard", help="with --ray: only shard i/n of the dataset, e.g. 3/8; or shard=")
    sm.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="with --ray: do not score")
    add("demo", cmd_demo, "the whole job on the embedded tiny model and synthetic data, offline on CPU; "
                          "prints ROUGE before vs after fine-tuning")
    pl = add("plan", cmd_plan, "estimate per-worker GPU memory and speed for a config; says whether it fits a GPU")
    pl.add_argument("--gpu", default="T4", help="T4 (default), L4, A10G, A100-40GB, A100-80GB, H100, H200")
    pl.add_argument("--model-config", default=None, help="a model config.json to take the shapes from")
    ev = add("evaluate", cmd_evaluate,
             "score predictions with ROUGE-1/2/L/Lsum: adds per-example ROUGE columns to a predictions.parquet "
             "(local or s3://) and writes metrics.json beside it; a summarize job's output is scored as a whole")
    ev.add_argument("--predictions", "-p", default=None,
                    help="predictions.parquet, a run folder or a summarize job's output; or predictions=")
    ev.add_argument("--metrics", "-m", default=None, help="where to write metrics.json (default: beside them)")
    rp = add("report", cmd_report, "read a run folder (local or s3://) and write <run>/report/ with the loss "
                                   "curve, ROUGE chart, dataset analysis, sample and all predictions, and report.md",
             configurable=False)
    rp.add_argument("run", help="the run folder, e.g. runs/my-run or s3://bucket/runs/my-run")
    ex = add("export", cmd_export, "merge a run's adapter into its base and write a model folder (local or s3://) "
                                   "that plain transformers loads, after checking it against the run's own model "
                                   "on its eval documents (parity.json)", configurable=False)
    ex.add_argument("run", help="the run folder, with config.yaml and a trained adapter/")
    ex.add_argument("--to", required=True, help="the model folder to write, e.g. models/my-run or s3://bucket/models/x")
    ex.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                    help="weights dtype of the folder (default float16)")
    ex.add_argument("--parity-docs", type=int, default=8, help="eval documents the check compares (default 8)")
    ex.add_argument("--max-logit-diff", type=float, default=None,
                    help="largest allowed |logit difference| against adapter-on-base (default per dtype: "
                         "float32 0.005, float16 0.5, bfloat16 4)")
    ex.add_argument("--force", action="store_true",
                    help="replace what --to holds even when it is not an export of this run")
    cp = add("compare", cmd_compare, "compare the ROUGE of two sets of predictions of the same documents: B - A per "
                                     "ROUGE type with a paired bootstrap interval and p-value; prints the table "
                                     "and writes comparison.md, .json and .png", configurable=False)
    cp.add_argument("a", metavar="A", help="the reference side: a run folder, a predictions.parquet or a summarize "
                                           "job's output (local or s3://)")
    cp.add_argument("b", metavar="B", help="the side whose gain is measured (same kinds of location as A)")
    cp.add_argument("--intersect", action="store_true",
                    help="compare on the ids both have (default: refuse when the id sets differ)")
    cp.add_argument("--out", default=None, help="folder for the outputs (default: <B>/compare-vs-<name of A>, "
                                                "beside B when B is a predictions.parquet)")
    cp.add_argument("--samples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    cp.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return parser, commands


def parse(argv: list[str], prog: str = "phi2sum") -> argparse.Namespace:
    """Options and `key=value` overrides in any order (argparse's intermixed parsing, which a parser with
    subcommands cannot do itself: the command's own parser does it), `-v` before or after the command."""
    parser, commands = build_parser(prog)
    position = next((i for i, arg in enumerate(argv) if arg in commands), None)
    if position is None or any(arg not in ("-v", "--verbose") for arg in argv[:position]):
        return parser.parse_args(argv)  # help, or the usage error that names the commands
    command = commands[argv[position]]
    if prog.startswith("jobs."):  # `python -m jobs.summarize` is that command with its Ray flags already given
        command.prog = f"python -m {prog}"
    args = command.parse_intermixed_args(argv[position + 1:])
    args.verbose = args.verbose or position > 0
    return args


def main(argv: list[str] | None = None, prog: str = "phi2sum") -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv), prog)
    setup_logging(args.verbose)

    def body() -> None:
        if hasattr(args, "overrides"):
            split_job_arguments(args)
        args.func(args)

    return run_command(prog, body)


if __name__ == "__main__":
    sys.exit(main())
