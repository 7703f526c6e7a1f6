"""What the tests share, in one place: processes (running the CLI and the jobs, one-line error checks), records
(good rows, JSONL files), s3 (a real moto server process, admin clients, buckets), faults (proxies that throttle or
cut S3 traffic), ray_head (a real `ray start --head`), shared (the ../shared files, skipping when absent)."""
