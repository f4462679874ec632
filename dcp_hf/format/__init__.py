"""The safetensors / HF checkpoint file format: headers, dtypes, index json, file layout."""

from dcp_hf.format.dtypes import dtype_from_name, itemsize, name_from_dtype
from dcp_hf.format.header import FileHeader, TensorEntry, decode_header, encode_header, read_header
from dcp_hf.format.index import (
    INDEX_NAME,
    SAVE_ID_KEY,
    SINGLE_FILE_NAME,
    FileLayout,
    TensorSpec,
    decode_index,
    decode_index_and_id,
    encode_index,
    layout_files,
    natural_key,
    parse_size,
)

__all__ = [
    "INDEX_NAME",
    "SAVE_ID_KEY",
    "SINGLE_FILE_NAME",
    "FileHeader",
    "FileLayout",
    "TensorEntry",
    "TensorSpec",
    "decode_header",
    "decode_index",
    "decode_index_and_id",
    "dtype_from_name",
    "encode_header",
    "encode_index",
    "itemsize",
    "layout_files",
    "name_from_dtype",
    "natural_key",
    "parse_size",
    "read_header",
]
