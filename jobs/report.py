"""Report job: `python -m jobs.report <run_uri>` writes `<run_uri>/report/` (plots, CSV, report.md).

`run_uri` is a run folder, local or s3:// (S3 endpoint and credentials from the usual AWS environment). The same
as `phi2sum report`.
"""

import sys

from phi2sum.cli import main as cli


def main(argv=None) -> int:
    return cli(["report", *(sys.argv[1:] if argv is None else argv)], prog="jobs.report")


if __name__ == "__main__":
    sys.exit(main())
