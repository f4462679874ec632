"""Layouts: declarative maps between in-memory tensors and HF checkpoint tensors."""

from dcp_hf.layouts.core import IDENTITY, Layout, Piece, Prefix, Rename, Rule, mem_view
from dcp_hf.layouts.experts import STYLES, MergedExperts, infer_style
from dcp_hf.layouts.models import detect_layout, layout_for_config

__all__ = [
    "IDENTITY",
    "STYLES",
    "Layout",
    "MergedExperts",
    "Piece",
    "Prefix",
    "Rename",
    "Rule",
    "detect_layout",
    "infer_style",
    "layout_for_config",
    "mem_view",
]
