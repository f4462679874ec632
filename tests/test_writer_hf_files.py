"""A DCP save of a real transformers model through HFStorageWriter(config=, copy_from=,
file_map_from=) is a folder that from_pretrained loads as is; torch's HuggingFaceStorageWriter
usage works with a one-line import change. Oracles: transformers itself (from_pretrained, the
model's own logits, save_pretrained's files) and torch's own writer."""

import json
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from dcp_hf import HFSavePlanner, HFStorageReader, HFStorageWriter, StateDictMismatchError  # noqa: E402
from dcp_hf.local_ranks import run_ranks  # noqa: E402


def tiny_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )


def tiny_llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(tied)).eval()


def logits(model):
    ids = torch.arange(24).view(2, 12) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_as_is(path) -> LlamaForCausalLM:
    """from_pretrained with nothing added to the folder, offline; no key may be missing,
    unexpected or mismatched."""
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, local_files_only=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def saved_keys(path) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("tied", [False, True])
def test_one_process_save_loads_with_from_pretrained(tmp_path, tied):
    model = tiny_llama(tied)
    dcp.save(
        model.state_dict(),
        storage_writer=HFStorageWriter(tmp_path / "out", config=model.config),
        planner=HFSavePlanner(),
        no_dist=True,
    )
    assert torch.equal(logits(load_as_is(tmp_path / "out")), logits(model))
    model.save_pretrained(tmp_path / "theirs")
    assert saved_keys(tmp_path / "out") == saved_keys(tmp_path / "theirs")  # lm_head left out when tied
    assert ("lm_head.weight" in saved_keys(tmp_path / "out")) == (not tied)


def _save_sharded(rank, world, path, tied):
    """Every parameter a DTensor Shard(0) over the ranks (tied ones: one DTensor, two keys)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    model = tiny_llama(tied)
    shared = {}
    state = {
        k: shared.setdefault(id(v), distribute_tensor(v.detach(), mesh, [Shard(0)]))
        for k, v in model.state_dict().items()
    }
    dcp.save(state, storage_writer=HFStorageWriter(path, config=model.config.to_dict()), planner=HFSavePlanner())


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_two_ranks_dtensor_save_loads_with_from_pretrained(tmp_path, tied):
    run_ranks(_save_sharded, 2, str(tmp_path), tied)
    assert torch.equal(logits(load_as_is(tmp_path)), logits(tiny_llama(tied)))


def test_tied_config_with_different_weights_is_refused(tmp_path):
    model = tiny_llama(False)  # lm_head differs from the embedding
    writer = HFStorageWriter(tmp_path / "out", config=tiny_config(True))
    with pytest.raises(BaseException, match="differs from 'model.embed_tokens.weight'"):
        dcp.save(model.state_dict(), storage_writer=writer, planner=HFSavePlanner(), no_dist=True)
    assert not (tmp_path / "out").exists() or not saved_keys(tmp_path / "out")


def test_copy_from_copies_config_generation_and_tokenizer_files(tmp_path):
    model = tiny_llama(False)
    model.save_pretrained(tmp_path / "release")
    (tmp_path / "release" / "tokenizer.json").write_text('{"version": "1.0"}')
    (tmp_path / "release" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (tmp_path / "release" / "pytorch_model.bin").write_bytes(b"old weights, not copied")
    dcp.save(
        model.state_dict(),
        storage_writer=HFStorageWriter(tmp_path / "out", copy_from=tmp_path / "release"),
        planner=HFSavePlanner(),
        no_dist=True,
    )
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "pytorch_model.bin" not in files
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "release" / name).read_bytes()
    assert torch.equal(logits(load_as_is(tmp_path / "out")), logits(model))


def weight_map(path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def test_file_map_from_keeps_the_release_files(tmp_path):
    release = tiny_llama(False)
    release.save_pretrained(tmp_path / "release", max_shard_size="100KB")
    theirs = weight_map(tmp_path / "release")
    assert len(set(theirs.values())) > 2
    tuned = tiny_llama(False, seed=1)  # fine-tuned weights, same keys
    dcp.save(
        tuned.state_dict(),
        storage_writer=HFStorageWriter(
            tmp_path / "out", config=tuned.config, file_map_from=tmp_path / "release", max_shard_size="5GB"
        ),
        planner=HFSavePlanner(),
        no_dist=True,
    )
    assert weight_map(tmp_path / "out") == theirs
    assert torch.equal(logits(load_as_is(tmp_path / "out")), logits(tuned))

    # a key the release lacks goes in a file after the release's files
    state = dict(tuned.state_dict(), **{"extra.weight": torch.ones(3)})
    dcp.save(
        state,
        storage_writer=HFStorageWriter(
            tmp_path / "more", file_map_from=tmp_path / "release" / "model.safetensors.index.json"
        ),
        planner=HFSavePlanner(),
        no_dist=True,
    )
    ours = weight_map(tmp_path / "more")
    n = len(set(theirs.values())) + 1
    assert ours.pop("extra.weight") == f"model-{n:05d}-of-{n:05d}.safetensors"
    assert ours == {k: f.replace(f"of-{n - 1:05d}", f"of-{n:05d}") for k, f in theirs.items()}


def test_torch_hf_writer_usage_is_a_one_line_import_change(tmp_path):
    """torch's documented usage (keywords of torch.distributed.checkpoint.HuggingFaceStorageWriter
    and HuggingFaceStorageReader, default planners), run with torch's classes and with ours."""
    model = tiny_llama(False)
    state = model.state_dict()
    mapping = {k: 1 + (i % 3) for i, k in enumerate(state)}

    def usage(HuggingFaceStorageWriter, HuggingFaceStorageReader, path):
        dcp.save(
            state,
            storage_writer=HuggingFaceStorageWriter(
                path=path,
                fqn_to_index_mapping=mapping,
                save_distributed=True,
                enable_consolidation=True,
                thread_count=2,
                thread_count_consolidation=1,
            ),
            no_dist=True,
        )
        loaded = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp.load(loaded, storage_reader=HuggingFaceStorageReader(path=path, thread_count=2), no_dist=True)
        return loaded

    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

    torch_loaded = usage(HuggingFaceStorageWriter, HuggingFaceStorageReader, str(tmp_path / "torch"))
    from dcp_hf import HFStorageReader as HuggingFaceStorageReader  # noqa: F811 - the one-line change
    from dcp_hf import HFStorageWriter as HuggingFaceStorageWriter  # noqa: F811

    ours_loaded = usage(HuggingFaceStorageWriter, HuggingFaceStorageReader, str(tmp_path / "ours"))
    for key, value in state.items():
        assert torch.equal(ours_loaded[key], value) and torch.equal(torch_loaded[key], value), key
    assert weight_map(tmp_path / "ours") == weight_map(tmp_path / "torch")


