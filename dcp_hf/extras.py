"""Optional dependencies, installed with extras: ``pip install 'dcp-hf[megatron]'`` etc."""

from __future__ import annotations

import importlib

from dcp_hf.errors import DcpHfError

EXTRAS = {"megatron": "megatron-core", "s3": "s3fs", "hf": "transformers"}


class MissingExtraError(DcpHfError, ImportError):
    """A feature needs a package of one of dcp-hf's extras that is not installed."""


def require(module: str, extra: str, feature: str):
    """``module``, imported; if it is missing, an error that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name.split(".")[0]):
            raise  # the module exists but one of its own imports failed: report that as is
        raise MissingExtraError(
            f"{feature} needs {EXTRAS[extra]}, which is not installed: "
            f"pip install 'dcp-hf[{extra}]'") from None
