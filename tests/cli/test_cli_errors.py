"""Bad input to ``covsvd capture`` / ``covsvd init`` is refused with one line on stderr before the model is
loaded (a loader that fails the test if called stands in for it) and leaves the file system as it was: an
existing or unwritable output, an output of the wrong type, a non-positive size, a regex that does not compile,
a missing device; the library's errors reach the user as one line too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import covsvd
from covsvd.cli import main as cli
from covsvd.cli.checks import CLIError, check_output, target_spec


class Loaded(Exception):
    """Raised by the stand-in loader: not a user error, so it escapes main() and fails the test."""


@pytest.fixture
def no_load(monkeypatch) -> list:
    """Replace ``covsvd.load_model`` with a loader that records the call and raises :class:`Loaded`."""
    calls: list = []

    def loader(*args, **kwargs):
        calls.append(args)
        raise Loaded("the model was loaded")

    monkeypatch.setattr(covsvd, "load_model", loader)
    return calls


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A directory this process cannot create files in: /proc for root (root writes through mode bits, not into
    /proc), else a 0o555 directory (its mode put back afterwards)."""
    if os.geteuid() == 0:
        yield Path("/proc")
        return
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    yield directory
    directory.chmod(0o755)


def capture(model, out, *extra) -> list[str]:
    return ["capture", "--model", str(model), "--out", str(out), "--no-progress", *extra]


def init(model, out, *extra) -> list[str]:
    return ["init", "--model", str(model), "--out", str(out), "--r", "2", "--no-progress", *extra]


def refused(argv: list[str], capsys) -> str:
    """main(argv) returns 1 with exactly one line on stderr; that line."""
    assert cli.main(argv) == 1, argv
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"covsvd {argv[0]}: error: "), err
    return err


def test_capture_refuses_an_existing_out_before_loading(tmp_path, no_load, capsys, llama_dir, data):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"earlier moments")
    stamp = out.stat().st_mtime_ns
    err = refused(capture(llama_dir, out, "--data", str(data)), capsys)
    assert str(out) in err and "--overwrite" in err
    assert no_load == [] and out.read_bytes() == b"earlier moments" and out.stat().st_mtime_ns == stamp


def test_capture_overwrite_replaces_the_file(tmp_path, capsys, llama_dir, data):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"earlier moments")
    argv = capture(llama_dir, out, "--data", str(data), "--seq-len", "16", "--batch-size", "4", "--overwrite")
    assert cli.main(argv) == 0
    assert len(covsvd.load_moments(out)) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left


@pytest.mark.parametrize("below", [(), ("new", "sub")], ids=["in-it", "in-a-subdirectory-to-create"])
def test_an_unwritable_output_directory_is_refused_before_loading(unwritable, below, no_load, capsys):
    out = unwritable.joinpath(*below, "m.safetensors")
    err = refused(capture("no-model", out), capsys)
    assert str(out) in err and f"cannot create files in {unwritable}" in err and "directory you can write" in err
    assert ".tmp" not in err and no_load == []
    err = refused(init("no-model", unwritable.joinpath(*below, "export"), "--metric", "identity"), capsys)
    assert f"cannot create files in {unwritable}" in err and no_load == []
    assert not unwritable.joinpath(*below).exists() or not below


def test_outputs_of_the_wrong_type_are_refused_before_loading(tmp_path, no_load, capsys):
    a_dir, a_file = tmp_path / "a_dir", tmp_path / "a_file"
    a_dir.mkdir()
    a_file.write_text("x")
    assert "is a directory, but --out names a file" in refused(capture("m", a_dir), capsys)
    assert "is a directory" in refused(capture("m", a_dir, "--overwrite"), capsys)  # never replaced by a file
    assert "is a file, but --out names a directory" in refused(init("m", a_file, "--format", "peft"), capsys)
    assert f"{a_file} is a file, not a directory" in refused(capture("m", a_file / "m.safetensors"), capsys)
    streaming = ("--format", "covsvd", "--layerwise", "--metric", "diag")
    err = refused(init("m", tmp_path / "a.safetensors", *streaming, "--moments-dir", str(a_file)), capsys)
    assert "--moments-dir" in err and "is a file" in err
    err = refused(init("m", tmp_path / "a.safetensors", "--moments-dir", str(a_dir)), capsys)  # not streaming
    assert "--layerwise --format covsvd" in err
    assert no_load == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]
    assert list(a_dir.iterdir()) == []


