"""Errors a user can act on.

Every problem with what the user handed us (a path, a model file, a sampling value) raises
`UserError` with one line that names the input and the problem. The CLI prints that line and exits
with code 2; with `--debug` it shows the traceback too. Anything else is a bug and propagates.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with an input: one line naming the input and what is wrong with it."""

    exit_code = 2


class PackageError(UserError):
    """A model package is missing, corrupt, tampered with or unsafe."""


class SourceError(UserError):
    """An export source (HF directory, GGUF file, ONNX directory, alias) cannot be used."""


class UnknownArchitectureError(SourceError):
    """The source's architecture has no recipe in onnxopt.models."""


class GenerationError(UserError):
    """A prompt or a generation setting cannot be honoured."""
