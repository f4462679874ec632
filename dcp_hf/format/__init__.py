"""The safetensors / HF checkpoint file format: headers, dtypes, index json, file layout."""

from dcp_hf.format.dtypes import dtype_from_name, itemsize, name_from_dtype
from dcp_hf.format.header import FileHeader, TensorEntry, decode_header, encode_header, read_header
from dcp_hf.format.index import (INDEX_NAME, SINGLE_FILE_NAME, FileLayout, TensorSpec, decode_index,
                                 encode_index, layout_files, natural_key, parse_size)

__all__ = [
    "INDEX_NAME", "SINGLE_FILE_NAME", "FileHeader", "FileLayout", "TensorEntry", "TensorSpec",
    "decode_header", "decode_index", "dtype_from_name", "encode_header", "encode_index",
    "itemsize", "layout_files", "name_from_dtype", "natural_key", "parse_size", "read_header",
]
