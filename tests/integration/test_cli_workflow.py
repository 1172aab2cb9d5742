"""The awq-ao workflow commands end to end on tiny models: generate (and chat), convert between
formats, eval of the unquantized baseline, calibration sources (hub names offline, chat
template) and the phase lines of quantize."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from checkpoint_helpers import SAMPLE_TEXT, char_tokenizer, logits, quantized, tied_llama
from tiny_models import tiny_model
from torch import nn

import awq_ao
from awq_ao.checkpoint import load_quantized, save_quantized
from awq_ao.cli import commands as cli_commands
from awq_ao.cli import inputs as cli_inputs
from awq_ao.cli import main
from awq_ao.evaluation import perplexity
from awq_ao.lowering import quantize_linear_module

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def run(argv: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, msg: str) -> None:
    assert rc == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("awq-ao: error: ") and msg in last, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def qdir(tmp_path_factory) -> Path:
    """An awq_ao checkpoint of the tiny tied Llama, with a chat-template tokenizer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_quantized(quantized("tied_llama"), tmp_path_factory.mktemp("q") / "q", tokenizer=chat_tokenizer())


def _greedy(model: nn.Module, tok, enc, n: int) -> str:
    with torch.no_grad():
        out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------


def test_generate_greedy_matches_model_generate(qdir, capsys):
    model, tok = load_quantized(qdir), transformers.AutoTokenizer.from_pretrained(str(qdir))
    want = _greedy(model, tok, tok("The quick", return_tensors="pt"), 12)
    rc, out, err = run(["generate", qdir, "--prompt", "The quick", "--max-new-tokens", 12, "--no-progress"], capsys)
    assert rc == 0, err
    assert out == want + "\n"  # only the new text on stdout; the log line went to stderr
    assert "loaded" in err

    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    rc, out, err = run(["generate", qdir, "--prompt", "hi", "--chat", "--max-new-tokens", 6, "-q", "--no-progress"], capsys)
    assert rc == 0, err
    assert out == _greedy(model, tok, chat, 6) + "\n" and err == ""

    # sampling: the seed makes it repeatable
    # (--no-progress: the loading bar on stderr draws intermediate states only when loading is slow)
    argv = ["generate", qdir, "--prompt", "The", "--sample", "--temperature", 0.8, "--top-p", 0.9, "--seed", 3, "-q",
            "--no-progress"]
    first = run(argv, capsys)
    assert first[0] == 0 and run(argv, capsys) == first


def test_generate_interactive_chat_keeps_history(qdir, capsys, monkeypatch):
    model, tok = load_quantized(qdir), transformers.AutoTokenizer.from_pretrained(str(qdir))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nmore\n"))
    rc, out, err = run(["generate", qdir, "--chat", "--max-new-tokens", 5, "-q"], capsys)
    assert rc == 0, err
    messages, want = [], []
    for line in ("hello", "more"):  # the empty line is skipped
        messages.append({"role": "user", "content": line})
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        reply = _greedy(model, tok, enc, 5)
        messages.append({"role": "assistant", "content": reply})
        want.append(reply)
    assert out == "".join(r + "\n" for r in want)


def test_generate_errors(qdir, model_dir, tmp_path, capsys):
    plain = save_quantized(quantized("tied_llama"), tmp_path / "plain", tokenizer=char_tokenizer())
    cases = [
        (["generate", qdir], "pass --prompt TEXT, or --chat"),
        (["generate", qdir, "--prompt", "x", "--temperature", 0.5], "--temperature need --sample"),
        (["generate", plain, "--prompt", "x", "--chat"], "has no chat template"),
        (["generate", model_dir, "--prompt", "x"], "has no quantization_config"),
        (["generate", tmp_path / "missing", "--prompt", "x"], "no such directory"),
    ]
    for argv, msg in cases:
        one_line_error(*run(argv, capsys)[::2], msg)
    for bad in (["--top-p", "1.5"], ["--temperature", "0"], ["--max-new-tokens", "0"]):
        with pytest.raises(SystemExit) as ei:
            main(["generate", str(qdir), "--prompt", "x", "--sample", *bad])
        assert ei.value.code == 2


# ------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------


