"""Optional dependencies, installed with extras: ``pip install 'dcp-hf[megatron]'`` etc."""

from __future__ import annotations

import importlib
import importlib.util

from dcp_hf.errors import DcpHfError

EXTRAS = {"megatron": "megatron-core", "s3": "s3fs", "hf": "transformers"}


class MissingExtraError(DcpHfError, ImportError):
    """A feature needs a package of one of dcp-hf's extras that is not installed."""


def _missing(extra: str, feature: str) -> MissingExtraError:
    return MissingExtraError(f"{feature} needs {EXTRAS[extra]}, which is not installed: pip install 'dcp-hf[{extra}]'")


def require(module: str, extra: str, feature: str, *, load: bool = True):
    """``module`` (imported when ``load``, else only looked up, which is cheap); if it is not
    installed, an error that names the extra to install."""
    if not load:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            raise _missing(extra, feature)
        return None
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or module.split(".")[0] != e.name.split(".")[0]:
            raise  # the module is there but one of its own imports failed: report that as is
        raise _missing(extra, feature) from None
