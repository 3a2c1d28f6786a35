"""Quiet by default, files a team can share: what real runs print and write.

- a default-length run (with its progress bar setting on) whose output is not a terminal prints
  plain progress lines, no carriage return, no DeepSpeed accelerator banner and no dead-expert
  warning during the router's warm-up;
- what it writes (checkpoints, metrics, the token cache, an export) follows the umask;
- a bad .jsonl and an unreachable hub corpus end with Switchyard's one line and nothing else.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

from tests.jobs import TINY, job_env, run_job
from train.logging import progress_line

QUIET_RUN = [o for o in TINY if o not in ("logging.progress_bar=false", "train.log_interval=1")] + [
    "logging.progress_bar=true",
    "train.log_interval=2",
    "train.steps=6",
    "train.eval_interval=6",
    "train.ckpt_interval=6",
    "logging.sample_tokens=0",
    "run_name=quiet",
]


def _modes(root):
    """{path relative to root: permission bits} of root and everything under it."""
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def test_a_run_into_a_log_file_is_plain_and_its_files_follow_the_umask(tmp_path, data_cache):
    done = subprocess.run(
        [sys.executable, "-m", "train", *QUIET_RUN],
        cwd=tmp_path,
        env=job_env(data_cache),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: os.umask(0o002),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "\r" not in output  # no progress bar redrawn in a log file
    assert "Setting accelerator to CPU" not in output
    assert "got no token" not in output  # 6 steps are inside the default 30-step warm-up
    progress = [line for line in done.stdout.splitlines() if line.startswith("train: step ")]
    assert [line.split(",")[0] for line in progress] == [
        "train: step 2/6 (33%)",
        "train: step 4/6 (66%)",
        "train: step 6/6 (100%)",
    ]
    assert "loss=" in progress[0] and "eta" in progress[0]
    assert done.stderr.strip() == "", done.stderr[-3000:]  # nothing on stderr when all is well

    # Everything the run wrote is what umask 002 gives: group-writable, world-readable.
    run_dir = tmp_path / "outputs" / "quiet"
    for path, mode in _modes(run_dir).items():
        assert mode in (0o775, 0o664), (path, oct(mode))

    # An export made under umask 022 is readable by everyone (mkdtemp and safetensors made it 0700/0600).
    old = os.umask(0o022)
    try:
        from train.export_hf import export_hf

        export_hf(run_dir, tmp_path / "hf" / "quiet")
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "hf" / "quiet")
    assert "model.safetensors" in modes and "config.json" in modes
    for path, mode in modes.items():
        assert mode == (0o755 if (tmp_path / "hf" / "quiet" / path).is_dir() else 0o644), (path, oct(mode))


def test_the_token_cache_follows_the_umask(tmp_path):
    from train.config import DataConfig
    from train.data.prepare import prepare_data

    (tmp_path / "a.txt").write_text("to be or not to be\n" * 50)
    cfg = DataConfig(corpus="files", paths=[str(tmp_path / "a.txt")], cache_dir=str(tmp_path / "cache"), num_proc=1)
    cfg.tokenizer.kind = "bytes"
    old = os.umask(0o027)
    try:
        prepare_data(cfg)
    finally:
        os.umask(old)
    prepared = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "hf"]
    assert len(prepared) == 1
    for path, mode in _modes(prepared[0]).items():
        assert mode == (0o750 if (prepared[0] / path).is_dir() else 0o640), (path, oct(mode))


def test_a_bad_jsonl_gets_switchyards_line_only(tmp_path, data_cache):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(6)) + '{"text": \n')
    done = run_job(tmp_path, data_cache, *TINY, "data=files", f"data.paths=[{rows}]", timeout=300)
    assert done.returncode == 2
    line = (
        f"switchyard: error: data.paths: {rows}: line 7: not JSON (Expecting value at column 10); "
        "expected one JSON object per line"
    )
    assert done.stderr.strip() == line
    assert "ERROR" not in done.stdout and "row 6" not in done.stdout and "\r" not in done.stdout


def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path, data_cache):
    import socket

    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in job_env(data_cache).items() if "proxy" not in k.lower() and not k.endswith("_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    done = subprocess.run(
        [sys.executable, "-m", "train", *TINY, "data.corpus=hub", "data.hub_name=someone/stories"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"switchyard: error: data.hub_name='someone/stories': cannot reach the Hugging Face Hub at 127.0.0.1:{port} "
        "(Connection refused); it needs network access (or use data.corpus=files, or set HF_HUB_OFFLINE=1 to use a "
        "copy already downloaded)"
    )
    assert "Retrying" not in done.stdout


def test_progress_line_by_hand():
    line = progress_line(20, 400, 0, 29.0, {"loss": "3.952", "tok/s": "1,714"})
    assert line == "train: step 20/400 (5%), loss=3.952, tok/s=1,714, 0:29 elapsed, eta 9:11"
    assert progress_line(110, 400, 100, 3700.0, {}) == "train: step 110/400 (27%), 1:01:40 elapsed, eta 29:48:20"


def test_sacct_failures_are_said_once():
    from hydra_plugins.switchyard_launcher.slurm import say_sacct_failures_once

    logger = logging.getLogger("test-submitit")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    say_sacct_failures_once(logger)
    say_sacct_failures_once(logger)  # a second sweep in the same process adds no second filter
    for call in (1, 2, 3):
        logger.warning(f"Call #{call} - Bypassing sacct error boom, status may be inaccurate.")
    logger.warning("something else")
    assert [r.getMessage() for r in records] == [
        "Call #1 - Bypassing sacct error boom, status may be inaccurate. "
        "(said once; submitit still collects every job's result)",
        "something else",
    ]
