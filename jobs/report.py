"""Report job: `python -m jobs.report <run_uri>` writes `<run_uri>/report/` (plots, CSV, report.md).

`run_uri` is a run folder, local or s3:// (S3 endpoint and credentials from the usual AWS environment). Prints
the report folder; a problem the user can fix prints one line and exits 2.
"""

import argparse
import sys

from jobs._entry import run_job


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.splitlines()[0])
    p.add_argument("run_uri", help="the run folder, e.g. runs/my-run or s3://bucket/runs/my-run")
    args = p.parse_args(argv)

    def body():
        from phi2sum.report import write_report

        print(f"report: {write_report(args.run_uri)}")

    return run_job("jobs.report", body)


if __name__ == "__main__":
    sys.exit(main())
