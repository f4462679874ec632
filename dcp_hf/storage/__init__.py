from dcp_hf.contract import HFMetadata
from dcp_hf.storage.reader import HFStorageReader
from dcp_hf.storage.writer import HFStorageWriter

__all__ = ["HFMetadata", "HFStorageReader", "HFStorageWriter"]
