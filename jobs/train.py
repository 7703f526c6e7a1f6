"""Ray job: distributed QLoRA training.

    ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/phi2-xsum-t4.yaml \
        ray.num_workers=4 storage.output=s3://bucket/runs run.name=phi2-xsum

Resubmitting the same run.name resumes from its latest checkpoint, or does nothing if it already finished.
"""

import sys

from jobs._entry import parser, run_job


def main(argv=None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)

    def body():
        from phi2sum.config import load_config
        from phi2sum.ray_train import train_on_ray

        run = train_on_ray(load_config(args.config, args.overrides))
        print(f"adapter: {run.adapter_uri}")

    return run_job("jobs.train", body)


if __name__ == "__main__":
    sys.exit(main())
