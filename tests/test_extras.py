"""A feature whose extra is not installed fails with a message naming the extra to install
(simulated by hiding the package from the import system)."""

import importlib
import sys

import pytest

from dcp_hf import HFStorageReader, HFStorageWriter
from dcp_hf.extras import MissingExtraError


def test_s3_path_without_s3fs_names_the_s3_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)
    for make in (HFStorageReader, HFStorageWriter):
        with pytest.raises(MissingExtraError, match=r"s3://bucket/x: an s3:// path needs s3fs.*dcp-hf\[s3\]"):
            make("s3://bucket/x")


@pytest.fixture
def without_megatron(monkeypatch):
    """megatron-core hidden, and dcp_hf.megatron imported afresh (restored afterwards)."""
    for name in ["megatron", "megatron.core", *(n for n in sys.modules if n.startswith("megatron."))]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in [n for n in sys.modules if n.startswith("dcp_hf.megatron")]:
        monkeypatch.delitem(sys.modules, name)
    import dcp_hf

    if hasattr(dcp_hf, "megatron"):
        monkeypatch.delattr(dcp_hf, "megatron")


def test_megatron_without_megatron_core_names_the_megatron_extra(without_megatron, tmp_path, capsys):
    with pytest.raises(MissingExtraError, match=r"dcp_hf.megatron needs megatron-core.*dcp-hf\[megatron\]"):
        importlib.import_module("dcp_hf.megatron")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / ".metadata").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    from dcp_hf.cli import main

    assert (
        main(
            [
                "export",
                "--from",
                "megatron",
                str(tmp_path / "src"),
                str(tmp_path / "out"),
                "--config",
                str(tmp_path / "config.json"),
            ]
        )
        == 1
    )
    assert capsys.readouterr().err == (
        "dcp-hf export: dcp_hf.megatron needs megatron-core, which is not installed: pip install 'dcp-hf[megatron]'\n"
    )


def test_megatron_config_generation_without_transformers_names_the_hf_extra(monkeypatch):
    from dcp_hf.megatron.hf_config import hf_config

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(
        MissingExtraError,
        match=r"generating config.json from a Megatron model needs "
        r"transformers.*dcp-hf\[hf\]",
    ):
        hf_config(type("M", (), {"config": None})())
