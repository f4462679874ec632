"""The dcp-hf command line: HF safetensors checkpoints <-> torch.distributed.checkpoint.

Run a command plainly (one process) or under torchrun to spread the tensors over processes:
  torchrun --nproc-per-node 4 $(which dcp-hf) experts split SRC DST
A mistake ends with a one-line message and exit code 1 (2 for a wrong command line); add
--debug for the Python traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

DOC = __doc__


class UsageError(Exception):
    """Inputs that cannot work, found before anything is read or written (exit code 1)."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every argument's help ends with its default (where it has one); descriptions keep
    their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _CommandParser(argparse.ArgumentParser):
    """A command's parser. argparse hands a command's unknown arguments up to the top-level
    parser, whose error shows ``dcp-hf COMMAND ...`` and not the command's flags: here the
    command reports them, with its own usage, also beside another error (a missing --to)."""

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(args) if args is not None else sys.argv[1:]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error("unrecognized arguments: " + " ".join(extras))
        return namespace, extras

    def error(self, message):
        unknown = self._unknown_flags()
        if unknown and not message.startswith("unrecognized arguments"):
            message = f"unrecognized arguments: {' '.join(unknown)}; and {message}"
        super().error(message)

    def _unknown_flags(self) -> list[str]:
        """The flags given to this command (when it has no subcommands) that it does not know,
        also as an unambiguous prefix of one."""
        if self._subparsers is not None:
            return []
        args = getattr(self, "_given", [])
        args = args[: args.index("--")] if "--" in args else args
        known = self._option_string_actions
        return [
            a
            for a in args
            if a.startswith("-") and len(a) > 1 and not any(o.startswith(a.split("=", 1)[0]) for o in known)
        ]


# The options that get past a library error (its ``fix``), as this command line says them.
_FLAG_ADVICE = {
    "overwrite": "pass --overwrite to replace it",
    "exclude": "leave them out with --exclude PATTERN",
}


def _as_cli_message(error: BaseException) -> str:
    """The error's message, with the fix it names said as the flag that does it."""
    fix = getattr(error, "fix", None)
    if fix is None or fix.option not in _FLAG_ADVICE:
        return str(error)
    return f"{error.reason}; {_FLAG_ADVICE[fix.option]}"


# -- what a path holds ------------------------------------------------------------------------
def checkpoint_kind(path: str) -> str:
    """``hf`` (an HF folder), ``dcp`` (a native DCP folder: ``.metadata``), ``safetensors`` (one
    file), ``missing``, ``file`` (another file), ``url`` (not checked here) or ``other``."""
    if "://" in path:
        return "url"
    if os.path.isfile(path):
        return "safetensors" if path.endswith(".safetensors") else "file"
    if not os.path.isdir(path):
        return "missing"
    names = os.listdir(path)
    if ".metadata" in names:
        return "dcp"
    if any(n.endswith(".safetensors") and not n.startswith(".") for n in names):
        return "hf"
    return "other"


_DESCRIBE = {
    "hf": "is an HF checkpoint (*.safetensors)",
    "dcp": "is a native DCP checkpoint (.metadata, *.distcp)",
    "safetensors": "is a single .safetensors file",
    "missing": "does not exist",
    "file": "is a file, not a checkpoint folder",
    "other": "holds neither *.safetensors files nor a DCP .metadata file",
}
_LABEL = {"hf": "an HF checkpoint", "dcp": "a native DCP checkpoint"}


def require(path: str, what: str, *kinds: str, hint: str = "") -> str:
    """Check that ``path`` is one of ``kinds`` of input, or say what it is and what to do."""
    kind = checkpoint_kind(path)
    if kind != "url" and kind not in kinds:
        raise UsageError(f"{what} {path} {_DESCRIBE[kind]}" + (f"; {hint}" if hint else ""))
    return kind


