"""Preference data: loading, format detection, validation, tokenisation and the eval split."""

from .columns import parse_columns, rename_columns
from .detect import canonical_format, detect
from .errors import DataError
from .formats import FORMATS, FormattedData, detect_format, normalise
from .loading import RawData, load_raw, parse_spec
from .pipeline import PreferenceData, build_datasets
from .split import split_indices
from .tokenize import TokenizeStats, tokenize_records, truncate_pair

__all__ = [
    "DataError", "FORMATS", "FormattedData", "PreferenceData", "RawData", "TokenizeStats", "build_datasets",
    "canonical_format", "detect", "detect_format", "load_raw", "normalise", "parse_columns", "parse_spec",
    "rename_columns", "split_indices", "tokenize_records", "truncate_pair",
]
