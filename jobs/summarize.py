"""Ray job: summarize a dataset, or one shard of it, with an actor pool; exactly once, resumable.

    ray job submit --working-dir . -- python -m jobs.summarize --config jobs/configs/phi2-xsum-t4.yaml \
        data.source=s3://bucket/xsum/test.parquet model.adapter=s3://bucket/runs/r1/adapter \
        output=s3://bucket/preds/r1 shard=3/8

`output=` (required) and `shard=i/n` (optional) are job arguments; everything else is a config override.
Rerunning writes only what is missing; a finished shard is left as it is.
"""

import sys

from jobs._entry import job_args, parser, run_job


def main(argv=None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    job, overrides = job_args(args.overrides, required=("output",), optional=("shard",))

    def body():
        from phi2sum.config import load_config
        from phi2sum.ray_summarize import Shard, summarize_on_ray

        done = summarize_on_ray(load_config(args.config, overrides), job["output"], Shard.parse(job.get("shard")))
        print(f"{done['shard']}: {done['rows']} summaries in {job['output']}")

    return run_job("jobs.summarize", body)


if __name__ == "__main__":
    sys.exit(main())