def require_free(path: str, overwrite: bool, what: str = "DST") -> None:
    """Check, before any work, that a command can write ``path``: not a file, a checkpoint there
    (HF or DCP: either is replaced whole, the folder's other files kept) only with --overwrite,
    and a place the writer can create folders in (:func:`require_writable`)."""
    kind = checkpoint_kind(path)
    if kind in ("hf", "dcp") and not overwrite:
        raise UsageError(
            f"{what} {path} already holds {_LABEL[kind]}; pass --overwrite to replace it, or choose another folder"
        )
    if kind in ("file", "safetensors"):
        raise UsageError(f"{what} {path} {_DESCRIBE[kind]}; give a folder")
    require_writable(path, what)


def require_writable(path: str, what: str) -> None:
    """Check that the writer can make its folders for ``path``: it creates the folder and any
    missing folders above it, and builds the checkpoint in a sibling folder (else inside the
    folder, where the parent is read-only). ``os.access`` cannot tell (root passes it on
    /proc), so a hidden folder is made and removed where the writer would make one."""
    if "://" in path:
        return  # an object store: its credentials are checked by the first request
    from dcp_hf.storage.commit import folder_creation_error, nearest_existing

    real = os.path.realpath(path)
    above = nearest_existing(os.path.dirname(real))
    if not os.path.isdir(above):
        raise UsageError(f"{what} {path}: {above} is a file, not a folder; choose another folder")
    error = None
    for place in [above] + ([real] if os.path.isdir(real) else []):
        failed = folder_creation_error(place)
        if failed is None:
            return
        error = error or f"cannot create a folder in {place} ({failed.strerror})"
    raise UsageError(f"{what} {path}: {error}; choose another folder")


# -- commands ---------------------------------------------------------------------------------
def _cmd_demo(args) -> int:
    from dcp_hf.demo import is_demo_output, run_demo
    from dcp_hf.models import LLAMA_1B_LIKE, LlamaShape

    output = args.output
    if "://" in output:
        raise UsageError(f"--output {output}: the demo writes a local folder (and reads it back to verify)")
    previous = is_demo_output(output)
    require_free(output, True, "--output")  # a file, a place that cannot be written
    if not (args.overwrite or previous) and os.path.isdir(output) and os.listdir(output):
        held = _LABEL.get(checkpoint_kind(output), "files")
        raise UsageError(
            f"--output {output} holds {held} and is not a previous demo's output (see --help); "
            "pass --overwrite to replace it, or choose another folder"
        )
    shape = LLAMA_1B_LIKE if args.size == "1b" else LlamaShape()
    run_demo(
        output, args.nproc, shape, args.max_shard_size, progress=not args.quiet, overwrite=args.overwrite or previous
    )
    return 0


def _cmd_inspect(args) -> int:
    from dcp_hf.inspect import inspect_checkpoint

    reads = "inspect reads an HF checkpoint folder (local or an s3:// URL) or one .safetensors file"
    if checkpoint_kind(args.path) == "file":
        raise UsageError(f"PATH {args.path} is neither a checkpoint folder nor a .safetensors file; {reads}")
    require(args.path, "PATH", "hf", "safetensors", hint=reads)
    print(inspect_checkpoint(args.path, verbose=args.verbose))
    return 0


def _cmd_verify(args) -> int:
    from dcp_hf.verify import MISMATCH, verify_checkpoint

    require(args.path, "PATH", "hf", hint="verify reads an HF checkpoint folder (local or an s3:// URL)")
    reports = verify_checkpoint(args.path)
    for report in reports:
        print(report.line())
    bad = [r for r in reports if r.status == MISMATCH]
    print(
        f"{len(reports)} files: {len(reports) - len(bad)} without a mismatch, {len(bad)} with"
        + ("" if bad else "; the checkpoint reads as it was written")
    )
    return 1 if bad else 0


