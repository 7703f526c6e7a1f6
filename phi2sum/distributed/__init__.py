"""Ray: `cluster` (connect, runtime env, GPUs), `train` (Ray Train over `phi2sum.train`), `summarize` (Ray Data
over `phi2sum.generate`). Nothing outside this package imports Ray."""
