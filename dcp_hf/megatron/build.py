"""Build Megatron GPT models from HF configs at any parallel layout, on CPU too, for the tests
and benchmarks (and offline tools): ``save_hf``, ``load_hf`` and ``export`` never use it. Call
inside an initialized process group. Where torch has no CUDA, megatron-core is run through
:func:`cuda_calls_on_cpu`, which replaces torch.cuda functions while it is active."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Parallel:
    """A Megatron parallel layout. ``first``/``last``: layers of the first/last pipeline stage
    when they are uneven."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int | None = None
    first: int | None = None
    last: int | None = None

    def __str__(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vpp:
            parts.append(f"VPP{self.vpp}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        if self.etp is not None:
            parts.append(f"ETP{self.etp}")
        if self.first is not None or self.last is not None:
            parts.append(f"first{self.first}/last{self.last}")
        return "/".join(parts)


def init_parallel(p: Parallel) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
    )
    random.get_cuda_rng_tracker().reset()


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """For megatron-core on a machine without CUDA (tests, CPU benchmarks), never in training:
    it still asks for CUDA while building a model with ``use_cpu_initialization`` (the MoE
    router allocates on ``torch.cuda.current_device()``, tied embeddings move to ``.cuda()`` to
    be all-reduced between the first and last stage) and its checkpoint writer calls
    ``torch.cuda.synchronize()``. While active, and only where torch has no CUDA, these three
    are replaced process-wide by CPU stand-ins (gloo reduces CPU tensors; there is nothing to
    synchronize)."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.synchronize
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.synchronize = saved


@contextlib.contextmanager
def optimizer_on_cpu():
    """For megatron-core's optimizers on a machine without CUDA (tests), never in training: they
    accept only parameters whose ``Tensor.type()`` is ``torch.cuda.FloatTensor`` (or Half/BFloat16:
    optimizer/distrib_optimizer.py and optimizer/optimizer.py check the string) and make a few
    scalars with ``device='cuda'`` (optimizer.py's overflow buffer and unit loss scale). While
    active, and only where torch has no CUDA, CPU tensors of those dtypes report the CUDA type
    names and ``torch.tensor``/``zeros``/``empty`` make CPU tensors for ``device='cuda'``; the
    optimizer's arithmetic is torch's own on the CPU tensors. Use with :func:`cuda_calls_on_cpu`."""
    if torch.cuda.is_available():
        yield
        return
    names = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor"}
    names[torch.bfloat16] = "torch.cuda.BFloat16Tensor"
    saved_type, saved = torch.Tensor.type, (torch.tensor, torch.zeros, torch.empty)

    def cuda_type(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in names:
            return names[self.dtype]
        return saved_type(self, *args, **kwargs)

    def on_cpu(make):
        def made(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return make(*args, **kwargs)

        return made

    torch.Tensor.type = cuda_type
    torch.tensor, torch.zeros, torch.empty = (on_cpu(make) for make in saved)
    try:
        yield
    finally:
        torch.Tensor.type = saved_type
        torch.tensor, torch.zeros, torch.empty = saved


def build_gpt(
    hf: dict,
    p: Parallel,
    *,
    experts: str = "sequential",
    seed: int = 0,
    params_dtype: torch.dtype = torch.float32,
    pad_vocab_to: int | None = None,
    mtp: bool = False,
    overrides: dict | None = None,
    gpt_overrides: dict | None = None,
    meta: bool = False,
) -> list:
    """This rank's model chunks (one per virtual stage) for an HF config, randomly initialized
    (the same weights for the same ``seed`` at every layout's TP ranks). ``experts``:
    ``sequential`` (SequentialMLP) or ``legacy_grouped`` (GroupedMLP, built without the
    grouped_gemm kernels, which only its forward needs). ``pad_vocab_to``: a padded vocab
    size as Megatron's training scripts make. ``mtp``: build the config's
    ``num_nextn_predict_layers`` multi-token-prediction layers (on the last stage).
    ``overrides``: further TransformerConfig settings; ``gpt_overrides``: GPTModel arguments.
    ``meta``: parameters on the meta device, uninitialized (only their keys and shapes are wanted).
    A 16-bit ``params_dtype`` gives the model Megatron-LM trains and checkpoints at that dtype:
    cast whole as its Float16Module casts it (the local spec's norms too, which megatron-core
    creates in fp32), the routers' expert bias kept fp32 as megatron-core keeps it."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from dcp_hf.megatron.hf_config import megatron_config

    grouped = experts == "legacy_grouped"
    if experts not in ("sequential", "legacy_grouped"):
        raise ValueError(f"experts must be sequential or legacy_grouped, not {experts!r}")
    config, gpt = megatron_config(
        hf,
        use_cpu_initialization=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp if p.etp is not None else p.tp,
        num_layers_in_first_pipeline_stage=p.first,
        num_layers_in_last_pipeline_stage=p.last,
        sequence_parallel=False,
        moe_grouped_gemm=grouped,
        moe_use_legacy_grouped_gemm=grouped,
        **({"mtp_num_layers": hf["num_nextn_predict_layers"]} if mtp else {}),
        **({"perform_initialization": False} if meta else {}),
        **(overrides or {}),
    )
    gpt.update(gpt_overrides or {})
    if pad_vocab_to:
        gpt["vocab_size"] = pad_vocab_to
    mla = getattr(config, "multi_latent_attention", False)

    def block_spec(vp_stage):  # per-layer specs: dense and MoE layers as moe_layer_freq says
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization="RMSNorm", vp_stage=vp_stage
        )
        if mla:
            for layer in spec.layer_specs:
                layer.submodules.self_attention.submodules.core_attention = _mla_core_attention()
        return spec

    torch.manual_seed(seed)
    chunks = []
    device = torch.device("meta") if meta else contextlib.nullcontext()
    with cuda_calls_on_cpu(), _grouped_gemm_available(grouped), _mla_without_te(mla), device:
        for vp in range(p.vpp or 1):
            vp_stage = vp if p.vpp else None
            spec = block_spec(vp_stage)
            mtp_spec = (
                get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=vp_stage) if mtp else None
            )
            chunks.append(
                GPTModel(
                    config,
                    spec,
                    pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                    vp_stage=vp_stage,
                    mtp_block_spec=mtp_spec,
                    **gpt,
                )
            )
    if params_dtype in (torch.bfloat16, torch.float16):
        for chunk in chunks:
            _as_float16_module(chunk, params_dtype)
    return chunks


def _as_float16_module(chunk, dtype: torch.dtype) -> None:
    """Cast a chunk in place as Megatron-LM's Float16Module does (``module.bfloat16()``), then
    the expert bias back to fp32, as megatron-core's router does before using or loading it."""
    chunk.to(dtype)
    for module in chunk.modules():
        if hasattr(module, "_maintain_float32_expert_bias"):
            module._maintain_float32_expert_bias()


def _mla_core_attention():
    """megatron-core's local spec gives MLA a DotProductAttention, whose constructor rejects
    MLA's separate key/value head sizes (MLA runs on TE or flash attention). It holds no
    weights, so a subclass that takes those arguments builds the model without changing any
    checkpointed tensor."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)

    return MLADotProductAttention


@contextlib.contextmanager
def _mla_without_te(wanted: bool):
    """Without Transformer Engine, megatron-core's MLA still believes TE is there (its import
    guard leaves a placeholder, not a class, in ``TELinear`` and ``HAVE_TE = True``) and fails
    on ``isinstance``; correct that availability flag while building."""
    from megatron.core.transformer import multi_latent_attention as mla

    if not wanted or isinstance(mla.TELinear, type):
        yield
        return
    saved = mla.HAVE_TE
    mla.HAVE_TE = False
    try:
        yield
    finally:
        mla.HAVE_TE = saved


@contextlib.contextmanager
def _grouped_gemm_available(wanted: bool):
    """GroupedMLP checks that the grouped_gemm package is installed, though only its forward
    uses it; patch that availability check alone (the layout code stays real)."""
    if not wanted:
        yield
        return
    from megatron.core.transformer.moe import grouped_gemm_util

    saved = grouped_gemm_util.grouped_gemm_is_available
    grouped_gemm_util.grouped_gemm_is_available = lambda: True
    try:
        yield
    finally:
        grouped_gemm_util.grouped_gemm_is_available = saved
