"""dcp-hf: Hugging Face safetensors checkpoints as a torch.distributed.checkpoint backend."""

from dcp_hf.errors import CheckpointExistsError, CheckpointFormatError, DcpHfError, StateDictMismatchError
from dcp_hf.extras import MissingExtraError
from dcp_hf.layouts import Layout, MergedExperts, Prefix, Rename, detect_layout, layout_for_config
from dcp_hf.planners import HFLoadPlanner, HFSavePlanner
from dcp_hf.storage import HFStorageReader, HFStorageWriter
from dcp_hf.tensor_box import TensorBox

__version__ = "0.1.0"  # the package version (pyproject.toml reads it)

__all__ = [
    "CheckpointExistsError",
    "CheckpointFormatError",
    "DcpHfError",
    "HFLoadPlanner",
    "HFSavePlanner",
    "HFStorageReader",
    "HFStorageWriter",
    "Layout",
    "MergedExperts",
    "MissingExtraError",
    "Prefix",
    "Rename",
    "StateDictMismatchError",
    "TensorBox",
    "detect_layout",
    "layout_for_config",
]
