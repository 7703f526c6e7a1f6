"""Ray job: distributed QLoRA training (Ray Train), the same as `phi2sum train --ray`.

    ray job submit --working-dir . -- python -m jobs.train --config phi2-xsum-t4 \
        ray.num_workers=4 storage.output=s3://bucket/runs run.name=phi2-xsum

Resubmitting the same run.name resumes from its latest checkpoint, or does nothing if it already finished.
"""

import sys

from phi2sum.cli import main as cli


def main(argv=None) -> int:
    return cli(["train", "--ray", *(sys.argv[1:] if argv is None else argv)], prog="jobs.train")


if __name__ == "__main__":
    sys.exit(main())
