"""Exceptions that the pipeline turns into one-line messages.

Every error a user can fix (bad params, bad data, missing checkpoint) is a ``DetkdError``; the stage
entries catch it and print ``error: <message>`` with exit status 2 instead of a traceback.
"""


class DetkdError(Exception):
    """Base class: a problem with the user's input that the message explains how to fix."""


class ConfigError(DetkdError):
    """``params.yaml`` (or an override) has an unknown key, a wrong type or an out-of-range value."""


class DataError(DetkdError):
    """A dataset file is missing, unreadable or malformed."""


class CheckpointError(DetkdError):
    """A checkpoint is missing, corrupt or does not fit the model it is loaded into."""


class TrainingDivergedError(DetkdError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ExportError(DetkdError):
    """An exported graph cannot be used as promised (TensorRT incompatibility, failed accuracy gate)."""


class ModelFileError(DetkdError):
    """An exported model (ONNX file or TensorRT engine) is missing, corrupt or built for another runtime."""


class InferenceInputError(DetkdError):
    """Input given to a runner does not match the model's input contract, or an image cannot be read."""


class BackendUnavailableError(DetkdError):
    """An optional runtime (TensorRT, a CUDA device, an onnxruntime provider) is not present here."""


class OutputWriteError(DetkdError):
    """An output could not be written (no space left, read-only filesystem, permission); the previous
    version of the file, if any, is intact."""
