from dcp_hf.storage.reader import HFMetadata, HFStorageReader
from dcp_hf.storage.writer import HFStorageWriter

__all__ = ["HFMetadata", "HFStorageReader", "HFStorageWriter"]
