"""Ray job: summarize a dataset, or one shard of it, with a Ray Data actor pool; exactly once, resumable.

    ray job submit --working-dir . -- python -m jobs.summarize --config phi2-xsum-t4 \
        data.source=s3://bucket/xsum/test.parquet model.adapter=s3://bucket/runs/r1/adapter \
        output=s3://bucket/preds/r1 shard=3/8

`output=` (required) and `shard=i/n` (optional) are job arguments; everything else is a config override.
Rerunning writes only what is missing; a finished shard is left as it is. The same as
`phi2sum summarize --ray --no-evaluate`.
"""

import sys

from phi2sum.cli import main as cli


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return cli(["summarize", "--ray", "--no-evaluate", *args], prog="jobs.summarize")


if __name__ == "__main__":
    sys.exit(main())