def test_input_problems_are_refused_before_loading(tmp_path, no_load, capsys):
    out = tmp_path / "m.safetensors"
    assert "no such file" in refused(capture("m", out, "--data", str(tmp_path / "missing.jsonl")), capsys)
    assert "is a directory" in refused(capture("m", out, "--data", str(tmp_path)), capsys)
    assert "--prompt-field needs --data" in refused(capture("m", out, "--prompt-field", "prompt"), capsys)
    assert "give --prompt-field" in refused(capture("m", out, "--token-mask", "labels"), capsys)
    missing = str(tmp_path / "missing.safetensors")
    assert "no such file" in refused(init("m", tmp_path / "a", "--moments", missing), capsys)
    assert no_load == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    capture("m", "o", "--max-tokens", "0"), capture("m", "o", "--max-tokens", "-5"),
    capture("m", "o", "--seq-len", "0"), capture("m", "o", "--batch-size", "0"), init("m", "o", "--r", "0"),
    capture("m", "o", "--max-tokens", "ten"),
], ids=["max-tokens-0", "max-tokens-negative", "seq-len-0", "batch-size-0", "r-0", "max-tokens-not-a-number"])
def test_non_positive_sizes_are_argparse_errors(argv, no_load, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    flag = next(a for a in argv if a in ("--max-tokens", "--seq-len", "--batch-size", "--r"))
    assert len(err.splitlines()) == 1 and f"argument {flag}:" in err and "1 or more" in err, err
    assert no_load == []


def test_a_bad_targets_regex_is_one_line(tmp_path, no_load, capsys):
    err = refused(capture("m", tmp_path / "m.safetensors", "--targets", "(q_proj"), capsys)
    assert "'(q_proj' is not a valid regular expression" in err and "--targets q_proj v_proj" in err
    err = refused(capture("m", tmp_path / "m.safetensors", "--targets", "q_proj", ".*mlp.*"), capsys)
    assert "give one regular expression alone" in err
    assert "not a valid regular expression" in refused(init("m", tmp_path / "x", "--targets", "[q"), capsys)
    assert no_load == [] and list(tmp_path.iterdir()) == []


def test_target_spec_follows_peft_target_modules():
    assert target_spec(None) is None
    assert target_spec(["q_proj"]) == ["q_proj"]  # a name alone is a list of one: every *.q_proj
    assert target_spec(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert target_spec(["mlp.down_proj"]) == ["mlp.down_proj"]
    assert target_spec([r".*mlp\..*"]) == r".*mlp\..*"  # anything else alone is a full-match regex
    assert target_spec(["q_proj|v_proj"]) == "q_proj|v_proj"
    with pytest.raises(CLIError, match="not a valid regular expression"):
        target_spec(["(q"])


def test_cuda_without_cuda_is_one_line(tmp_path, no_load, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", "auto"):
        argv = capture("m", tmp_path / "m.safetensors", "--device", device)
        if device == "auto":  # auto falls back to the CPU: the loader is reached
            with pytest.raises(Loaded):
                cli.main(argv)
            continue
        assert "CUDA is not available" in refused(argv, capsys)
    assert len(no_load) == 1


@pytest.mark.parametrize("error", [ValueError("the first line\nthe second line"), TypeError("bad type"),
                                   FileNotFoundError(2, "No such file or directory", "x.safetensors"),
                                   FileExistsError("x exists; pass overwrite=True")])
def test_library_errors_become_one_line(tmp_path, error, capsys, monkeypatch):
    def loader(*args, **kwargs):
        raise error

    monkeypatch.setattr(covsvd, "load_model", loader)
    err = refused(capture("m", tmp_path / "m.safetensors"), capsys)
    assert err.strip().endswith(cli.one_line(error))
    if isinstance(error, ValueError):
        assert "the first line; the second line" in err


def test_check_output_creates_nothing(tmp_path):
    out = tmp_path / "new" / "sub" / "m.safetensors"
    assert check_output(out, "--out") == out
    assert check_output(tmp_path / "export", "--out", directory=True) == tmp_path / "export"
    assert list(tmp_path.iterdir()) == []  # parents are the writer's to create; the probe leaves nothing
