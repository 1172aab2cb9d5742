"""The ``awq-ao`` subcommands: quantize, eval, generate, convert, info (one ``cmd_*`` each)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from awq_ao.cli.inputs import (
    DEFAULT_DATASET,
    CLIError,
    Phases,
    TokenizerFiles,
    check_device,
    eval_text,
    has_chat_template,
    human,
    is_quantized_dir,
    library_progress,
    linear_shapes,
    load_source_model,
    load_tokenizer,
    log_line,
    marlin_warning,
    precheck_chat_template,
    precheck_format,
    read_calibration_rows,
    resolve_dir,
    torch_dtype,
)

# ------------------------------------------------------------------------------------------------
# subcommands
# ------------------------------------------------------------------------------------------------


def cmd_quantize(args: argparse.Namespace) -> int:
    """``awq-ao quantize``."""
    import torch

    import awq_ao
    from awq_ao.calibration import CalibrationDataError, token_blocks
    from awq_ao.checkpoint import save_quantized
    from awq_ao.checkpoint.atomic_dir import check_output_dir
    from awq_ao.progress import CostModel, run_progress

    # every argument is checked before the (slow) model load
    if args.sequential and args.in_memory:
        raise CLIError("--sequential and --in-memory exclude each other: pick one (or neither: automatic).")
    if args.spill_dir and args.in_memory:
        raise CLIError("--spill-dir needs layer-by-layer convert: drop --in-memory.")
    if args.head == "int8" and args.format != "awq_ao":
        raise CLIError(f"--head int8 stores a tensor --format {args.format} cannot hold; use --format awq_ao or --head keep.")
    if args.fallback == "multiply" and args.format != "awq_ao":
        raise CLIError(
            f"--fallback multiply adds input scales that --format {args.format} cannot hold; "
            "use --fallback skip or --format awq_ao."
        )
    calib = args.calib if args.calib is not None else DEFAULT_DATASET
    calib_is_path = Path(calib).expanduser().exists()
    if args.calib_split is not None and calib_is_path:
        raise CLIError(f"--calib-split picks the split of a hub dataset; {calib} is a local path (drop --calib-split).")
    check_device(args.device)
    source = Path(args.model).expanduser()
    source = source.parent if source.is_file() else source
    check_output_dir(args.out, args.overwrite, [source] if source.is_dir() else [])
    if args.chat_template:
        precheck_chat_template(args.model)
    dtype = torch_dtype(args.dtype, args.device)
    phases = Phases(args)
    log_line(args, f"reading calibration data {calib} ...")
    rows = read_calibration_rows(calib, args.text_field, args.calib_split)  # fails fast on bad data
    read_s = phases.lap()  # part of the "calibration data" phase, logged once tokenized

    log_line(args, f"loading {args.model} ({str(dtype).removeprefix('torch.')}) ...")
    library_progress(args)
    model, tok = load_source_model(args.model, dtype, args.allow_download, args.gguf_file)
    # layer-by-layer: the model stays on the CPU and each block visits the device in turn
    home = "cpu" if args.sequential else args.device
    model.to(home)
    phases.done("loading", f"{type(model).__name__} on {home}")
    precheck_format(model, args.format, args.bits, args.group_size)
    if args.chat_template and not has_chat_template(tok):
        raise CLIError(f"--chat-template: the tokenizer of {args.model} has no chat template; drop --chat-template.")

    phases.lap()
    try:
        blocks = token_blocks(tok, rows, args.n_samples, args.seq_len, chat_template=args.chat_template)
    except CalibrationDataError as e:
        raise CLIError(str(e)) from e
    label = Path(calib).name if calib_is_path else calib + (f" (split {args.calib_split})" if args.calib_split else "")
    phases.done("calibration data", f"{blocks.shape[0]} x {blocks.shape[1]} tokens from {label}"
                + (" through the chat template" if args.chat_template else ""), extra=read_s)
    marlin_warning([(n, o, k, args.bits, args.group_size) for n, o, k in linear_shapes(model)], args.format)

    fallback = args.fallback or ("multiply" if args.format == "awq_ao" else "skip")
    batches = [blocks[i : i + args.batch_size].to(home) for i in range(0, blocks.shape[0], args.batch_size)]
    if args.sequential:
        layerwise = dict(sequential=True, device=None if args.device == "cpu" else args.device, spill_dir=args.spill_dir)
    elif args.in_memory:
        layerwise = dict(sequential=False)
    else:  # automatic: layer by layer where one block stack holds the linears, blocks stay where the model is
        layerwise = dict(spill_dir=args.spill_dir)
    with run_progress(not args.no_progress) as (run, _owned):  # one bar: calibration .. saving
        run.plan("save", sum(CostModel(None).save(o, k) for _, o, k in linear_shapes(model)))
        with torch.no_grad():
            report = awq_ao.quantize(
                model,
                batches,
                bits=args.bits,
                group_size=args.group_size,
                zero_point=not args.no_zero_point,
                fallback=fallback,
                max_search_samples=args.search_samples,
                max_gram_samples=args.gram_samples,
                rounding=args.rounding,
                head=args.head,
                **{k: v for k, v in (("search_loss", args.search_loss), ("search_rounding", args.search_rounding),
                                               ("gptq_act_order", args.act_order), ("channel_stats", args.channel_stats),
                                               ("block_refine_steps", args.refine_steps)) if v is not None},
                **({} if args.screen_rows is None else {"screen_rows": args.screen_rows or None}),
                progress=not args.no_progress,
                verbose=False,
                **layerwise,
            )
        phases.done("quantization", f"{len(report.quantized)} linears quantized")
        if not args.quiet:
            run.write(report.summary(), sys.stdout)
        card = {
            "calibration": label,
            "calibration samples": f"{args.n_samples} x {args.seq_len} tokens",
            "chat template": "yes" if args.chat_template else "no",
        }
        out = save_quantized(
            model, args.out, tokenizer=tok, format=args.format, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size, progress=not args.no_progress, dtype=args.save_dtype,
            model_card=card,
        )
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        phases.done("saving", f"{args.format}, {human(size)}")
    print(f"saved {args.format} checkpoint to {out} ({human(size)}) in {time.perf_counter() - phases.start:.1f}s")
    phases.total()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``awq-ao eval``: perplexity of a saved quantized model, or of an unquantized one (the
    full-precision baseline)."""
    import torch

    from awq_ao.checkpoint import load_quantized
    from awq_ao.evaluation import leading_bos, perplexity, text_ids

    text_path = Path(args.text).expanduser()
    if not text_path.is_file():
        raise CLIError(f"text file {text_path} does not exist.")
    check_device(args.device)
    t0 = time.perf_counter()
    p = Path(args.dir).expanduser()
    if not p.exists():
        p = resolve_dir(args.dir)  # a hub id, through the Hugging Face cache
    if p.is_dir() and is_quantized_dir(p):
        dtype = None if args.dtype is None else torch_dtype(args.dtype, args.device)
        tok = load_tokenizer(args.tokenizer or p)
        model = load_quantized(p, device=args.device, dtype=dtype, progress=not args.no_progress, verify=args.verify)
        kind = None
    else:  # no quantization_config: the full-precision baseline
        if args.verify:
            raise CLIError(f"--verify checks a quantized checkpoint's checksums; {args.dir} is not quantized.")
        dtype = torch_dtype(args.dtype or "auto", args.device)
        library_progress(args)
        has_weights = p.is_dir() and any(any(p.glob(g)) for g in ("*.safetensors", "*.bin", "*.gguf"))
        # a hub id whose cached snapshot holds other weight files: let transformers resolve it
        source = str(p) if has_weights or Path(args.dir).expanduser().exists() else args.dir
        model, tok = load_source_model(source, dtype)
        model.to(args.device)
        if args.tokenizer:
            tok = load_tokenizer(args.tokenizer)
        kind = f"model: unquantized ({str(dtype).removeprefix('torch.')}, full precision): baseline perplexity"
    log_line(args, f"loaded {args.dir} in {time.perf_counter() - t0:.1f}s")
    text = eval_text(text_path, args.text_format)
    bos = leading_bos(tok)  # Gemma/Llama: every window starts with <bos>, as the benchmarks' do
    ids = text_ids(tok, text, bos)
    with torch.no_grad():
        try:
            ppl, n = perplexity(model, ids, seq_len=args.seq_len, max_windows=args.windows,
                                progress=not args.no_progress, bos_token_id=bos)
        except ValueError as e:
            raise CLIError(str(e)) from e
    if kind:
        print(kind)
    print(f"windows: {n} x {args.seq_len} tokens ({ids.numel()} tokens in text)")
    print(f"perplexity: {ppl:.4f}")
    return 0


