"""The ``awq-ao`` argument parser and entry point."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from awq_ao.cli.commands import cmd_convert, cmd_eval, cmd_generate, cmd_info, cmd_quantize
from awq_ao.cli.inputs import (
    DEFAULT_DATASET,
    bits_type,
    float_type,
    int_type,
    size_type,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``awq-ao`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on failure")
    common.add_argument("--quiet", "-q", action="store_true", help="print less")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = argparse.ArgumentParser(
        prog="awq-ao",
        description="AWQ 4-bit weight quantization for PyTorch / torchao: quantize, evaluate, generate, convert, inspect.",
        epilog="Run 'awq-ao COMMAND --help' for the options of each command.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    q = sub.add_parser("quantize", parents=[common], help="quantize a model with AWQ and save it",
                       description="Quantize a causal LM with AWQ and save it as a checkpoint directory.")
    q.add_argument("model", metavar="MODEL", help="local model dir, dir/file with a .gguf, or a Hub id (with --allow-download)")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory")
    q.add_argument("--bits", type=bits_type, default=4, help="weight bits, 2..8 (default 4)")
    q.add_argument("--group-size", type=int_type(1, "an integer >= 1, or -1 for per channel", also=(-1,)), default=128,
                   help="group size along in_features, -1 = per channel (default 128)")
    q.add_argument("--no-zero-point", action="store_true", help="symmetric quantization")
    q.add_argument("--calib", metavar="PATH|DATASET",
                   help="calibration data: a text file, .jsonl/.json/.parquet/.csv, a folder of them, a datasets "
                        "save_to_disk folder, or a hub dataset name ('name' or 'name:config', through the datasets "
                        "cache). Default: the hub dataset "
                        f"{DEFAULT_DATASET} (validation split; offline, pass a local file)")
    q.add_argument("--calib-split", default=None, metavar="SPLIT",
                   help="split of a hub --calib dataset (default: train; validation for the default dataset)")
    q.add_argument("--text-field", default="text", help="dataset column holding the text (default 'text'; a 'messages' column of chat turns is used when there is none)")
    q.add_argument("--chat-template", action="store_true",
                   help="put each calibration row through the tokenizer's chat template (instruct models)")
    q.add_argument("--n-samples", type=int_type(1, "an integer >= 1"), default=64, help="calibration sequences (default 64)")
    q.add_argument("--seq-len", type=int_type(1, "an integer >= 1 (tokens)"), default=512, help="calibration sequence length (default 512)")
    q.add_argument("--search-samples", type=int_type(1, "an integer >= 1"), default=16, help="calibration sequences every candidate scale is scored on (default 16)")
    q.add_argument("--gram-samples", type=int_type(1, "an integer >= 1"), default=64, help="calibration sequences kept for the clipping and rounding Grams (default 64)")
    q.add_argument("--screen-rows", type=int_type(0, "an integer >= 0 (0: every candidate on every sequence)"), default=None,
                   help="score the candidate scales by successive halving, starting on this many of the search "
                        "sequences; 0 scores every candidate on every one (default: the library's; see docs/options.md)")
    q.add_argument("--rounding", choices=["nearest", "gptq"], default="gptq",
                   help="codes on the AWQ grid: gptq error feedback (default) or round to nearest (plain AWQ)")
    q.add_argument("--search-loss", choices=["module", "linear", "attention"], default=None,
                   help="what candidate scales are scored on (default: the library's; see docs/options.md)")
    q.add_argument("--search-rounding", choices=["auto", "nearest", "gptq"], default=None,
                   help="how candidate scales' weights are rounded when scored (default: the library's, auto = as --rounding)")
    q.add_argument("--channel-stats", choices=["calibration", "sample"], default=None,
                   help="where the scales' mean |x| comes from: every calibration batch (calibration) or the search "
                        "sample, which skips the calibration forward (sample); default: the library's")
    q.add_argument("--refine-steps", type=int_type(0, "an integer >= 0 (0: off)"), default=None,
                   help="layer by layer: tune each quantized block's codes and scales on its output against the "
                        "float model's, this many steps (default 0: off; see docs/options.md)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq rounding: columns in order of decreasing input energy (default: the library's)")
    q.add_argument("--sequential", action="store_true",
                   help="force layer-by-layer convert with the model kept on the CPU (with --device cuda each block visits the GPU). "
                        "Default: layer by layer wherever one stack of repeated blocks holds the linears, with the model on --device")
    q.add_argument("--in-memory", action="store_true",
                   help="search the whole model at once instead of layer by layer")
    q.add_argument("--spill-dir", default=None, metavar="DIR",
                   help="layer-by-layer convert: keep the full-precision originals (for rollback) in a temporary folder here instead of in memory")
    q.add_argument("--batch-size", type=int_type(1, "an integer >= 1"), default=8, help="calibration batch size (default 8)")
    q.add_argument("--device", default="cpu", help="device for quantization (cpu, cuda, cuda:1, ...)")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="model dtype: auto (float32 on CPU, float16 on GPU), float32, bfloat16, float16")
    q.add_argument("--format", default="awq_ao", choices=["awq_ao", "autoawq", "compressed-tensors"], help="checkpoint format (default awq_ao)")
    q.add_argument("--head", choices=["keep", "int8"], default="keep",
                   help="int8: store the output head (and a tied embedding) in 8 bits; --format awq_ao only (default keep)")
    q.add_argument("--fallback", choices=["multiply", "skip"], default=None,
                   help="where AWQ scales cannot be folded: explicit input multiply (awq_ao format only) or skip scaling; default: multiply for awq_ao, skip otherwise")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory (only one awq_ao saved, or an empty one)")
    q.add_argument("--max-shard-size", type=size_type, default="2GB", help="largest safetensors shard (default 2GB)")
    q.add_argument("--save-dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="dtype of the unquantized tensors in the checkpoint (default auto: the model's for "
                        "awq_ao, float16 for autoawq / compressed-tensors)")
    q.add_argument("--gguf-file", default=None, help="which .gguf file to load when MODEL has several")
    q.add_argument("--allow-download", action="store_true", help="allow downloading MODEL from the Hugging Face Hub")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", parents=[common], help="perplexity of a saved model (quantized, or the full-precision baseline)",
                       description="Perplexity (exp mean NLL over non-overlapping windows) of a saved model in any supported format. The last line is 'perplexity: <value>'.")
    e.add_argument("dir", metavar="DIR", help="checkpoint directory (awq_ao, autoawq or compressed-tensors) or hub id; "
                   "a model without quantization_config (folder, .gguf, cached hub id) is evaluated in full precision as the baseline")
    e.add_argument("--text", required=True, metavar="FILE", help="evaluation text file")
    e.add_argument("--text-format", choices=["auto", "raw", "wikitext"], default="auto",
                   help="wikitext: rows joined with blank lines as in the AWQ paper (auto: for wiki*.raw files)")
    e.add_argument("--windows", type=int_type(1, "an integer >= 1"), default=None, metavar="N", help="evaluate at most N windows")
    e.add_argument("--seq-len", type=int_type(2, "an integer >= 2 (a window predicts its tokens after the first)"), default=2048, metavar="L", help="window length (default 2048)")
    e.add_argument("--device", default="cpu", help="device (default cpu)")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="override the checkpoint dtype (float32, bfloat16, float16; unquantized default: float32 on CPU, float16 on GPU)")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory if DIR has none")
    e.add_argument("--verify", action="store_true", help="check every shard's sha256 against the checksums saved with DIR before loading")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", parents=[common], help="generate text with a quantized checkpoint (or chat)",
                       description="Generate text with a quantized checkpoint. Only the new text goes to stdout; "
                                   "log lines go to stderr. With --chat and no --prompt: an interactive chat that "
                                   "reads one message per line from stdin until EOF, keeping the conversation.")
    g.add_argument("dir", metavar="DIR", help="checkpoint directory or hub id (through the Hugging Face cache)")
    g.add_argument("--prompt", default=None, metavar="TEXT", help="the prompt (with --chat: the user message)")
    g.add_argument("--max-new-tokens", type=int_type(1, "an integer >= 1"), default=64, metavar="N", help="tokens to generate (default 64)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template; without --prompt, chat on stdin")
    g.add_argument("--device", default="cpu", help="device (default cpu)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="override the checkpoint dtype")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory if DIR has none")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (the default)")
    g.add_argument("--temperature", type=float_type(0.0, None, "a number > 0"), default=None, metavar="T", help="sampling temperature (with --sample)")
    g.add_argument("--top-p", type=float_type(0.0, 1.0, "a number in (0, 1]"), default=None, metavar="P", help="nucleus sampling threshold (with --sample)")
    g.add_argument("--seed", type=int_type(0, "an integer >= 0"), default=None, metavar="S", help="random seed (with --sample)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", parents=[common], help="re-save a quantized checkpoint in another format",
                       description="Re-save a quantized checkpoint in another format without re-quantizing: the "
                                   "codes, scales and zeros are carried over; tokenizer files are copied as they are.")
    c.add_argument("dir", metavar="DIR", help="quantized checkpoint directory or hub id")
    c.add_argument("--format", required=True, choices=["awq_ao", "autoawq", "compressed-tensors"], help="target format")
    c.add_argument("--out", required=True, metavar="OUT", help="output directory")
    c.add_argument("--save-dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="dtype of the unquantized tensors (default auto: as loaded for awq_ao, float16 for autoawq / compressed-tensors)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory (only one awq_ao saved, or an empty one)")
    c.add_argument("--max-shard-size", type=size_type, default="2GB", help="largest safetensors shard (default 2GB)")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", parents=[common], help="describe a checkpoint (no weights loaded)",
                       description="Format, layers, bits, group size and size on disk of a checkpoint.")
    i.add_argument("dir", metavar="DIR", help="checkpoint directory")
    i.add_argument("--layers", action="store_true", help="list every quantized layer")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--verify", action="store_true",
                   help="check every shard's sha256, the headers and the quantization fields against what was saved (awq_ao_manifest.json); exit 1 on a mismatch")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``awq-ao`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.simplefilter("ignore")
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("awq-ao: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, no traceback, unless --debug
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"awq-ao: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