def test_convert_between_formats(qdir, tmp_path, capsys):
    src = load_quantized(qdir)
    ct, awq, back = tmp_path / "ct", tmp_path / "awq", tmp_path / "back"
    rc, out, err = run(["convert", qdir, "--format", "compressed-tensors", "--out", ct, "--save-dtype", "float32",
                        "--no-progress"], capsys)
    assert rc == 0, err
    assert f"converted awq_ao -> compressed-tensors: saved to {ct}" in out
    assert "Marlin" in err and "awq-ao: warning:" in err  # the tiny shapes are below Marlin's tiles
    assert "loading:" in err and "saving:" in err and "total:" in err
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert torch.equal(logits(load_quantized(ct)), logits(src))  # codes, scales, zeros held exactly
    for f in ("tokenizer.json", "tokenizer_config.json"):  # copied byte for byte
        assert (ct / f).read_bytes() == (qdir / f).read_bytes()
    assert "| converted from | q (awq_ao format) |" in (ct / "README.md").read_text()

    rc, out, err = run(["convert", ct, "--format", "autoawq", "--out", awq, "--save-dtype", "float32", "-q"], capsys)
    assert rc == 0, err
    assert json.loads((awq / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    loaded_awq = load_quantized(awq)
    # autoawq stores float16 scales: close to the source, not equal
    torch.testing.assert_close(logits(loaded_awq), logits(src), atol=2e-3, rtol=2e-3)

    rc, out, err = run(["convert", awq, "--format", "awq_ao", "--out", back, "-q"], capsys)
    assert rc == 0, err
    assert torch.equal(logits(load_quantized(back)), logits(loaded_awq))  # awq_ao holds what autoawq held
    assert transformers.AutoTokenizer.from_pretrained(str(back)).chat_template == TEMPLATE

    # an existing output needs --overwrite; the source folder is never replaced
    one_line_error(*run(["convert", qdir, "--format", "awq_ao", "--out", back], capsys)[::2], "already exists")
    rc, _, err = run(["convert", back, "--format", "awq_ao", "--out", back, "--overwrite"], capsys)
    assert rc == 1 and "awq-ao: error: " in err


def test_convert_refusals(model_dir, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaled = save_quantized(quantized("gpt2"), tmp_path / "scaled")  # ScaledInputLinear (GELU -> c_proj)
        ragged = tiny_model("llama")
        for mod in ragged.model.layers.modules():
            if isinstance(mod, nn.Linear):
                quantize_linear_module(mod, bits=4, group_size=48)  # 64 = 48 + 16: ragged groups
        ragged_dir = save_quantized(ragged, tmp_path / "ragged")
        moe = _tiny_moe_quantized()
        moe_dir = save_quantized(moe, tmp_path / "moe")
    cases = [
        (scaled, "autoawq", "ScaledInputLinear"),
        (scaled, "compressed-tensors", "ScaledInputLinear"),
        (ragged_dir, "autoawq", "divisible by group_size=48"),
        (ragged_dir, "compressed-tensors", "divisible by group_size=48"),
        (moe_dir, "compressed-tensors", "cannot hold INT4 MoE experts"),
        (model_dir, "autoawq", "has no quantization_config"),
    ]
    for src, fmt, msg in cases:
        one_line_error(*run(["convert", src, "--format", fmt, "--out", tmp_path / "o", "--no-progress"], capsys)[::2], msg)
    assert not (tmp_path / "o").exists()


def _tiny_moe_quantized() -> nn.Module:
    from devtools.tiny_configs import tiny_config

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(tiny_config(transformers.MixtralForCausalLM)).eval()
    awq_ao.quantize(model, scale_search=False, clip=False, group_size=32, verbose=False, progress=False)
    return model


# ------------------------------------------------------------------------------------------------
# eval of the unquantized baseline
# ------------------------------------------------------------------------------------------------


def test_eval_unquantized_baseline(model_dir, text_file, capsys):
    rc, out, err = run(["eval", model_dir, "--text", text_file, "--seq-len", 64, "--windows", 2, "--no-progress"], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "model: unquantized (float32, full precision): baseline perplexity"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = char_tokenizer()(SAMPLE_TEXT, return_tensors="pt").input_ids[0]
    assert lines[-1] == f"perplexity: {perplexity(model, ids, seq_len=64, max_windows=2)[0]:.4f}"
    one_line_error(*run(["eval", model_dir, "--text", text_file, "--verify"], capsys)[::2], "is not quantized")


# ------------------------------------------------------------------------------------------------
# quantize: calibration sources, chat template, phases, vLLM warning, model card
# ------------------------------------------------------------------------------------------------


def test_default_calibration_source():
    """The library's default needs no project files: WikiText-2 validation from the hub."""
    from awq_ao import calibration

    assert cli_inputs.DEFAULT_DATASET == calibration.DEFAULT_DATASET  # the --help text names the real default
    assert not hasattr(cli_inputs, "_default_calibration") and not hasattr(cli_commands, "_default_calibration")


def _no_model_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli_commands, "load_source_model", fail)


def test_calib_errors_before_model_load(model_dir, text_file, tmp_path, capsys, monkeypatch):
    import datasets

    _no_model_load(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    out = tmp_path / "o"
    rc, _, err = run(["quantize", model_dir, "--out", out, "--calib", "someone/no-such-dataset-xyz"], capsys)
    one_line_error(rc, err, "calibration dataset 'someone/no-such-dataset-xyz' (split 'train') could not be loaded")
    assert "offline" in err
    cases = [
        (["--calib", tmp_path / "none.txt"], "does not exist"),
        (["--calib", text_file, "--calib-split", "test"], "drop --calib-split"),
        (["--calib", text_file, "--chat-template"], "has no chat template; drop --chat-template"),
    ]
    for extra, msg in cases:
        one_line_error(*run(["quantize", model_dir, "--out", out, *extra], capsys)[::2], msg)
    assert not out.exists()


def test_quantize_chat_template_phases_and_card(text_file, tmp_path, capsys):
    model_dir = tmp_path / "instruct"
    tied_llama(seed=2).save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    rows = tmp_path / "chat.jsonl"
    rows.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": SAMPLE_TEXT[i * 50:(i + 1) * 50]},
                                                       {"role": "assistant", "content": "ok"}]}) for i in range(40)))
    out = tmp_path / "q"
    rc, stdout, err = run(["quantize", model_dir, "--out", out, "--calib", rows, "--chat-template", "--group-size", 32,
                           "--n-samples", 4, "--seq-len", 32, "--batch-size", 2, "--format", "compressed-tensors",
                           "--no-progress"], capsys)
    assert rc == 0, err
    assert "saved compressed-tensors checkpoint to" in stdout
    lines = err.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(p))
             for p in ("loading:", "calibration data:", "awq-ao: warning:", "quantization:", "saving:", "total:")]
    assert order == sorted(order), err  # the vLLM warning comes before the long work
    assert "4 x 32 tokens from chat.jsonl through the chat template" in err
    card = (out / "README.md").read_text()
    assert "| calibration | chat.jsonl |" in card and "| calibration samples | 4 x 32 tokens |" in card
    assert "| chat template | yes |" in card
    assert load_quantized(out) is not None
