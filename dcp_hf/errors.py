"""Error types. Every message names the file and/or key it is about."""


class DcpHfError(Exception):
    """Base class of every error dcp-hf raises on purpose."""


class CheckpointFormatError(DcpHfError, ValueError):
    """A checkpoint on storage is malformed: bad header, bad index, bad offsets."""


class StateDictMismatchError(DcpHfError, ValueError):
    """The in-memory state dict and the checkpoint (or the plan) disagree."""


class CheckpointExistsError(DcpHfError, FileExistsError):
    """The destination already holds a checkpoint and overwrite was not asked for."""
