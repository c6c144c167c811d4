"""Synthetic VQA world with box labels, the JSONL record format (also reads Visual-CoT) and box -> token masks."""

from .records import Record, boxes_to_token_mask, read_records, write_split
from .world import FAMILIES, Sample, WorldConfig, render, sample

__all__ = ["FAMILIES", "Record", "Sample", "WorldConfig", "boxes_to_token_mask", "read_records", "render",
           "sample", "write_split"]