def test_bad_options_fail_before_saving(tmp_path):
    with pytest.raises(FileNotFoundError, match="copy_from"):
        HFStorageWriter(tmp_path / "out", copy_from=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="file_map_from"):
        HFStorageWriter(tmp_path / "out", file_map_from=tmp_path)
    with pytest.raises(ValueError, match="not both"):
        HFStorageWriter(tmp_path / "out", file_map_from=tmp_path, fqn_to_index_mapping={})
    assert HFStorageReader(tmp_path, thread_count=3).thread_count == 3
    assert issubclass(StateDictMismatchError, ValueError)


@pytest.mark.slow
def test_to_s3_with_config_copy_from_and_tied_weights(s3, tmp_path):
    """The same options through the S3 upload path: objects downloaded as they are load with
    from_pretrained."""
    model = tiny_llama(True)
    model.save_pretrained(tmp_path / "release")
    (tmp_path / "release" / "tokenizer.json").write_text('{"version": "1.0"}')
    url = f"s3://{s3.bucket('dcp-hf-hf-files')}/tied"
    dcp.save(
        model.state_dict(),
        planner=HFSavePlanner(),
        no_dist=True,
        storage_writer=HFStorageWriter(
            url, storage_options=s3.storage_options, config=model.config, copy_from=tmp_path / "release"
        ),
    )
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    listed = s3.client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]
    (tmp_path / "down").mkdir()
    for obj in listed:
        name = obj["Key"].rsplit("/", 1)[1]
        s3.client.download_file(bucket, obj["Key"], str(tmp_path / "down" / name))
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} == set(
        os.listdir(tmp_path / "down")
    )
    assert "lm_head.weight" not in saved_keys(tmp_path / "down")
    assert torch.equal(logits(load_as_is(tmp_path / "down")), logits(model))