def _init_distributed() -> None:
    """Join the process group when started by torchrun (WORLD_SIZE set), so the work is spread;
    without it, silence torch's warning that it will run in a single process (it does)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if not dist.is_initialized():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    # A DCP destination is replaced only after --overwrite was checked (require_free).
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")


def _report(what: str, info: dict) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        details = ", ".join(f"{k}: {v}" for k, v in info.items() if v not in ([], None))
        print(f"dcp-hf {what}: done ({details})")


def _style(args) -> str | None:
    return None if args.layout == "auto" else args.layout


def _check_something_to_merge(src: str, style: str | None) -> None:
    """``experts merge`` of a checkpoint with no per-expert tensors would copy it unchanged."""
    from dcp_hf.layouts import detect_layout
    from dcp_hf.storage import HFStorageReader
    from dcp_hf.streaming import hf_specs

    source = hf_specs(HFStorageReader(src))
    rules = detect_layout(src, style).without_renames()
    if rules.rules:
        merged, _ = rules.memory_specs(source)
        if set(merged) == set(source):
            raise UsageError(
                f"SRC {src}: no per-expert tensors to merge "
                f"(layout {rules.name}); is it a dense model, or merged already?"
            )


def _cmd_experts(args) -> int:
    from dcp_hf.convert import experts

    require(args.src, "SRC", "hf", hint="give an HF checkpoint folder")
    require_free(args.dst, args.overwrite)
    _init_distributed()
    if args.direction == "merge":
        _check_something_to_merge(args.src, _style(args))
    info = experts(
        args.direction,
        args.src,
        args.dst,
        _style(args),
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    _report(f"experts {args.direction}", info)
    return 0


def _cmd_convert(args) -> int:
    from dcp_hf.convert import dcp_to_hf, hf_to_dcp
    from dcp_hf.layouts import detect_layout

    prefixes = [tuple(p.split("=", 1)) for p in args.prefix or []]
    if any(len(p) != 2 for p in prefixes):
        raise UsageError("--prefix takes MEM=HF, e.g. --prefix model.=")
    if args.to in ("dcp", "dequantized"):
        require(
            args.src,
            "SRC",
            "hf",
            hint=f"--to {args.to} reads an HF checkpoint"
            + (" (for a DCP source use --to hf)" if checkpoint_kind(args.src) == "dcp" else ""),
        )
    else:
        require(
            args.src,
            "SRC",
            "dcp",
            hint="--to hf reads a native DCP checkpoint"
            + (" (for an HF source use --to dcp)" if checkpoint_kind(args.src) == "hf" else ""),
        )
        if args.config_from is not None:
            require(
                args.config_from,
                "--config-from",
                "hf",
                "other",
                hint="give the HF folder whose config.json and tokenizer go with the output",
            )
    require_free(args.dst, args.overwrite)
    _init_distributed()
    if args.to == "dcp":
        info = hf_to_dcp(args.src, args.dst, style=_style(args), prefixes=prefixes, progress=not args.quiet)
    elif args.to == "dequantized":
        from dcp_hf.convert import dequantize

        info = dequantize(
            args.src,
            args.dst,
            _torch_dtype(args.dtype),
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    else:
        layout = None
        if args.layout != "auto":
            from dcp_hf.convert import with_prefixes

            layout = with_prefixes(detect_layout(args.config_from or "", args.layout), prefixes)
        info = dcp_to_hf(
            args.src,
            args.dst,
            layout,
            config_from=args.config_from,
            prefixes=prefixes,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    _report(f"convert --to {args.to}", info)
    return 0


def _cmd_export(args) -> int:

    from dcp_hf.megatron.export import export_torch_dist

    require(
        args.src,
        "SRC",
        "dcp",
        hint="give a Megatron torch_dist checkpoint folder (e.g. .../iter_0001000, holding .metadata)",
    )
    config = args.config
    if os.path.isdir(config):
        config = os.path.join(config, "config.json")
    if not os.path.isfile(config):
        raise UsageError(f"--config {args.config}: no such config.json or HF folder")
    require_free(args.dst, args.overwrite)
    _init_distributed()
    dtype = _torch_dtype(args.dtype)
    try:
        info = export_torch_dist(
            args.src,
            args.dst,
            args.config,
            family=args.family,
            exclude=args.exclude or (),
            dtype=dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
            assume_config_matches=args.assume_config_matches,
        )
    except KeyError as e:
        raise UsageError(f"--config {config}: has no {e.args[0]!r}; give the model's full HF config.json") from None
    _report("export --from megatron", info)
    return 0


def _cmd_import(args) -> int:
    from dcp_hf.megatron.import_hf import import_hf

    require(args.src, "SRC", "hf", hint="give an HF checkpoint folder (config.json and *.safetensors) or an s3:// URL")
    if checkpoint_kind(args.dst) != "missing":
        raise UsageError(f"DST {args.dst} exists; import writes a new Megatron checkpoint folder")
    require_writable(args.dst, "DST")
    _init_distributed()
    info = import_hf(
        args.src,
        args.dst,
        family=args.family,
        dtype=_torch_dtype(args.dtype),
        iteration=args.iteration,
        progress=not args.quiet,
    )
    _report("import --to megatron", info)
    import torch.distributed as dist

    if dist.is_initialized():  # with the groups Megatron made: left to exit, gloo may abort
        dist.destroy_process_group()
    return 0


# -- argument parser --------------------------------------------------------------------------
def _torch_dtype(name: str):
    """A ``--dtype`` choice as a torch dtype (``keep``: None)."""
    import torch

    return {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _size(text: str) -> str:
    from dcp_hf.format import parse_size

    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _demo_size(shape) -> str:
    import math

    return f"{sum(math.prod(s) for s in shape.tensors().values()) * 2 / 1e6:.1f} MB"


LAYOUTS = ["auto", "transformers", "mindspeed", "flat"]


def _common(parser: argparse.ArgumentParser, *, shard: bool = True) -> None:
    """Options every writing command takes."""
    if shard:
        parser.add_argument(
            "--max-shard-size",
            default="5GB",
            type=_size,
            help="largest output file (5GB = 5*10**9 bytes, as huggingface_hub; also MB, GiB, ...)",
        )
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in the output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _demo_command(command) -> None:
    """``dcp-hf demo``."""
    from dcp_hf.models import LLAMA_1B_LIKE, LlamaShape

    demo = command(
        "demo",
        "save a sharded Llama-shaped model as an HF checkpoint in local "
        "processes, reload it resharded, verify it, print GB/s",
    )
    demo.add_argument(
        "--output",
        default="demo-output",
        help="output folder: new, empty, or a previous demo's output (only config.json, model.safetensors, "
        "model.safetensors.index.json and model-NNNNN-of-NNNNN.safetensors files, config.json as a demo "
        "of either --size writes it), which is replaced; anything else needs --overwrite",
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --output folder that holds other files: a checkpoint there (HF or native DCP) "
        "is replaced whole, other files stay",
    )
    demo.add_argument("--nproc", type=_positive_int, default=2, help="local processes (gloo)")
    demo.add_argument(
        "--size",
        choices=["small", "1b"],
        default="small",
        help=f"small: {_demo_size(LlamaShape())} bf16; 1b: Llama-1B-like, {_demo_size(LLAMA_1B_LIKE)} bf16",
    )
    demo.add_argument("--max-shard-size", default="20MB", type=_size, help="largest output file")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)


def _inspect_command(command) -> None:
    """``dcp-hf inspect``."""
    insp = command("inspect", "list the tensors of an HF checkpoint from its headers")
    insp.add_argument(
        "path",
        metavar="PATH",
        help="HF checkpoint folder, its s3:// URL (credentials from the standard AWS chain: AWS_ENDPOINT_URL, "
        "environment, profile; needs dcp-hf[s3]), or one .safetensors file",
    )
    insp.add_argument("-v", "--verbose", action="store_true", help="one line per tensor")
    insp.set_defaults(func=_cmd_inspect)


def _verify_command(command) -> None:
    """``dcp-hf verify``."""
    ver = command(
        "verify",
        "read every file of an HF checkpoint and check it against the block digests its save recorded "
        "and, for a Hugging Face Hub download, the sha256 the hub recorded; exit code 1 on a mismatch",
    )
    ver.add_argument(
        "path",
        metavar="PATH",
        help="HF checkpoint folder (a hub cache snapshot folder included) or its s3:// URL (credentials from "
        "the standard AWS chain: AWS_ENDPOINT_URL, environment, profile; needs dcp-hf[s3])",
    )
    ver.set_defaults(func=_cmd_verify)


def _experts_command(command) -> None:
    """``dcp-hf experts``."""
    exp = command(
        "experts",
        "merge per-expert HF tensors into one tensor per layer, or split "
        "them back (streaming; under torchrun, spread over processes)",
    )
    directions = exp.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    for direction, what in (
        ("merge", "per-expert HF tensors -> one merged tensor per layer and projection"),
        ("split", "merged expert tensors -> per-expert HF tensors (the merged form is read off the tensors' shapes)"),
    ):
        d = command(direction, what, on=directions)
        d.add_argument("src", metavar="SRC", help="HF checkpoint folder")
        d.add_argument("dst", metavar="DST", help="output folder (config and tokenizer files are copied)")
        d.add_argument(
            "--layout",
            choices=LAYOUTS,
            default="auto",
            help="merged form; auto: from SRC's config.json"
            + (" or the tensors' shapes" if direction == "split" else ""),
        )
        _common(d)
        d.set_defaults(func=_cmd_experts)


def _convert_command(command) -> None:
    """``dcp-hf convert``."""
    conv = command(
        "convert",
        "HF checkpoint <-> native DCP checkpoint (FileSystemWriter format), through a layout and key prefixes",
    )
    conv.add_argument(
        "--to",
        choices=["dcp", "hf", "dequantized"],
        required=True,
        help="dcp: SRC is an HF folder; hf: SRC is a native DCP folder; dequantized: "
        "SRC is a quantized HF release (FP8 block-scaled, MXFP4), written "
        "dequantized as a plain HF checkpoint in --dtype",
    )
    conv.add_argument("src", metavar="SRC", help="checkpoint folder to read")
    conv.add_argument("dst", metavar="DST", help="output folder")
    conv.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="merged-experts form of the DCP side; auto: from config.json and the tensors' shapes",
    )
    conv.add_argument(
        "--prefix",
        action="append",
        metavar="MEM=HF",
        help="DCP keys start with MEM where HF keys start with HF, e.g. 'model.=' (repeatable)",
    )
    conv.add_argument(
        "--config-from",
        metavar="HF_DIR",
        help="optional, --to hf: HF folder whose config.json (and the layout it "
        "implies), tokenizer and generation files go with the output; without "
        "it the output has weights only",
    )
    conv.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="--to dequantized: the dtype of the dequantized weights",
    )
    _common(conv)
    conv.set_defaults(func=_cmd_convert)


def _export_command(command) -> None:
    """``dcp-hf export``."""
    export = command(
        "export",
        "a Megatron torch_dist checkpoint -> HF checkpoint, without building "
        "the model (streaming; under torchrun, spread over processes)",
    )
    export.add_argument("--from", dest="source", choices=["megatron"], required=True, help="the source's format")
    export.add_argument("src", metavar="SRC", help="Megatron torch_dist checkpoint folder (e.g. .../iter_0001000)")
    export.add_argument("dst", metavar="DST", help="output folder or s3:// URL")
    export.add_argument(
        "--config",
        required=True,
        metavar="HF_CONFIG",
        help="the model's HF config.json, or an HF folder (its tokenizer files are copied too)",
    )
    export.add_argument(
        "--family",
        help="optional: the HF family (llama, mistral, qwen2, qwen3, "
        "qwen2_moe, qwen3_moe, mixtral, glm4_moe, deepseek_v2, "
        "deepseek_v3); must be the config's model_type (names it "
        "where the config does not)",
    )
    export.add_argument(
        "--exclude", action="append", metavar="GLOB", help="Megatron keys to leave out, e.g. 'mtp.*' (repeatable)"
    )
    export.add_argument(
        "--dtype",
        choices=["keep", "bf16", "fp16", "fp32"],
        default="keep",
        help="floating tensors' dtype in the output (DeepSeek's expert bias stays fp32)",
    )
    export.add_argument(
        "--assume-config-matches",
        action="store_true",
        help="for a checkpoint without training arguments (common.pt 'args', as Megatron-LM writes "
        "them): vouch that --config states the settings it was trained with (without them the "
        "export is refused; with them they are checked against --config)",
    )
    _common(export)
    export.set_defaults(func=_cmd_export)


def _import_command(command) -> None:
    """``dcp-hf import``."""
    imp = command(
        "import",
        "an HF checkpoint -> Megatron torch_dist checkpoint (what dist_checkpointing.save writes, "
        "loadable at any TP/PP/EP), without building the model (streaming; under torchrun, "
        "spread over processes)",
    )
    imp.add_argument("--to", dest="target", choices=["megatron"], required=True, help="the output's format")
    imp.add_argument("src", metavar="HF_DIR", help="HF checkpoint folder or s3:// URL, with its config.json")
    imp.add_argument(
        "dst",
        metavar="CKPT_DIR",
        help="new folder for Megatron-LM's --load: latest_checkpointed_iteration.txt and iter_XXXXXXX/",
    )
    imp.add_argument(
        "--family", help="optional: the HF family; must be config.json's model_type (names it where it does not)"
    )
    imp.add_argument(
        "--dtype",
        choices=["keep", "bf16", "fp16", "fp32"],
        default="keep",
        help="the parameters' dtype (keep: config.json's; Megatron's fp32 tensors stay fp32; "
        "FP8/MXFP4 releases are dequantized to it)",
    )
    imp.add_argument(
        "--iteration", type=int, default=1, help="the iteration folder (Megatron-LM loads iterations above 0)"
    )
    imp.add_argument("--quiet", action="store_true", help="no progress bars")
    imp.set_defaults(func=_cmd_import)


def build_parser() -> argparse.ArgumentParser:
    import dcp_hf

    parser = argparse.ArgumentParser(prog="dcp-hf", description=DOC, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"dcp-hf {dcp_hf.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    debug = argparse.ArgumentParser(add_help=False)  # also after the command, not resetting it
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the Python traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)

    def command(name: str, help: str, description: str | None = None, on=sub):
        return on.add_parser(
            name, help=help, description=description or help, formatter_class=_Formatter, parents=[debug]
        )

    for add in (
        _demo_command,
        _inspect_command,
        _verify_command,
        _experts_command,
        _convert_command,
        _export_command,
        _import_command,
    ):
        add(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:  # import-time notices of optional accelerators (Transformer Engine, Apex)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    where = f"dcp-hf {args.command}" + (f" {args.direction}" if getattr(args, "direction", None) else "")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - every error becomes one message (or --debug)
        if args.debug or isinstance(e, SystemExit):
            raise
        from dcp_hf.errors import DcpHfError, root_cause

        cause = root_cause(e)
        from dcp_hf.extras import MissingExtraError

        if isinstance(cause, OSError) and cause.filename and cause.strerror:
            message = f"{cause.filename}: {cause.strerror}"
        elif isinstance(cause, (UsageError, DcpHfError, MissingExtraError, OSError, ValueError)):
            message = _as_cli_message(cause)
        else:
            message = f"unexpected {type(cause).__name__}: {cause} (a bug: rerun with --debug and report the traceback)"
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the same story
            print(f"{where}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
