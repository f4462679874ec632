"""dcp-hf: Hugging Face safetensors checkpoints as a torch.distributed.checkpoint backend."""

from dcp_hf.errors import CheckpointExistsError, CheckpointFormatError, DcpHfError, StateDictMismatchError
from dcp_hf.planners import HFLoadPlanner, HFSavePlanner
from dcp_hf.storage import HFStorageReader, HFStorageWriter

__version__ = "0.1.0"

__all__ = [
    "CheckpointExistsError", "CheckpointFormatError", "DcpHfError", "HFLoadPlanner",
    "HFSavePlanner", "HFStorageReader", "HFStorageWriter", "StateDictMismatchError",
]
