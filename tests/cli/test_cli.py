"""The core CLI (``covsvd capture`` / ``covsvd init``) on tiny random decoder LLMs saved to disk: its files equal
the library calls, a 2-process torchrun (gloo) writes the single-process file, and bad input exits 1 with a
message and writes nothing. The lab's verbs are tested in tests/lab/test_lab_cli.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import covsvd
from covsvd.algebra.validate import ONE_SIDED_METRICS
from covsvd.cli import main as cli
from covsvd.cli.inputs import model_class
from covsvd.data.textfiles import prompt_batches, text_batches

pytestmark = pytest.mark.usefixtures("one_thread")

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def load(directory: Path):
    return covsvd.load_model(directory, model_class=model_class(directory))


def assert_same_moments(a: dict, b: dict, tol: float) -> None:
    assert list(a) == list(b)
    for name, m in b.items():
        assert a[name].count == m.count, name
        for field in ("sum_xx", "sum_x", "sum_abs"):
            assert rel(getattr(a[name], field), getattr(m, field)) <= tol, (name, field)


def capture_argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["capture", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--seq-len", "16", "--no-progress", *extra]


def test_verbs_and_the_model_class(llama_dir, gpt2_dir):
    from transformers import AutoModel, AutoModelForCausalLM

    verbs = cli.build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse has no public API)
    assert {"capture", "init"} <= set(verbs)
    assert model_class(llama_dir) is AutoModelForCausalLM  # LlamaForCausalLM
    assert model_class(gpt2_dir) is AutoModelForCausalLM  # GPT2LMHeadModel: a causal LM without the suffix
    assert model_class(covsvd.data.default_model_path()) is AutoModel  # BertModel
    assert model_class(llama_dir, "base") is AutoModel


@pytest.mark.parametrize("extra", [(), ("--kind", "diag", "--targets", r".*mlp\..*")])
def test_capture_writes_the_library_moments(tmp_path, llama_dir, data, extra):
    out = tmp_path / "m.safetensors"
    assert cli.main(capture_argv(llama_dir, data, out, *extra)) == 0
    model, tok = load(llama_dir)
    batches = text_batches(tok, data, seq_len=16, batch_size=4)
    kw = dict(zip(extra[::2], extra[1::2], strict=True))
    want = covsvd.capture_moments(model, batches, targets=kw.get("--targets"), kind=kw.get("--kind", "full"),
                                  progress=False)
    got = covsvd.load_moments(out, model)
    assert_same_moments(got, want, 1e-12)
    assert "lm_head" not in got  # the output head is not a default target
    if not extra:
        assert got["model.layers.0.self_attn.k_proj"] is got["model.layers.0.self_attn.q_proj"]  # GQA: one input


def test_targets_follow_peft_target_modules(tmp_path, llama_dir, data):
    names = {"q_proj": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
             "v_proj": ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]}
    cases = [(["q_proj"], names["q_proj"]),  # one bare name: every *.q_proj, as peft's target_modules
             (["q_proj", "v_proj"], sorted(names["q_proj"] + names["v_proj"])),
             ([r".*\.q_proj"], names["q_proj"])]  # one regex, matched against the full name
    for i, (targets, want) in enumerate(cases):
        out = tmp_path / f"{i}.safetensors"
        assert cli.main(capture_argv(llama_dir, data, out, "--kind", "diag", "--targets", *targets)) == 0
        assert sorted(covsvd.load_moments(out)) == want, targets
    out = tmp_path / "identity.safetensors"  # init: plain SVD, no data, adapters on every q_proj
    assert cli.main(init_argv(llama_dir, out, "--metric", "identity", "--format", "covsvd", "--targets", "q_proj")) == 0
    model, _ = load(llama_dir)
    covsvd.load_adapters(model, out)
    assert sorted(covsvd.adapters(model)) == names["q_proj"]


class Captured(Exception):
    """Stops init once the capture is called (not a user error: it escapes main)."""


def test_init_captures_the_kind_the_library_maps_each_metric_to(tmp_path, llama_dir, monkeypatch):
    from covsvd.adapt import plan

    assert cli.build_parser()._subparsers._group_actions[0].choices["init"]._option_string_actions[  # noqa: SLF001
        "--metric"].choices == ONE_SIDED_METRICS  # two-sided needs output moments, which the CLI does not capture
    kinds = []

    def capture_moments(model, batches, **kw):
        kinds.append(kw["kind"])
        raise Captured

    monkeypatch.setattr(covsvd, "capture_moments", capture_moments)
    argv = init_argv(llama_dir, tmp_path / "a.safetensors", "--format", "covsvd", "--max-tokens", "64")
    for metric in ONE_SIDED_METRICS:
        if metric == "identity":  # reads no data: nothing is captured
            continue
        with pytest.raises(Captured):
            cli.main([*argv, "--metric", metric])
        assert kinds.pop() == plan.capture_kind(metric), metric
    monkeypatch.setattr(plan, "capture_kind", lambda metric, kind=None: "full")  # the CLI keeps no table of its own
    with pytest.raises(Captured):
        cli.main([*argv, "--metric", "diag"])
    assert kinds == ["full"] and not list(tmp_path.iterdir())


def test_capture_layerwise_and_labels(tmp_path, gpt2_dir, data, tokenizer):
    default, layerwise = tmp_path / "d.safetensors", tmp_path / "l.safetensors"
    assert cli.main(capture_argv(gpt2_dir, data, default)) == 0
    assert cli.main(capture_argv(gpt2_dir, data, layerwise, "--layerwise")) == 0
    assert_same_moments(covsvd.load_moments(layerwise), covsvd.load_moments(default), 1e-12)
    # instruction data: only the text's tokens count (labels != -100), the prompt is read but not counted
    labelled = tmp_path / "p.safetensors"
    assert cli.main(capture_argv(gpt2_dir, data, labelled, "--prompt-field", "prompt")) == 0
    batches = prompt_batches(tokenizer, data, "prompt", seq_len=16, batch_size=4)
    n_text = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert n_text < covsvd.count_tokens(batches)
    assert {m.count for m in covsvd.load_moments(labelled).values()} == {n_text}


@pytest.mark.slow
def test_torchrun_two_gloo_processes_write_the_single_process_file(tmp_path, llama_dir, data):
    single, multi = tmp_path / "single.safetensors", tmp_path / "multi.safetensors"
    assert cli.main(capture_argv(llama_dir, data, single)) == 0  # one thread (one_thread), as each worker
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "covsvd", *capture_argv(llama_dir, data, multi)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    assert_same_moments(covsvd.load_moments(multi), covsvd.load_moments(single), 1e-12)
    assert not list(tmp_path.glob(".*.tmp"))  # rank 0 wrote once, atomically; no other rank wrote


def test_bad_input_exits_1_and_writes_nothing(tmp_path, llama_dir, data, capsys, monkeypatch):
    out = tmp_path / "m.safetensors"
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"content": "words"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (capture_argv(llama_dir, no_field, out), "no field 'text'"),
        (capture_argv(llama_dir, empty, out), "holds no text"),
        (capture_argv(llama_dir, data, out, "--token-mask", "labels"), "give --prompt-field"),
        (capture_argv(llama_dir, data, out, "--device", "cuda:7"), "cuda"),
    ]
    for argv, message in cases:
        if "cuda:7" in argv and torch.cuda.device_count() > 7:
            continue
        assert cli.main(argv) == 1, argv
        assert message in capsys.readouterr().err
    monkeypatch.setattr(cli, "free_memory", lambda device: 1024)  # 1 KiB free: every estimate is over
    assert cli.main(capture_argv(llama_dir, data, out)) == 1
    err = capsys.readouterr().err
    assert "--layerwise" in err and "--kind diag" in err and "--targets" in err
    assert not list(tmp_path.glob("*m.safetensors*")) and not list(tmp_path.glob(".*.tmp"))


def init_argv(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["init", "--model", str(model_dir), "--out", str(out), "--r", "4", "--no-progress", *extra]


def test_init_covsvd_from_a_moments_file_equals_attach(tmp_path, llama_dir, data, capsys):
    moments_file, out = tmp_path / "m.safetensors", tmp_path / "a.safetensors"
    assert cli.main(capture_argv(llama_dir, data, moments_file)) == 0
    argv = init_argv(llama_dir, out, "--moments", str(moments_file), "--format", "covsvd", "--metric", "full")
    assert cli.main(argv) == 0
    model, _ = load(llama_dir)
    covsvd.attach_adapters(model, covsvd.load_moments(moments_file, model), 4, "full", progress=False)
    fresh, _ = load(llama_dir)
    covsvd.load_adapters(fresh, out)
    ids = torch.randint(100, 2000, (2, 7))
    with torch.no_grad():
        assert rel(fresh(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-6
    mine, theirs = covsvd.adapters(fresh), covsvd.adapters(model)
    assert list(mine) == list(theirs)
    for name, a in mine.items():
        assert torch.equal(a.U, theirs[name].U) and torch.equal(a.P, theirs[name].P), name
    stamp = out.stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(argv) == 1  # exists: refused before anything runs
    assert "--overwrite" in capsys.readouterr().err and out.stat().st_mtime_ns == stamp
    assert cli.main([*argv, "--overwrite"]) == 0


def test_init_peft_reproduces_the_model(tmp_path, gpt2_dir, data):
    import peft

    out = tmp_path / "export"
    argv = init_argv(gpt2_dir, out, "--data", str(data), "--seq-len", "16", "--metric", "full", "--format", "peft")
    assert cli.main(argv) == 0
    original, _ = load(gpt2_dir)
    base, _ = covsvd.load_model(out / "base", model_class=model_class(gpt2_dir))
    wrapped = peft.PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.randint(100, 2000, (2, 7))
    with torch.no_grad():
        assert rel(wrapped(input_ids=ids).logits, original(input_ids=ids).logits) <= 1e-5
    assert cli.main(argv) == 1 and cli.main([*argv, "--moments", str(data), "--overwrite"]) == 1  # not both


def test_init_streaming_equals_capture_then_attach(tmp_path, llama_dir, data):
    streamed, whole = tmp_path / "s.safetensors", tmp_path / "w.safetensors"
    common = ("--data", str(data), "--seq-len", "16", "--batch-size", "4", "--format", "covsvd", "--metric", "full")
    assert cli.main(init_argv(llama_dir, streamed, *common, "--layerwise")) == 0
    assert cli.main(init_argv(llama_dir, whole, *common)) == 0
    a, _ = load(llama_dir)
    b, _ = load(llama_dir)
    covsvd.load_adapters(a, streamed)
    covsvd.load_adapters(b, whole)
    for (na, x), (nb, y) in zip(covsvd.adapters(a).items(), covsvd.adapters(b).items(), strict=True):
        assert na == nb
        assert rel(x.dense_weight(trained=False), y.dense_weight(trained=False)) <= 1e-6, na
        assert rel((x.U * x.S) @ x.P, (y.U * y.S) @ y.P) <= 1e-5, na


def test_launch_reads_torchrun_and_shards_every_nth_batch(monkeypatch):
    from covsvd.cli.launch import Launch

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    launch = Launch("cpu")  # not entered: no process group
    assert (launch.world, launch.rank, str(launch.device)) == (3, 1, "cpu")
    assert launch.shard(list(range(8))) == [1, 4, 7]
    with pytest.raises(ValueError, match="2 batches for 3 processes"):
        launch.shard([0, 1])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Launch("cuda")
    with pytest.raises(ValueError, match="expected cpu, cuda"):
        Launch("mps")
