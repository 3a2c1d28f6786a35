"""The table of bad input: every setting, data file and cache file a user can get wrong, and the
one line Switchyard answers with. Add a row with every new setting.

Settings are checked in-process, exactly as `python -m train` checks them before any heavy work
(the config composed by Hydra from conf/ with the overrides, then `check_job`); a few real runs
prove the end-to-end behaviour: that line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from tests.jobs import REPO, TINY, job_env, run_job
from train import data
from train.check import check_job
from train.cli import compose_job

# (overrides, the error line or its start, world size). {tmp} is the test's folder, {file} a
# regular file in it (so a path below it cannot be created, even by root).
BAD_SETTINGS = [
    # typos and types (Hydra's schema, and keys added with +)
    (["+train.stepz=50"], "train.stepz: no such setting (did you mean train.steps?)", 1),
    (["+foo=1"], "foo: no such setting; the top level has: model, moe,", 1),
    (["moe.no_such_key=1"], "moe.no_such_key: no such setting; moe has: num_experts,", 1),
    (["+optim.betas=[0.9,0.95]"], "optim.betas: no such setting (did you mean optim.beta2 or optim.beta1?)", 1),
    (["moe.z_loss_coef=abc"], "moe.z_loss_coef: Value 'abc' of type 'str' could not be converted to Float", 1),
    (["train.steps=inf"], "train.steps: Value 'inf' of type 'float' could not be converted to Integer", 1),
    (["train.steps=["], "cannot parse the override 'train.steps=['", 1),
    (
        ["model=huge"],
        "model=huge: no such option "
        "(conf/model/ has: mixtral_8x7b, olmoe_1b_7b, qwen1_5_moe_a2_7b, qwen3_30b_a3b, small, tiny)",
        1,
    ),
    (["moe.top_k=${nope}"], "moe.top_k: Interpolation key 'nope' not found", 1),
    # model
    (["model.d_model=100", "model.n_heads=3"], "model.d_model (100) must be divisible by model.n_heads (3)", 1),
    (
        ["model.d_model=96", "model.n_heads=32"],
        "model.d_model / model.n_heads must be even for rotary embeddings; got head size 3",
        1,
    ),
    (["model.d_model=1000000"], "model.d_model must be an integer between 1 and 65536; got 1000000", 1),
    (["model.n_layers=0"], "model.n_layers must be an integer between 1 and 1024; got 0", 1),
    (["model.n_layers=5000"], "model.n_layers must be an integer between 1 and 1024; got 5000", 1),
    (["model.ffn_hidden=-1"], "model.ffn_hidden must be an integer between 1 and 1048576; got -1", 1),
    (["model.activation=relu"], "model.activation must be one of 'swiglu', 'gelu'; got 'relu'", 1),
    (["model.rope_theta=0"], "model.rope_theta must be a finite number > 0; got 0.0", 1),
    (["model.rope_theta=inf"], "model.rope_theta must be a finite number; got inf", 1),
    (["model.norm_eps=0"], "model.norm_eps must be a finite number > 0; got 0.0", 1),
    (["model.init_std=nan"], "model.init_std must be a finite number; got nan", 1),
    (["model.init_std=-0.02"], "model.init_std must be a finite number >= 0; got -0.02", 1),
    (
        ["model.n_kv_heads=3"],
        "model.n_kv_heads (3) must divide model.n_heads (4): each key/value head serves the same number of query heads",
        1,
    ),
    (["model.n_kv_heads=8"], "model.n_kv_heads must be an integer between 1 and model.n_heads (4); got 8", 1),
    (["model.head_dim=7"], "model.head_dim must be even for rotary embeddings; got 7", 1),
    (["model.qk_norm=layer"], "model.qk_norm must be one of 'none', 'head', 'projection'; got 'layer'", 1),
    (["model.qkv_bias=maybe"], "model.qkv_bias: Value 'maybe' is not a valid bool", 1),
    (["model.rope_scaling.type=yarn"], "model.rope_scaling.type must be one of 'none', 'llama3'; got 'yarn'", 1),
    (
        ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=0.5"],
        "model.rope_scaling.factor must be a finite number >= 1; got 0.5",
        1,
    ),
    (
        ["model.rope_scaling.type=llama3", "model.rope_scaling.high_freq_factor=0.5"],
        "model.rope_scaling.high_freq_factor (0.5) must be greater than model.rope_scaling.low_freq_factor (1)",
        1,
    ),
    # moe
    (["moe.top_k=0"], "moe.top_k must be an integer between 1 and moe.num_experts (4); got 0", 1),
    (["moe.top_k=9", "moe.num_experts=8"], "moe.top_k must be an integer between 1 and moe.num_experts (8); got 9", 1),
    (["moe.num_experts=0"], "moe.num_experts must be an integer between 1 and 65536; got 0", 1),
    (["moe.num_experts=100000"], "moe.num_experts must be an integer between 1 and 65536; got 100000", 1),
    (
        ["moe.expert_ffn_hidden=10000000"],
        "moe.expert_ffn_hidden must be an integer between 1 and 1048576; got 10000000",
        1,
    ),
    (["moe.num_shared_experts=-1"], "moe.num_shared_experts must be an integer between 0 and 65536; got -1", 1),
    (["moe.every=0"], "moe.every must be an integer >= 1; got 0", 1),
    (["moe.aux_loss_coef=-1"], "moe.aux_loss_coef must be a finite number >= 0; got -1.0", 1),
    (["moe.z_loss_coef=nan"], "moe.z_loss_coef must be a finite number; got nan", 1),
    (["moe.bias_update_rate=inf"], "moe.bias_update_rate must be a finite number; got inf", 1),
    (["moe.jitter=1"], "moe.jitter must be in [0, 1); got 1.0", 1),
    (["moe.capacity_factor=0"], "moe.capacity_factor must be null (dropless) or a number > 0; got 0.0", 1),
    (["moe.capacity_factor=inf"], "moe.capacity_factor must be a finite number; got inf", 1),
    (["moe.score=relu"], "moe.score must be one of 'softmax', 'sigmoid'; got 'relu'", 1),
    (
        ["moe.aux_loss_scope=batch"],
        "moe.aux_loss_scope must be one of 'micro_batch', 'sequence', 'global_batch'; got 'batch'",
        1,
    ),
    (
        ["moe.shared_expert_gate=true"],
        "moe.shared_expert_gate=true gates the shared experts, but moe.num_shared_experts=0; "
        "set moe.num_shared_experts >= 1 or moe.shared_expert_gate=false",
        1,
    ),
    (["moe.backend=cutlass"], "moe.backend must be one of 'torch', 'megablocks'; got 'cutlass'", 1),
    (["moe.backend=megablocks"], "moe.backend=megablocks needs CUDA and the megablocks package", 1),
    # optimizer, named by its Hydra keys (torch would say "Invalid beta parameter at index 0")
    (["optim.lr=0"], "optim.lr must be a finite number > 0; got 0.0", 1),
    (["optim.lr=inf"], "optim.lr must be a finite number; got inf", 1),
    (["optim.lr=nan"], "optim.lr must be a finite number; got nan", 1),
    (["optim.beta1=1.5"], "optim.beta1 must be in [0, 1); got 1.5", 1),
    (["optim.beta2=1"], "optim.beta2 must be in [0, 1); got 1.0", 1),
    (["optim.beta2=-0.1"], "optim.beta2 must be in [0, 1); got -0.1", 1),
    (["optim.eps=0"], "optim.eps must be a finite number > 0; got 0.0", 1),
    (["optim.weight_decay=-0.1"], "optim.weight_decay must be a finite number >= 0; got -0.1", 1),
    (["optim.grad_clip=-1"], "optim.grad_clip must be a finite number >= 0; got -1.0", 1),
    (["optim.grad_clip=inf"], "optim.grad_clip must be a finite number; got inf", 1),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio must be in [0, 1]; got 2.0", 1),
    (["optim.warmup_steps=-1"], "optim.warmup_steps must be an integer >= 0; got -1", 1),
    # train
    (["train.steps=0"], "train.steps must be an integer between 1 and 1099511627776; got 0", 1),
    (
        ["train.activation_checkpointing=sometimes"],
        "train.activation_checkpointing must be one of 'none', 'full', 'moe'; got 'sometimes'",
        1,
    ),
    (
        ["train.activation_checkpointing="],
        "train.activation_checkpointing must be one of 'none', 'full', 'moe'; got ''",
        1,
    ),
    (["logging.sample_tokens=-1"], "logging.sample_tokens must be an integer between 0 and", 1),
    (["logging.sample_prompt="], "logging.sample_prompt must be non-empty text when logging.sample_tokens > 0", 1),
    (["train.micro_batch=0"], "train.micro_batch must be an integer between 1 and 1048576; got 0", 1),
    (["train.grad_accum=10000000"], "train.grad_accum must be an integer between 1 and 1048576; got 10000000", 1),
    (["train.seq_len=2000000"], "train.seq_len must be an integer between 1 and 1048576; got 2000000", 1),
    (["train.seq_len=128", "model.max_seq_len=64"], "train.seq_len (128) must be <= model.max_seq_len (64)", 1),
    (["train.eval_batches=0"], "train.eval_batches must be an integer between 1 and 1048576; got 0", 1),
    (["train.log_interval=0"], "train.log_interval must be an integer between 1 and 1099511627776; got 0", 1),
    (["train.max_bad_steps=0"], "train.max_bad_steps must be an integer between 1 and 1099511627776; got 0", 1),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints must be an integer between 1 and 1099511627776; got 0", 1),
    (["train.on_save_failure=retry"], "train.on_save_failure must be one of 'stop', 'continue'; got 'retry'", 1),
    (["train.global_batch=0"], "train.global_batch must be an integer between 1 and 1048576; got 0", 1),
    (
        ["train.global_batch=6"],
        "train.global_batch=6 must be a multiple of the number of processes (4): each rank takes an equal share",
        4,
    ),
    (
        ["train.global_batch=8", "train.grad_accum=2"],
        "train.grad_accum=2: with train.global_batch set, grad_accum follows from it",
        1,
    ),
    (["train.stop_at=0"], "train.stop_at must be an integer between 1 and 1099511627776; got 0", 1),
    (["train.seed=-1"], "train.seed must be an integer between 0 and 9223372036854775807; got -1", 1),
    (
        ["train.seed=9223372036854775808"],
        "train.seed must be an integer between 0 and 9223372036854775807; got 9223372036854775808",
        1,
    ),
    (["train.peak_tflops=0"], "train.peak_tflops must be a finite number > 0; got 0.0", 1),
    (["train.peak_tflops=nan"], "train.peak_tflops must be a finite number; got nan", 1),
    (["train.device=tpu"], "train.device must be one of 'auto', 'cpu', 'cuda'; got 'tpu'", 1),
    (["train.dtype=fp8"], "train.dtype must be one of 'auto', 'fp32', 'bf16'; got 'fp8'", 1),
    # data (settings; the files themselves are in BAD_FILES)
    (["data.corpus=web"], "data.corpus must be one of 'classics', 'files', 'hub'; got 'web'", 1),
    (["data.val_fraction=0"], "data.val_fraction must be in (0, 1); got 0.0", 1),
    (["data.val_fraction=nan"], "data.val_fraction must be a finite number; got nan", 1),
    (["data.num_proc=0"], "data.num_proc must be an integer >= 1; got 0", 1),
    (
        ["data.tokenizer.kind=bpe", "data.tokenizer.vocab_size=100"],
        "data.tokenizer.vocab_size must be an integer between 257 and 1048576; got 100",
        1,
    ),
    (
        ["data.tokenizer.kind=bpe", "data.tokenizer.vocab_size=100000000000"],
        "data.tokenizer.vocab_size must be an integer between 257 and 1048576; got 100000000000",
        1,
    ),
    (["data.tokenizer.kind=file"], "data.tokenizer.path must be set when data.tokenizer.kind='file'", 1),
    (
        ["data.tokenizer.kind=file", "data.tokenizer.path=/nonexistent/tokenizer.json"],
        "data.tokenizer.path: file not found: /nonexistent/tokenizer.json",
        1,
    ),
    (["data=files"], "data.paths must list at least one file when data.corpus='files'", 1),
    (["data=files", "data.paths=[/nonexistent/corpus.txt]"], "data.paths: file not found: /nonexistent/corpus.txt", 1),
    (["data=files", "data.paths=[{tmp}]"], "data.paths: {tmp} is a directory; list the files in it", 1),
    (["data=files", "data.paths=[{file}]"], "data.paths: {file}: extension must be one of '.txt',", 1),
    (["data.corpus=hub"], "data.hub_name must be set when data.corpus='hub'", 1),
    (
        ["data.domain_field=source"],
        "data.domain_field applies to data.corpus=files or hub; the classics corpus labels its "
        "documents itself (shakespeare, bible): leave it null (got 'source')",
        1,
    ),
    (
        ["data=files", "data.paths=[{tmp}/rows.jsonl]", "data.domain_field=''"],
        "data.domain_field must name the column that holds each row's domain, or be null; got ''",
        1,
    ),
    (
        ["data=files", "data.paths=[{tmp}/rows.jsonl]", "data.domain_field=text"],
        "data.domain_field must name a column other than data.text_field ('text')",
        1,
    ),
    (
        ["data=files", "data.paths=[{tmp}/rows.jsonl,{tmp}/book.txt]", "data.domain_field=source"],
        "data.domain_field='source': {tmp}/book.txt is a text file, whose document has no fields; give the documents "
        "as .jsonl/.json/.parquet rows with a 'source' column",
        1,
    ),
    # places the job writes to
    (["data.cache_dir={file}/cache"], "data.cache_dir: cannot write to {file}/cache: {file} is not a directory", 1),
    (["hydra.run.dir={file}/run"], "run directory: cannot write to {file}/run: {file} is not a directory", 1),
    (
        ["hydra.run.dir={tmp}"],
        "checkpoint directory: cannot write to {tmp}/checkpoints: {tmp}/checkpoints is not a directory",
        1,
    ),
    # processes
    (["parallel.ep=0"], "parallel.ep must be an integer between 1 and 65536; got 0", 1),
    (["parallel.ep=3"], "parallel.ep (3) must divide the number of processes (1)", 1),
    (["parallel.ep=3"], "parallel.ep (3) must divide the number of processes (4)", 4),
    (["parallel.ep=4", "moe.num_experts=6", "moe.top_k=2"], "parallel.ep (4) must divide moe.num_experts (6)", 4),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage must be one of 0, 1, 2, 3; got 4", 1),
    (["logging.wandb.mode=cloud"], "logging.wandb.mode must be one of 'offline', 'online', 'disabled'; got 'cloud'", 1),
]


def _fill(text: str, tmp_path) -> str:
    return text.replace("{tmp}", str(tmp_path)).replace("{file}", str(tmp_path / "a-file"))


@pytest.mark.parametrize("overrides,expected,world_size", BAD_SETTINGS, ids=[" ".join(c[0]) for c in BAD_SETTINGS])
def test_bad_setting_is_refused_with_one_line(tmp_path, overrides, expected, world_size):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "checkpoints").write_text("a file where the checkpoint folder goes")
    (tmp_path / "rows.jsonl").write_text('{"text": "a", "source": "x"}\n')  # good data files, for settings about them
    (tmp_path / "book.txt").write_text("a")
    where = [f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    with pytest.raises(ValueError) as refused:
        check_job(compose_job([*TINY, *where, *(_fill(o, tmp_path) for o in overrides)]), world_size)
    message = str(refused.value)
    assert message.startswith(_fill(expected, tmp_path)), message
    assert "\n" not in message


def test_good_settings_pass_the_check(tmp_path):
    """The other side of the table: defaults, the README's examples and every conf/ option."""
    where = [f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    for overrides in (
        [],
        ["moe=deepseek"],
        ["moe=switch"],
        ["model=tiny", "train.steps=50"],
        ["deepspeed=zero3"],
        ["moe.every=2"],
        ["moe.every=9"],
        ["optim.beta1=0", "optim.grad_clip=0", "optim.warmup_steps=0"],
        ["train.seed=0"],
        ["train.seed=9223372036854775807"],
        ["data.tokenizer.vocab_size=1048576"],
        ["hydra/launcher=slurm"],
        ["run_name=other"],
        ["train.global_batch=24", "train.async_save=true"],
        ["train.on_save_failure=continue", "train.keep_checkpoints=1"],
    ):
        check_job(compose_job([*where, *overrides]))
    check_job(compose_job([*where, "parallel.ep=2"]), world_size=4)
    assert not (tmp_path / "run").exists()  # checking creates nothing


def test_unwritable_folder_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(
        ValueError, match=f"^data.cache_dir: cannot write to {locked}/cache: cannot create a file in {locked}"
    ):
        check_job(compose_job([*TINY, f"data.cache_dir={locked}/cache", f"hydra.run.dir={tmp_path / 'run'}"]))


# ---------------------------------------------------------------------------------------------
# Data files: (name, bytes, the error after "data.paths: <file>: ")
# ---------------------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
BAD_FILES = [
    ("image.txt", PNG, "line 1: byte 0x89 at offset 0 is not UTF-8"),
    ("nul.txt", b"some text\nand a NUL \x00 here\n", "line 2: a NUL byte at offset 20: binary data, not text"),
    ("latin1.txt", "café\n".encode() + "café\n".encode("latin-1"), "line 2: byte 0xe9 at offset 9 is not UTF-8"),
    ("utf16.txt", "hello\n".encode("utf-16"), "line 1: byte 0xff at offset 0 is not UTF-8"),
    ("cut.txt", "ok\n".encode() + "€".encode()[:2], "line 2: byte 0xe2 at offset 3 is not UTF-8"),
    (
        "rows.jsonl",
        b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n',
        "line 3: not JSON (Expecting ',' delimiter at column 13)",
    ),
    ("array_row.jsonl", b'{"text": "a"}\n["b"]\n', "line 2: a JSON object (one row) expected, got an array"),
    ("number.jsonl", b'{"text": "a"}\n{"text": 5}\n', "line 2: data.text_field 'text' holds a number, not text"),
    ("latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', "line 2: byte 0xe9 at offset 27 is not UTF-8"),
    ("table.json", b"a,b\n1,2\n", "line 1: not JSON (Expecting value at column 1)"),
    ("cut.json", b'[{"text": "a"}, {"text": "b"', "line 1: not JSON (Expecting ',' delimiter at column 29)"),
    ("text.parquet", b"these are not the bytes of a parquet file", "not a Parquet file (Parquet magic bytes not found"),
]


def files_cfg(tmp_path, paths):
    tok = SimpleNamespace(kind="bytes", vocab_size=8192, path=None, name=None)
    return SimpleNamespace(
        corpus="files",
        paths=[str(p) for p in paths],
        hub_name=None,
        text_field="text",
        val_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
        num_proc=1,
        tokenizer=tok,
    )


@pytest.mark.parametrize("name,content,expected", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_hostile_data_file_is_named_with_its_line(tmp_path, name, content, expected):
    good = tmp_path / "good.txt"
    good.write_text("a good document comes first\n" * 20)
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(ValueError) as refused:
        data.prepare_data(files_cfg(tmp_path, [good, bad]))
    assert str(refused.value).startswith(f"data.paths: {bad}: {expected}"), str(refused.value)
    assert "\n" not in str(refused.value)
    assert not [p for p in os.listdir(tmp_path / "cache") if ".tmp-" in p]  # no half-built cache left


# ---------------------------------------------------------------------------------------------
# The token cache: a damaged prepared directory is rebuilt, with a log line
# ---------------------------------------------------------------------------------------------


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGE = [
    ("train.bin", _truncate),
    ("val.bin", os.remove),
    ("train.bin", lambda p: open(p, "wb").close()),
    ("meta.json", lambda p: open(p, "wb").close()),
    ("meta.json", lambda p: open(p, "wb").write(os.urandom(64))),
    ("meta.json", lambda p: open(p, "w").write(json.dumps({"dtype": "uint16"}))),
    ("tokenizer.json", lambda p: open(p, "wb").write(os.urandom(64))),
]


@pytest.mark.parametrize("name,damage", DAMAGE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DAMAGE)])
def test_damaged_token_cache_is_rebuilt(tmp_path, caplog, name, damage):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    cfg = files_cfg(tmp_path, [corpus])
    cfg.tokenizer.kind, cfg.tokenizer.vocab_size = "bpe", 300  # so that there is a tokenizer.json
    first = data.prepare_data(cfg)
    train, val = np.array(first.train), np.array(first.val)
    damage(os.path.join(first.cache_path, name))
    with caplog.at_level(logging.WARNING, logger="train.data.prepare"):
        again = data.prepare_data(cfg)
    assert again.cache_path == first.cache_path
    assert np.array_equal(again.train, train) and np.array_equal(again.val, val)
    assert f"the prepared data in {first.cache_path} is damaged" in caplog.text
    assert "rebuilding it" in caplog.text


# ---------------------------------------------------------------------------------------------
# End to end: what a user sees
# ---------------------------------------------------------------------------------------------

END_TO_END = [
    (["+train.stepz=50"], "train.stepz: no such setting (did you mean train.steps?)"),  # checked in the job
    (["moe.z_loss_coef=abc"], "moe.z_loss_coef: Value 'abc' of type 'str'"),  # Hydra's composition error
    (["optim.beta1=1.5"], "optim.beta1 must be in [0, 1); got 1.5"),  # validation
    (["hydra.run.dir={file}/run"], "cannot create the run directory: {file}/run"),  # Hydra creating the folder
    (["train.resume=true", "run_name=never-ran"], "train.resume"),  # set-up: no checkpoint to resume from
    (["data=files", "data.paths=[{tmp}/rows.jsonl]"], "data.paths: {tmp}/rows.jsonl: line 2: not JSON"),  # data
]


def assert_one_error_line(done: subprocess.CompletedProcess, expected: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("switchyard: error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-3000:]


@pytest.mark.parametrize("overrides,expected", END_TO_END, ids=[c[0][0] for c in END_TO_END])
def test_bad_input_ends_the_job_with_one_line_and_exit_code_2(tmp_path, data_cache, overrides, expected):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"text": \n')
    done = run_job(tmp_path, data_cache, *TINY, *(_fill(o, tmp_path) for o in overrides), timeout=180)
    assert_one_error_line(done, _fill(expected, tmp_path))
    assert done.stderr.rstrip().splitlines()[-1].startswith("switchyard: error:")  # the last word


def test_launchers_check_the_settings_before_starting_workers(tmp_path, data_cache):
    env = job_env(data_cache)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])
    done = subprocess.run(
        ["bash", str(REPO / "launch/torchrun.sh"), "4", *TINY, "parallel.ep=3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_error_line(done, "parallel.ep (3) must divide the number of processes (4)")
    assert (
        done.stderr.strip()
        == "switchyard: error: parallel.ep (3) must divide the number of processes (4); allowed: divisors of 4"
    )
    # SLURM: 2 nodes x 2 processes; no scontrol or srun on PATH: the check comes before either.
    slurm = {
        **env,
        "SLURM_JOB_ID": "7",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SWITCHYARD_PROCS_PER_NODE": "2",
    }
    done = subprocess.run(
        ["bash", str(REPO / "launch/slurm.sbatch"), *TINY, "parallel.ep=3"],
        cwd=tmp_path,
        env=slurm,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_error_line(done, "parallel.ep (3) must divide the number of processes (4)")
    assert not (tmp_path / "outputs").exists()  # no worker ever started
