"""Issue 15: nothing a checkpoint or a save can do to a user.

* a checkpoint (or source model) that asks for custom code (``auto_map``) is refused and its
  Python file never runs, through the API and the CLI;
* ``overwrite=True`` only replaces folders awq_ao wrote (marker file), never ``.``, a parent
  of the current folder, the home folder, ``/`` or the folder the model came from;
* the target is claimed atomically (concurrent saves: exactly one wins), replaced atomically
  (``renameat2(RENAME_EXCHANGE)``), and leftovers of killed saves are cleaned up;
* every write failure (safetensors' own errors, a real full tmpfs) is one ``OSError`` naming
  the folder, and the target is left as it was.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import SAMPLE_TEXT, char_tokenizer, logits, quantized, tied_llama
from safetensors import SafetensorError

import awq_ao.checkpoint.atomic_dir as atomic_mod
import awq_ao.checkpoint.load as load_mod
import awq_ao.checkpoint.save as save_mod
from awq_ao.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    build_empty_model,
    load_quantized,
    save_quantized,
)
from awq_ao.checkpoint.formats import MARKER_NAME
from awq_ao.cli import main

HAS_RENAMEAT2 = atomic_mod._RENAMEAT2 is not None


def _tree(d: Path) -> dict[str, bytes | None]:
    """Every path under ``d`` (folders as None) with file contents: a snapshot to compare."""
    out: dict[str, bytes | None] = {}
    for p in sorted(d.rglob("*")):
        out[str(p.relative_to(d))] = None if p.is_dir() else p.read_bytes()
    return out


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture(params=["renameat2", "fallback"])
def rename_mode(request, monkeypatch):
    """Run a test with Linux renameat2 and with the fallback used where it is missing."""
    if request.param == "renameat2":
        if not HAS_RENAMEAT2:
            pytest.skip("libc has no renameat2 here")
    else:
        monkeypatch.setattr(atomic_mod, "_RENAMEAT2", None)
    return request.param


# ------------------------------------------------------------------------------------------------
# 1. never execute checkpoint code
# ------------------------------------------------------------------------------------------------

EVIL = """
import pathlib
pathlib.Path({sentinel!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _plant_custom_code(d: Path, sentinel: Path, file: str = "config.json", model_type: str | None = None) -> None:
    (d / "evil.py").write_text(EVIL.format(sentinel=str(sentinel)))
    f = d / file
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    if file == "config.json":
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    else:
        cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    if model_type is not None:
        cfg["model_type"] = model_type
    f.write_text(json.dumps(cfg))


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "sample.txt"
    p.write_text(SAMPLE_TEXT)
    return p


def test_checkpoint_with_auto_map_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    d = save_quantized(quantized("llama"), tmp_path / "ckpt")
    _plant_custom_code(d, sentinel)
    with pytest.raises(CheckpointError, match=r"config\.json asks for custom code.*AutoConfig.*never runs code"):
        load_quantized(d)
    with pytest.raises(CheckpointError, match=re.escape(str(d / "config.json"))):
        build_empty_model(d)
    assert not sentinel.exists()


@pytest.mark.parametrize("model_type", [None, "evil"])
def test_transformers_itself_is_told_not_to_trust_remote_code(tmp_path, monkeypatch, model_type):
    """Defence in depth: even with awq_ao's own check switched off, transformers is called with
    trust_remote_code=False, so the file never runs (a known model_type loads with the
    built-in code, an unknown one is a clear error)."""
    sentinel = tmp_path / "SENTINEL"
    model = quantized("llama")
    d = save_quantized(model, tmp_path / "ckpt")
    _plant_custom_code(d, sentinel, model_type=model_type)
    monkeypatch.setattr(load_mod, "refuse_custom_code", lambda path: None)
    if model_type is None:
        assert torch.equal(logits(load_quantized(d)), logits(model))
    else:
        with pytest.raises(CheckpointError):
            load_quantized(d)
    assert not sentinel.exists()


def test_cli_eval_refuses_custom_code(tmp_path, text_file, capsys):
    sentinel = tmp_path / "SENTINEL"
    d = save_quantized(quantized("tied_llama"), tmp_path / "ckpt", tokenizer=char_tokenizer())
    _plant_custom_code(d, sentinel)
    rc = main(["eval", str(d), "--text", str(text_file), "--seq-len", "32", "--windows", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "asks for custom code" in err and "config.json" in err, err
    assert not sentinel.exists()

    # a tokenizer folder that asks for custom code (tokenizer_config.json auto_map)
    clean = save_quantized(quantized("tied_llama"), tmp_path / "clean")
    tok = tmp_path / "tok"
    char_tokenizer().save_pretrained(tok)
    _plant_custom_code(tok, sentinel, file="tokenizer_config.json")
    rc = main(["eval", str(clean), "--tokenizer", str(tok), "--text", str(text_file), "--seq-len", "32",
               "--windows", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "tokenizer_config.json asks for custom code" in err, err
    assert not sentinel.exists()


def test_cli_quantize_refuses_custom_code_source(tmp_path, text_file, capsys):
    sentinel = tmp_path / "SENTINEL"
    src = tmp_path / "src-model"
    tied_llama(seed=1).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    _plant_custom_code(src, sentinel)
    rc = main(["quantize", str(src), "--out", str(tmp_path / "q"), "--calib", str(text_file), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "asks for custom code" in err, err
    assert not sentinel.exists() and not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------------------------
# 2. overwrite only what awq_ao wrote
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["awq_ao", "autoawq", "compressed-tensors"])
def test_every_save_writes_a_marker(tmp_path, fmt):
    d = save_quantized(quantized("tied_llama"), tmp_path / "ckpt", format=fmt)
    marker = json.loads((d / MARKER_NAME).read_text())
    assert marker["writer"] == "awq_ao" and marker["format"] == fmt and marker["version"] == 1
    assert oct((d / MARKER_NAME).stat().st_mode & 0o777) == oct(0o666 & ~atomic_mod.current_umask())


def _project(root: Path) -> Path:
    """A user's project folder that even looks like a model directory (config.json)."""
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_text("print('precious')\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "config.json").write_text("{}")
    return root


def test_refuses_current_directory_and_its_parents(tmp_path, monkeypatch):
    model = quantized("llama")
    proj = _project(tmp_path / "proj")
    (proj / "sub").mkdir()
    before = _tree(tmp_path)
    monkeypatch.chdir(proj)
    with pytest.raises(FileExistsError, match=r"refusing to overwrite .*proj: it is the current directory"):
        save_quantized(model, ".", overwrite=True)
    (proj / MARKER_NAME).write_text(json.dumps({"writer": "awq_ao", "version": 1}))  # even when marked
    with pytest.raises(FileExistsError, match="it is the current directory"):
        save_quantized(model, proj, overwrite=True)
    (proj / MARKER_NAME).unlink()
    monkeypatch.chdir(proj / "sub")
    for target in ("..", "../..", str(tmp_path)):
        with pytest.raises(FileExistsError, match="it is a parent of the current directory"):
            save_quantized(model, target, overwrite=True)
    assert _tree(tmp_path) == before  # src/, .git/ and everything else untouched


def test_refuses_unmarked_folders_home_and_root(tmp_path, monkeypatch):
    model = quantized("llama")
    proj = _project(tmp_path / "proj")
    fp = tmp_path / "fp-model"
    tied_llama().save_pretrained(fp)  # a real model folder, but not written by awq_ao
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    before = _tree(tmp_path)
    for d in (proj, fp):
        with pytest.raises(FileExistsError, match=rf"refusing to overwrite {d}: it has no {MARKER_NAME} marker"):
            save_quantized(model, d, overwrite=True)
    with pytest.raises(FileExistsError, match="it is your home directory"):
        save_quantized(model, "~", overwrite=True)
    with pytest.raises(FileExistsError, match="it contains your home directory"):
        save_quantized(model, tmp_path, overwrite=True)
    with pytest.raises(FileExistsError, match="it is the filesystem root"):
        save_quantized(model, "/", overwrite=True)
    f = tmp_path / "file.bin"
    f.write_bytes(b"data")
    link = tmp_path / "link"
    link.symlink_to(save_quantized(model, tmp_path / "real"))
    with pytest.raises(FileExistsError, match="not a directory"):
        save_quantized(model, f, overwrite=True)
    with pytest.raises(FileExistsError, match="symbolic link"):
        save_quantized(model, link, overwrite=True)
    assert all(_tree(tmp_path)[k] == v for k, v in before.items())


def test_refuses_the_source_model_folder(tmp_path):
    d = save_quantized(quantized("llama"), tmp_path / "models" / "ckpt")
    before = _tree(tmp_path)
    loaded = load_quantized(d)
    with pytest.raises(FileExistsError, match="it is the folder the model .* was loaded from"):
        save_quantized(loaded, d, overwrite=True)
    with pytest.raises(FileExistsError, match="it contains the folder the model was loaded from"):
        save_quantized(loaded, d.parent, overwrite=True)
    assert _tree(tmp_path) == before
    save_quantized(loaded, tmp_path / "copy")  # elsewhere is fine


def test_cli_refuses_source_and_cwd_before_loading(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src-model"
    tied_llama(seed=1).save_pretrained(src)
    before = _tree(tmp_path)
    rc = main(["quantize", str(src), "--out", str(src), "--overwrite", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "refusing to overwrite" in err and "loaded from" in err, err
    monkeypatch.chdir(src)
    rc = main(["quantize", str(src), "--out", ".", "--overwrite", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "current directory" in err, err
    assert _tree(tmp_path) == before


def test_overwrite_marked_and_empty_folders(tmp_path, rename_mode):
    a, b = quantized("llama"), quantized("tied_llama")
    d = save_quantized(a, tmp_path / "ckpt")
    save_quantized(b, d, overwrite=True)
    assert torch.equal(logits(load_quantized(d)), logits(b))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save_quantized(a, empty)
    save_quantized(a, empty, overwrite=True)
    assert torch.equal(logits(load_quantized(empty)), logits(a))
    assert _names(tmp_path) == ["ckpt", "empty"]


# ------------------------------------------------------------------------------------------------
# 3. claim the target atomically
# ------------------------------------------------------------------------------------------------


def test_concurrent_saves_exactly_one_wins(tmp_path, rename_mode):
    models = [quantized("llama"), quantized("tied_llama")]
    for rnd in range(3):
        target = tmp_path / f"ckpt{rnd}"
        n = 4
        barrier = threading.Barrier(n)
        results: list[object] = [None] * n

        def work(i: int, target: Path = target, barrier: threading.Barrier = barrier, results: list = results) -> None:
            barrier.wait()
            try:
                save_quantized(models[i % 2], target)
                results[i] = "ok"
            except BaseException as e:  # noqa: BLE001 - collected and checked below
                results[i] = e

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wins = [i for i, r in enumerate(results) if r == "ok"]
        assert len(wins) == 1, results
        for r in results:
            if r != "ok":
                assert isinstance(r, FileExistsError) and str(target) in str(r), r
        assert torch.equal(logits(load_quantized(target)), logits(models[wins[0] % 2]))
    assert _names(tmp_path) == ["ckpt0", "ckpt1", "ckpt2"]  # the losers left nothing behind


@pytest.mark.parametrize("what", ["user folder", "empty folder"])
def test_folder_appearing_during_save_is_never_replaced(tmp_path, monkeypatch, rename_mode, what):
    target = tmp_path / "ckpt"
    real = save_mod._write_shards

    def write_then_intrude(*a, **k):
        out = real(*a, **k)
        target.mkdir()
        if what == "user folder":
            (target / "notes.txt").write_text("keep me")
        return out

    monkeypatch.setattr(save_mod, "_write_shards", write_then_intrude)
    with pytest.raises(FileExistsError, match="appeared while saving"):
        save_quantized(quantized("llama"), target)
    assert _names(tmp_path) == ["ckpt"]
    assert _names(target) == (["notes.txt"] if what == "user folder" else [])
    # with overwrite=True a foreign folder appearing mid-save is refused as well
    monkeypatch.setattr(save_mod, "_write_shards", real)
    if what == "user folder":
        with pytest.raises(FileExistsError, match="no .awq_ao-checkpoint marker"):
            save_quantized(quantized("llama"), target, overwrite=True)
        assert (target / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------
# 4. replace atomically; clean up after killed saves
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_RENAMEAT2, reason="libc has no renameat2 here (the two-rename fallback runs)")
def test_overwrite_is_one_exchange_and_target_never_missing(tmp_path, monkeypatch):
    a, b = quantized("llama"), quantized("tied_llama")
    target = save_quantized(a, tmp_path / "ckpt")
    calls = []
    real_rename2 = atomic_mod._rename2
    monkeypatch.setattr(atomic_mod, "_rename2", lambda s, d, f: (calls.append(f), real_rename2(s, d, f))[1])
    monkeypatch.setattr(atomic_mod.os, "rename", lambda *a: pytest.fail("os.rename used although renameat2 exists"))
    missing = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not (target / "config.json").is_file() or not (target / "model.safetensors").is_file():
                missing.append(1)

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(6):
            save_quantized(b if i % 2 == 0 else a, target, overwrite=True)
    finally:
        stop.set()
        t.join()
    # each save first tries to claim the name (RENAME_NOREPLACE), finds it taken, then exchanges
    assert calls.count(atomic_mod._RENAME_EXCHANGE) == 6 and set(calls) <= {atomic_mod._RENAME_EXCHANGE, atomic_mod._RENAME_NOREPLACE}
    assert not missing
    assert torch.equal(logits(load_quantized(target)), logits(a))
    assert _names(tmp_path) == ["ckpt"]


@pytest.mark.skipif(not HAS_RENAMEAT2, reason="needs renameat2")
def test_foreign_folder_swapped_in_at_the_last_moment_is_put_back(tmp_path, monkeypatch):
    target = save_quantized(quantized("llama"), tmp_path / "ckpt")
    real_lock = atomic_mod._lock_marker

    def intrude(d):  # between the marker check and the exchange, a user replaces the folder
        fd = real_lock(d)
        shutil.rmtree(target)
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
        return fd

    monkeypatch.setattr(atomic_mod, "_lock_marker", intrude)
    with pytest.raises(FileExistsError, match="replaced by a folder awq_ao did not write"):
        save_quantized(quantized("tied_llama"), target, overwrite=True)
    assert _names(target) == ["notes.txt"] and _names(tmp_path) == ["ckpt"]


def _fake_leftover(parent: Path, name: str, marked: bool = True) -> Path:
    d = parent / name
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x" * 100)
    (d / "sub" / "f").write_text("x")
    if marked:
        (d / MARKER_NAME).write_text(json.dumps({"writer": "awq_ao", "format": "awq_ao", "version": 1}))
    return d


def test_leftovers_of_killed_saves_are_cleaned_on_next_save(tmp_path, rename_mode, monkeypatch):
    import fcntl

    model = quantized("llama")
    target = save_quantized(model, tmp_path / "ckpt")
    stale = [_fake_leftover(tmp_path, ".ckpt.tmp-abc123"), _fake_leftover(tmp_path, ".ckpt.old-0123456789ab")]
    kept = [
        _fake_leftover(tmp_path, ".ckpt.tmp-nomarker", marked=False),  # not recognisably ours
        _fake_leftover(tmp_path, ".other.tmp-abc123"),  # another target's
        _fake_leftover(tmp_path, ".ckpt.tmpx-abc123"),  # not our naming pattern
        _fake_leftover(tmp_path, ".ckpt.tmp-live0001"),  # a save in progress: its marker is locked
    ]
    # killed before the marker was complete: empty, or an unfinished marker only (old enough)
    unfinished = [tmp_path / ".ckpt.tmp-empty001", tmp_path / ".ckpt.tmp-partial01"]
    for d in unfinished:
        d.mkdir()
    (unfinished[1] / MARKER_NAME).write_text("")
    for d in unfinished:
        os.utime(d, (1, 1))
    fresh = tmp_path / ".ckpt.tmp-justmade"  # a save that just ran mkdtemp: too young to touch
    fresh.mkdir()
    fd = os.open(kept[-1] / MARKER_NAME, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        save_quantized(model, target, overwrite=True)
    finally:
        os.close(fd)
    assert not any(p.exists() for p in stale + unfinished)
    assert fresh.is_dir()
    assert all(p.exists() and (p / "sub" / "f").exists() for p in kept)
    # a new-target save cleans up as well
    stale2 = _fake_leftover(tmp_path, ".fresh.tmp-zz9")
    save_quantized(model, tmp_path / "fresh")
    assert not stale2.exists()


KILL_CHILD = r"""
import itertools, sys
from awq_ao.checkpoint import load_quantized, save_quantized
a, b, target = sys.argv[1:4]
models = [load_quantized(a), load_quantized(b)]
print("ready", flush=True)
for i in itertools.count():
    save_quantized(models[i % 2], target, overwrite=True)
"""


def _kill_during_saves(tmp_path: Path, kills: int, monkeypatch) -> None:
    # no other save runs here, so a killed save's empty folder may be removed at once
    monkeypatch.setattr(atomic_mod, "_EMPTY_LEFTOVER_AGE_S", 0.0)
    qa, qb = quantized("llama"), quantized("tied_llama")
    a, b = save_quantized(qa, tmp_path / "a"), save_quantized(qb, tmp_path / "b")
    target = save_quantized(qa, tmp_path / "target")
    want = {"a": logits(qa), "b": logits(qb)}
    rng = random.Random(15)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
    for _ in range(kills):
        p = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(a), str(b), str(target)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            assert p.stdout.readline().strip() == "ready"
            threading.Event().wait(rng.uniform(0.05, 0.6))
        finally:
            p.kill()  # SIGKILL: no cleanup handlers run
            p.wait()
        got = logits(load_quantized(target))  # always a complete checkpoint, old or new
        assert torch.equal(got, want["a"]) or torch.equal(got, want["b"])
    save_quantized(qa, target, overwrite=True)
    assert _names(tmp_path) == ["a", "b", "target"]  # leftovers of the killed saves are gone


def test_kill_9_during_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    _kill_during_saves(tmp_path, kills=1, monkeypatch=monkeypatch)


@pytest.mark.slow
def test_kill_9_during_saves_loop(tmp_path, monkeypatch):
    _kill_during_saves(tmp_path, kills=8, monkeypatch=monkeypatch)


# ------------------------------------------------------------------------------------------------
# 5. every write failure is one OSError naming the folder; the target is unchanged
# ------------------------------------------------------------------------------------------------


def _safetensors_fails(message: str, partial: int = 1000):
    def fake_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * partial)
        raise SafetensorError(message)

    return fake_save_file


def test_safetensors_error_becomes_oserror_and_target_is_unchanged(tmp_path, monkeypatch):
    model = quantized("llama")
    target = save_quantized(model, tmp_path / "ckpt")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in target.iterdir()}
    monkeypatch.setattr(save_mod, "save_file", _safetensors_fails(
        "Error while serializing: I/O error: No space left on device (os error 28)"))
    with pytest.raises(CheckpointWriteError) as ei:
        save_quantized(quantized("tied_llama"), target, overwrite=True)
    e = ei.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert str(target) in str(e) and "no space left" in str(e) and "needs about" in str(e)
    assert isinstance(e.__cause__, SafetensorError)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in target.iterdir()}
    assert before == after and _names(tmp_path) == ["ckpt"]
    # a new target: nothing left behind; a SafetensorError without an errno is EIO
    monkeypatch.setattr(save_mod, "save_file", _safetensors_fails("Error while serializing: something broke"))
    with pytest.raises(CheckpointWriteError, match=r"cannot save to .*new: Error while serializing: something broke") as ei:
        save_quantized(model, tmp_path / "new")
    assert ei.value.errno == errno.EIO
    assert _names(tmp_path) == ["ckpt"]
    monkeypatch.undo()
    assert torch.equal(logits(load_quantized(target)), logits(model))


def test_other_write_failures_are_the_same_error(tmp_path, monkeypatch):
    def no_permission(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic_mod.tempfile, "mkdtemp", no_permission)
    with pytest.raises(CheckpointWriteError, match=r"cannot save to .*ckpt: .*Permission denied") as ei:
        save_quantized(quantized("llama"), tmp_path / "ckpt")
    assert ei.value.errno == errno.EACCES
    monkeypatch.undo()

    class BrokenTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{")
            raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        save_quantized(quantized("llama"), tmp_path / "ckpt", tokenizer=BrokenTokenizer())
    assert _names(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real tmpfs mounted at tmp_path/mnt, sized by the test (skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = []

    def mount(size_bytes: int) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
        mounted.append(mnt)
        return mnt

    yield mount
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


@pytest.mark.skipif(shutil.which("mount") is None, reason="no mount command")
def test_real_full_disk(tmp_path, small_tmpfs):
    model = quantized("llama")
    probe = save_quantized(model, tmp_path / "probe")
    pages = sum(-(-p.stat().st_size // 4096) for p in probe.iterdir())
    mnt = small_tmpfs(int(pages * 1.5 + 2) * 4096)  # room for one checkpoint, not two
    target = save_quantized(model, mnt / "ckpt")
    before = _tree(mnt)
    with pytest.raises(CheckpointWriteError) as ei:
        save_quantized(quantized("tied_llama"), target, overwrite=True)
    assert ei.value.errno == errno.ENOSPC and str(target) in str(ei.value) and "needs about" in str(ei.value)
    assert _tree(mnt) == before
    with pytest.raises(CheckpointWriteError, match="no space left"):
        save_quantized(model, mnt / "second")
    assert _tree(mnt) == before
    assert torch.equal(logits(load_quantized(target)), logits(model))
