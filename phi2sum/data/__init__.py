"""Data: `sources` (hub, files, demo corpus) -> `records` (mapping, validation) -> `splits` (seeded subsets)."""

from phi2sum.data.records import (DataStats, check_unique_ids, column_map, map_row, record_problem, valid_id,
                                  validate_records)
from phi2sum.data.sources import (BAD_ROW, is_file_source, parse_file, read_hub, read_raw, source_files, split_source,
                                  splits_of, text_columns)
from phi2sum.data.splits import (Split, TrainingSplits, load_split, load_train, load_train_eval,
                                 load_training_splits, seeded_order, subset_rank)

__all__ = ["BAD_ROW", "DataStats", "Split", "check_unique_ids", "column_map", "is_file_source", "load_split",
           "load_train", "load_train_eval", "load_training_splits", "TrainingSplits", "map_row", "parse_file", "read_hub", "read_raw", "record_problem",
           "seeded_order", "source_files", "split_source", "splits_of", "subset_rank", "text_columns", "valid_id",
           "validate_records"]
