"""Error types. Every message names the file and/or key it is about."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fix:
    """A way past an error, as the option that does it: ``option``, the argument's name (a
    front end such as the CLI says it as its own flag), and ``advice``, its Python wording."""

    option: str
    advice: str


class DcpHfError(Exception):
    """Base class of every error dcp-hf raises on purpose. ``fix``: the option that gets past
    it, if one does; the message ends with its advice."""

    def __init__(self, *args, fix: Fix | None = None):  # OSError kinds take (errno, strerror, filename)
        super().__init__(*args)
        self.fix = fix  # in __dict__, so it survives pickling to other ranks

    @property
    def reason(self) -> str:
        """The message without the fix's advice."""
        return super().__str__()

    def __str__(self) -> str:
        fix = getattr(self, "fix", None)
        return f"{self.reason}; {fix.advice}" if fix is not None else self.reason


class CheckpointFormatError(DcpHfError, ValueError):
    """A checkpoint on storage is malformed: bad header, bad index, bad offsets."""


class StateDictMismatchError(DcpHfError, ValueError):
    """The in-memory state dict and the checkpoint (or the plan) disagree."""


class CheckpointExistsError(DcpHfError, FileExistsError):
    """The destination already holds a checkpoint and overwrite was not asked for."""


class CheckpointNotFoundError(DcpHfError, FileNotFoundError):
    """No checkpoint at the given path."""


class MixedCheckpointError(CheckpointFormatError):
    """Files of two different saves in one checkpoint: it was overwritten while being read, or
    a save into it was interrupted on a store without atomic folder commit."""


class StorageError(DcpHfError, OSError):
    """Storage failed or did not answer (disk full, permissions, S3 errors and timeouts); the
    message names the file or URL."""


class CheckpointBusyError(DcpHfError, RuntimeError):
    """Another save into the same folder holds its lock."""


class PeerRankError(DcpHfError, RuntimeError):
    """Another rank failed; the message holds its reason."""


def not_a_tensor(key: str) -> StateDictMismatchError:
    return StateDictMismatchError(
        f"{key!r} is not a tensor: an HF safetensors checkpoint holds tensors only (remove it "
        f"from the state dict or save it elsewhere)"
    )


def root_cause(error: BaseException) -> BaseException:
    """The exception a rank raised, out of DCP's CheckpointException wrappers (a BaseException
    that DCP raises on every rank when any rank failed)."""
    from torch.distributed.checkpoint.api import CheckpointException

    while isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    return error


def on_every_rank(fn, process_group=None):
    """``fn()`` on this rank; if it raises on any rank of the group, every rank raises (the
    failing ranks their own error, the others a PeerRankError with the first reason), so no
    rank goes on into a collective the failed ones will never join."""
    import torch.distributed as dist

    try:
        result, error, mine = fn(), None, None
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
        result, error, mine = None, f"{type(e).__name__}: {e}", e
    if not dist.is_initialized():
        if mine is not None:
            raise mine
        return result
    errors = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(errors, error, group=process_group)
    if mine is not None:
        raise mine
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        rank, reason = failed[0]
        raise PeerRankError(f"rank {rank} of {len(errors)} failed ({len(failed)} in all): {reason}")
    return result
