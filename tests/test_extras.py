"""A feature whose extra is not installed fails with a message naming the extra to install
(simulated by hiding the package from the import system)."""

import subprocess
import sys

import pytest

from dcp_hf import HFStorageReader, HFStorageWriter
from dcp_hf.extras import MissingExtraError


def test_s3_path_without_s3fs_names_the_s3_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)
    for make in (HFStorageReader, HFStorageWriter):
        with pytest.raises(MissingExtraError, match=r"s3://bucket/x: an s3:// path needs s3fs.*dcp-hf\[s3\]"):
            make("s3://bucket/x")


def hidden(module: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import sys; sys.modules[{module!r}] = None\n{code}"],
                          capture_output=True, text=True, timeout=120)


def test_megatron_without_megatron_core_names_the_megatron_extra(tmp_path):
    proc = hidden("megatron", "import dcp_hf.megatron")
    assert "MissingExtraError: dcp_hf.megatron needs megatron-core" in proc.stderr
    assert "pip install 'dcp-hf[megatron]'" in proc.stderr
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / ".metadata").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    proc = hidden("megatron", "from dcp_hf.cli import main; sys.exit(main(['export', '--from', 'megatron', "
                  f"{str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, '--config', {str(tmp_path / 'config.json')!r}]))")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("dcp-hf export: dcp_hf.megatron needs megatron-core, which is not installed: "
                                   "pip install 'dcp-hf[megatron]'")


def test_megatron_config_generation_without_transformers_names_the_hf_extra():
    proc = hidden("transformers", "from dcp_hf.megatron.hf_config import hf_config\n"
                                  "hf_config(type('M', (), {'config': None})())")
    assert "generating config.json from a Megatron model needs transformers" in proc.stderr
    assert "pip install 'dcp-hf[hf]'" in proc.stderr
