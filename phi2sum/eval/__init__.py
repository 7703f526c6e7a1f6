"""Evaluation: `metrics` (ROUGE with rouge-score, bootstrap intervals) and `scoring` (score a predictions file or
a summarize job's output, write metrics.json)."""
