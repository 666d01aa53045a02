"""Errors raised by the domain package."""


class PipelineError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidDatasetError(PipelineError):
    """A dataset does not match the format in `mnist_pipeline.dataset`."""


class DatasetSourceError(PipelineError):
    """A dataset source given to ``mnist-pipeline upload`` cannot be read."""


class InvalidRecordError(PipelineError):
    """A run record or ``train_meta.json`` does not match its schema."""


class SettingsError(PipelineError):
    """An environment variable is missing or has an invalid value."""
