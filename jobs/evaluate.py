"""Job: ROUGE of a summarize job's output (all shards), written to <predictions>/metrics.json.

    python -m jobs.evaluate predictions=s3://bucket/preds/r1
    python -m jobs.evaluate predictions=s3://bucket/preds/r1 --config phi2-xsum-t4 data.source=s3://bucket/xsum/test.parquet

Fails clearly when a shard is missing or incomplete, or an id appears twice. References come from the
predictions; when they have none, pass the dataset (`data.source=...`) and they are joined by id. The same as
`phi2sum evaluate`.
"""

import sys

from phi2sum.cli import main as cli


def main(argv=None) -> int:
    return cli(["evaluate", *(sys.argv[1:] if argv is None else argv)], prog="jobs.evaluate")


if __name__ == "__main__":
    sys.exit(main())
