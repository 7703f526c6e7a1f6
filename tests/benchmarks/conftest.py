# The benchmarks are scripts (run them with `python tests/benchmarks/bench_*.py`), not tests: pytest must never
# import them (they start Ray clusters and run for minutes).
collect_ignore_glob = ["*.py"]
