"""Exceptions raised for bad input. The CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations


class StreamPruneError(Exception):
    """Base class for every error caused by the user's input rather than a bug."""


class CheckpointError(StreamPruneError):
    """The model directory, its config.json or its safetensors files are missing or malformed."""


class UnsupportedModelError(StreamPruneError):
    """config.json names an architecture, or an option of one, that streamprune does not implement."""


class DataError(StreamPruneError):
    """Calibration or evaluation data is missing, empty, undecodable or too short."""


class ArgumentError(StreamPruneError):
    """A command-line or API argument is out of range or inconsistent with the model."""
