"""Errors meant for the user: the CLI prints them as one clear message, never a traceback."""


class FakeprintError(Exception):
    """A user-facing error (bad input, bad file, bad option). The message names the file, row or field."""


class DataError(FakeprintError):
    """A problem with a dataset: its CSV files or its images."""


class CheckpointError(FakeprintError):
    """A checkpoint that cannot be used: missing, unsafe, corrupt or inconsistent."""