def _generate_once(model: Any, tok: Any, enc: Any, args: argparse.Namespace) -> str:
    """The new text ``model.generate`` writes after the encoded prompt."""
    import torch

    ids = enc["input_ids"].to(model.device)
    mask = enc.get("attention_mask")
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    if mask is not None:
        kwargs["attention_mask"] = mask.to(model.device)
    if args.sample:
        if args.temperature is not None:
            kwargs["temperature"] = args.temperature
        if args.top_p is not None:
            kwargs["top_p"] = args.top_p
        if args.seed is not None:
            torch.manual_seed(args.seed)
    else:  # greedy: no sampling settings from generation_config
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if tok.pad_token_id is not None:
        kwargs["pad_token_id"] = tok.pad_token_id
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def cmd_generate(args: argparse.Namespace) -> int:
    """``awq-ao generate``: text from a quantized checkpoint (one prompt, or a chat on stdin)."""
    from awq_ao.checkpoint import load_quantized

    if args.prompt is None and not args.chat:
        raise CLIError("pass --prompt TEXT, or --chat for an interactive chat reading lines from stdin.")
    if not args.sample:
        given = [f for f, v in (("--temperature", args.temperature), ("--top-p", args.top_p), ("--seed", args.seed)) if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)} need --sample (the default is greedy decoding).")
    check_device(args.device)
    dtype = None if args.dtype is None else torch_dtype(args.dtype, args.device)
    t0 = time.perf_counter()
    path = resolve_dir(args.dir)
    if not is_quantized_dir(path):
        raise CLIError(f"{args.dir} has no quantization_config; awq-ao generate runs quantized checkpoints.")
    tok = load_tokenizer(args.tokenizer or path)
    if args.chat and not has_chat_template(tok):
        raise CLIError(f"--chat: the tokenizer of {args.tokenizer or args.dir} has no chat template; drop --chat.")
    model = load_quantized(path, device=args.device, dtype=dtype, progress=not args.no_progress)
    log_line(args, f"loaded {args.dir} in {time.perf_counter() - t0:.1f}s")

    def chat_turn(messages: list[dict[str, str]]) -> str:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return _generate_once(model, tok, enc, args)

    if not args.chat:
        print(_generate_once(model, tok, tok(args.prompt, return_tensors="pt"), args), flush=True)
        return 0
    if args.prompt is not None:
        print(chat_turn([{"role": "user", "content": args.prompt}]), flush=True)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        log_line(args, "chat: type a message and press Enter; Ctrl-D ends")
    messages: list[dict[str, str]] = []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = chat_turn(messages)
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """``awq-ao convert``: re-save a quantized checkpoint in another format (no re-quantizing)."""
    from awq_ao.checkpoint import checkpoint_summary, load_quantized, save_quantized
    from awq_ao.checkpoint.atomic_dir import check_output_dir
    from awq_ao.checkpoint.formats import find_quantized_layers

    phases = Phases(args)
    src = resolve_dir(args.dir)
    if not is_quantized_dir(src):
        raise CLIError(f"{args.dir} has no quantization_config; quantize it with awq-ao quantize.")
    src_fmt = checkpoint_summary(src)["format"]
    check_output_dir(args.out, args.overwrite, [src])
    tok = TokenizerFiles(src)
    if not tok.files:
        log_line(args, f"note: {args.dir} has no tokenizer files; the converted checkpoint has none either")
    log_line(args, f"loading {args.dir} ({src_fmt}) ...")
    model = load_quantized(src, device="cpu", progress=not args.no_progress)
    phases.done("loading", f"{src_fmt}, {len(find_quantized_layers(model))} quantized layers")
    layers = find_quantized_layers(model)
    marlin_warning([(n, q.out_features, q.in_features, q.weight.bits, q.weight.group_size) for n, q in layers.items()],
                    args.format)
    out = save_quantized(
        model, args.out, tokenizer=tok if tok.files else None, format=args.format, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size, progress=not args.no_progress, dtype=args.save_dtype,
        model_card={"converted from": f"{src.name} ({src_fmt} format)"},
    )
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    phases.done("saving", f"{args.format}, {human(size)}")
    print(f"converted {src_fmt} -> {args.format}: saved to {out} ({human(size)})")
    phases.total()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``awq-ao info``: describe a checkpoint without loading its weights."""
    from awq_ao.checkpoint import checkpoint_summary

    s = checkpoint_summary(args.dir)
    if args.verify:
        from awq_ao.checkpoint.validate import verify_checkpoint

        v = verify_checkpoint(args.dir)  # raises (exit 1, one line) on any mismatch
        s["verified"] = {"shards": v["shards"], "bytes": v["bytes"], "seconds": round(v["seconds"], 3)}
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    gs = s.get("group_size")
    print(f"path:           {s['path']}")
    print(f"format:         {s['format']}" + (f" (version {s['format_version']})" if s.get("format_version") else ""))
    print(f"architecture:   {s['architecture']}  dtype: {s.get('dtype')}")
    print(f"bits:           {s.get('bits')}")
    print(f"group size:     {gs if gs != -1 else 'per channel'}")
    print(f"zero point:     {'asymmetric' if s.get('zero_point') else 'symmetric'}")
    print(f"quantized:      {s['num_quantized_layers']} layers"
          + (f", {len(s['scaled_input_layers'])} with an input scale (ScaledInputLinear)" if s.get("scaled_input_layers") else ""))
    if s.get("quantized_experts"):
        print(f"MoE experts:    {s['num_quantized_experts']} INT4 expert weights (3-D, one slab per expert)")
    if s.get("int8_weights"):
        print(f"8-bit head:     {', '.join(s['int8_weights'])} ({human(s['int8_bytes'])}, int8 codes + one scale per row)")
    if s.get("float_linears"):
        print(f"full precision: {', '.join(s['float_linears'][:8])}" + (" ..." if len(s["float_linears"]) > 8 else ""))
    if s.get("module_overrides"):
        print(f"overrides:      {len(s['module_overrides'])} layers with their own bits/group size")
    if s.get("bits_per_weight"):
        print(f"footprint:      {s['bits_per_weight']:.2f} bits per quantized weight ({human(s['quantized_bytes'])} "
              f"for {s['quantized_weights'] / 1e6:.1f} M weights, codes + scales + zeros); "
              f"{human(s['full_precision_bytes'])} in full precision (embeddings, norms, head, biases)")
    print(f"size on disk:   {human(s['size_bytes'])} ({s['size_bytes']} bytes; tensors {s['tensor_bytes']} bytes in {len(s['shards'])} shard(s))")
    if s.get("verified"):
        v = s["verified"]
        print(f"verified:       {v['shards']} shard(s), {human(v['bytes'])}: sha256, headers and "
              f"quantization fields match what was saved ({v['seconds']:.2f}s)")
    if args.layers:
        scaled = set(s.get("scaled_input_layers") or [])
        for n in s["quantized_layers"]:
            print(f"  {n}" + ("  [input_scale]" if n in scaled else ""))
        for n in s.get("quantized_experts") or []:
            print(f"  {n}  [experts]")
    return 0
