"""Exceptions raised by omni_rt (bad arguments are plain ``ValueError``s)."""


class CheckpointError(Exception):
    """A checkpoint directory is malformed: missing/unexpected/mis-shaped tensors, bad config.json."""


class ConfigError(CheckpointError, ValueError):
    """A config.json field is missing or has a wrong value; the message names the field."""


class DeviceFault(RuntimeError):
    """A device-side failure. It is sticky: the Runtime must be recreated."""


class CancelledRequest(Exception):
    """The request was aborted (abort(), leaving the stream loop, or cancelling the astream task)."""
