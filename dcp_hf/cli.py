"""The ``dcp-hf`` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args) -> int:
    from dcp_hf.demo import run_demo
    from dcp_hf.models import LLAMA_1B_LIKE, LlamaShape
    shape = LLAMA_1B_LIKE if args.size == "1b" else LlamaShape()
    run_demo(args.output, args.nproc, shape, args.max_shard_size)
    return 0


def _cmd_inspect(args) -> int:
    from dcp_hf.inspect import inspect_checkpoint
    print(inspect_checkpoint(args.path, verbose=args.verbose))
    return 0


def _init_distributed() -> None:
    """Join the process group when started by torchrun (WORLD_SIZE set), so the work is spread."""
    import os

    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def _report(what: str, info: dict) -> None:
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        details = ", ".join(f"{k}: {v}" for k, v in info.items() if v not in ([], None))
        print(f"dcp-hf {what}: done ({details})")


def _style(args) -> str | None:
    return None if args.layout == "auto" else args.layout


def _cmd_experts(args) -> int:
    from dcp_hf.convert import experts
    _init_distributed()
    try:
        info = experts(args.direction, args.src, args.dst, _style(args),
                       max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                       progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"dcp-hf experts: {e}") from None
    _report(f"experts {args.direction}", info)
    return 0


def _cmd_convert(args) -> int:
    from dcp_hf.convert import dcp_to_hf, hf_to_dcp
    from dcp_hf.layouts import detect_layout
    _init_distributed()
    prefixes = [tuple(p.split("=", 1)) for p in args.prefix or []]
    if any(len(p) != 2 for p in prefixes):
        raise SystemExit("dcp-hf convert: --prefix takes MEM=HF, e.g. 'model.='")
    if args.to == "dcp":
        info = hf_to_dcp(args.src, args.dst, style=_style(args), prefixes=prefixes,
                         progress=not args.quiet)
    else:
        layout = None
        if args.layout != "auto":
            from dcp_hf.convert import with_prefixes
            layout = with_prefixes(detect_layout(args.config_from or "", args.layout), prefixes)
        info = dcp_to_hf(args.src, args.dst, layout, config_from=args.config_from, prefixes=prefixes,
                         max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                         progress=not args.quiet)
    _report(f"convert --to {args.to}", info)
    return 0


def _cmd_export(args) -> int:
    import torch

    from dcp_hf.megatron.export import export_torch_dist
    _init_distributed()
    dtype = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        info = export_torch_dist(args.src, args.dst, args.config, family=args.family, exclude=args.exclude or (),
                                 dtype=dtype, max_shard_size=args.max_shard_size,
                                 overwrite=args.overwrite, progress=not args.quiet)
    except (ValueError, OSError) as e:
        raise SystemExit(f"dcp-hf export: {e}") from None
    _report("export --from megatron", info)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcp-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="save a sharded Llama-shaped model as an HF checkpoint in "
                                       "local processes, reload it resharded, verify, print GB/s")
    demo.add_argument("--output", default="demo-output", help="output folder (default: %(default)s)")
    demo.add_argument("--nproc", type=int, default=2, help="processes (default: %(default)s)")
    demo.add_argument("--size", choices=["small", "1b"], default="small",
                      help="small: ~50 MB; 1b: Llama-1B-like, ~2 GB (default: %(default)s)")
    demo.add_argument("--max-shard-size", default="20MB", help="largest file (default: %(default)s)")
    demo.set_defaults(func=_cmd_demo)

    insp = sub.add_parser("inspect", help="list the tensors of a checkpoint from its headers")
    insp.add_argument("path")
    insp.add_argument("-v", "--verbose", action="store_true", help="one line per tensor")
    insp.set_defaults(func=_cmd_inspect)

    layouts = ["auto", "transformers", "mindspeed", "flat"]
    exp = sub.add_parser("experts", help="merge per-expert HF tensors into one tensor per layer, or "
                                          "split them back (streaming; under torchrun, spread over ranks)")
    exp.add_argument("direction", choices=["merge", "split"])
    exp.add_argument("src", help="HF checkpoint folder")
    exp.add_argument("dst", help="output folder (config and tokenizer files are copied)")
    exp.add_argument("--layout", choices=layouts, default="auto",
                     help="merged form; auto: from config.json (default: %(default)s)")
    exp.add_argument("--max-shard-size", default="5GB")
    exp.add_argument("--overwrite", action="store_true", help="replace a checkpoint in DST")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    exp.set_defaults(func=_cmd_experts)

    conv = sub.add_parser("convert", help="HF checkpoint <-> native DCP checkpoint (FileSystemWriter "
                                           "format), through a layout and key prefixes")
    conv.add_argument("--to", choices=["dcp", "hf"], required=True)
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--layout", choices=layouts, default="auto",
                      help="merged-experts form of the DCP side; auto: from config.json")
    conv.add_argument("--prefix", action="append", metavar="MEM=HF",
                      help="DCP keys start with MEM where HF keys start with HF, e.g. 'model.=' "
                           "(repeatable)")
    conv.add_argument("--config-from", help="--to hf: HF folder whose config.json (layout) and "
                                             "tokenizer files go with the output")
    conv.add_argument("--max-shard-size", default="5GB")
    conv.add_argument("--overwrite", action="store_true")
    conv.add_argument("--quiet", action="store_true")
    conv.set_defaults(func=_cmd_convert)

    export = sub.add_parser("export", help="a Megatron torch_dist checkpoint -> HF checkpoint, without "
                                           "building the model (streaming; under torchrun, spread over ranks)")
    export.add_argument("--from", dest="source", choices=["megatron"], required=True)
    export.add_argument("src", help="Megatron torch_dist checkpoint folder (e.g. .../iter_0001000)")
    export.add_argument("dst", help="output folder or s3:// URL")
    export.add_argument("--config", required=True,
                        help="the model's HF config.json, or an HF folder (its tokenizer files are copied); "
                             "its model_type is the family")
    export.add_argument("--family", help="the HF family (llama, mistral, qwen2, qwen3, qwen2_moe, qwen3_moe, "
                                         "mixtral, glm4_moe, deepseek_v2, deepseek_v3); must be the config's "
                                         "model_type (names it where the config does not)")
    export.add_argument("--exclude", action="append", metavar="GLOB",
                        help="Megatron keys to leave out (e.g. 'mtp.*'; repeatable)")
    export.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32"], default="keep",
                        help="floating tensors' dtype in the output (DeepSeek's expert bias stays fp32)")
    export.add_argument("--max-shard-size", default="5GB")
    export.add_argument("--overwrite", action="store_true")
    export.add_argument("--quiet", action="store_true")
    export.set_defaults(func=_cmd_export)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
