"""Data: dataset formats, prompt templates, tokenisation with label masks, splits and order."""

from mlora.data.job_data import JobData, split_sizes
from mlora.data.records import DataError, load_records
from mlora.data.templates import TEMPLATES, Piece, prompt_text, render
from mlora.data.tokenize import IGNORE, Example, tokenize_pieces

__all__ = [
    "DataError",
    "Example",
    "IGNORE",
    "JobData",
    "Piece",
    "TEMPLATES",
    "load_records",
    "prompt_text",
    "render",
    "split_sizes",
    "tokenize_pieces",
]
