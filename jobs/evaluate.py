"""Job: ROUGE of a summarize job's output (all shards), written to <predictions>/metrics.json.

    python -m jobs.evaluate predictions=s3://bucket/preds/r1
    python -m jobs.evaluate predictions=s3://bucket/preds/r1 --config phi2-xsum-t4 data.source=s3://bucket/xsum/test.parquet

Fails clearly when a shard is missing or incomplete, or an id appears twice. References come from the
predictions; when they have none, pass the dataset (`data.source=...`) and they are joined by id.
"""

import sys

from jobs._entry import job_args, parser, run_job


def main(argv=None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    job, overrides = job_args(args.overrides, required=("predictions",))

    def body():
        from phi2sum.cli import format_metrics
        from phi2sum.evaluate import evaluate_output

        references = None
        if args.config or overrides:
            from phi2sum.config import load_config
            from phi2sum.data import load_split

            cfg = load_config(args.config, overrides)
            split = load_split(cfg.data, cfg.data.eval_split, None)
            references = {r["id"]: r["summary"] for r in split.records}
        metrics = evaluate_output(job["predictions"], references)
        print(format_metrics(metrics))
        print(f"metrics: {job['predictions'].rstrip('/')}/metrics.json")

    return run_job("jobs.evaluate", body)


if __name__ == "__main__":
    sys.exit(main())
