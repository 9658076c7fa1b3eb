"""Preference data: loading, format detection, validation, tokenisation and the eval split."""

from .errors import DataError
from .formats import FORMATS, FormattedData, detect_format, normalise
from .loading import RawData, load_raw, parse_spec
from .pipeline import PreferenceData, build_datasets
from .split import split_indices
from .tokenize import TokenizeStats, tokenize_records, truncate_pair

__all__ = [
    "DataError", "FORMATS", "FormattedData", "PreferenceData", "RawData", "TokenizeStats", "build_datasets",
    "detect_format", "load_raw", "normalise", "parse_spec", "split_indices", "tokenize_records", "truncate_pair",
]
