"""Checkpoints on a disk that fills up: a save that would not fit is refused before writing, a
write that runs out of space (ENOSPC, injected by tests/faults/sitecustomize.py) is named as such;
either is one line, train.on_save_failure says whether the job stops (exit 4) or goes on, and the
checkpoints published before are untouched. train.keep_checkpoints says how many are kept."""

import re

from tests.jobs import TINY, fault_env, run_job
from train.checkpoint.manager import complete_checkpoints

COMMON = [*TINY, "train.steps=6", "train.ckpt_interval=2", "train.eval_interval=100", "logging.sample_tokens=0"]


def folders(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_enospc_during_a_save_is_one_line_and_the_last_checkpoint_stays(tmp_path, data_cache):
    done = run_job(
        tmp_path, data_cache, *COMMON, "run_name=full", extra_env=fault_env(SWITCHYARD_TEST_ENOSPC_IN_SAVE="4")
    )
    assert done.returncode == 4, done.stderr[-3000:]
    run = (tmp_path / "outputs/full").resolve()
    line = done.stderr.strip().splitlines()[-1]  # (before it: the data cache's first preparation, in a fresh cache)
    assert "Traceback" not in done.stderr and line.startswith("switchyard: error: "), done.stderr
    assert re.fullmatch(
        rf"switchyard: error: checkpoint at step 4 not saved: no space left on device in "
        rf"{run}/checkpoints "
        r"\(\d+ bytes free, the checkpoint needs \d+\) "
        r"\(the checkpoints saved before are intact\)",
        line,
    ), line
    assert folders(run) == ["latest", "step_000002"]  # no half-written step_000004(.tmp)
    assert (run / "checkpoints/latest").read_text() == "step_000002"
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step_000002"]


def test_with_on_save_failure_continue_training_goes_on(tmp_path, data_cache):
    done = run_job(
        tmp_path,
        data_cache,
        *COMMON,
        "run_name=goes_on",
        "train.on_save_failure=continue",
        extra_env=fault_env(SWITCHYARD_TEST_ENOSPC_IN_SAVE="4"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: checkpoint at step 4 not saved: no space left on device" in done.stdout + done.stderr
    assert "training continues (train.on_save_failure=continue)" in done.stdout + done.stderr
    run = tmp_path / "outputs/goes_on"
    assert folders(run) == ["latest", "step_000002", "step_000006"]


def test_a_save_that_would_not_fit_is_refused_before_writing(tmp_path, data_cache):
    done = run_job(
        tmp_path, data_cache, *COMMON, "run_name=small", extra_env=fault_env(SWITCHYARD_TEST_FREE_BYTES="1000")
    )
    assert done.returncode == 4, done.stderr[-3000:]
    run = (tmp_path / "outputs/small").resolve()
    assert re.fullmatch(
        rf"switchyard: error: checkpoint at step 2 not saved: {run}/checkpoints needs (\d+) bytes, "
        r"1000 are free \(the checkpoints saved before are intact\)",
        done.stderr.strip().splitlines()[-1],
    ), done.stderr
    assert "Traceback" not in done.stderr
    assert not list((run / "checkpoints").iterdir())


def test_keep_checkpoints_keeps_the_newest(tmp_path, data_cache):
    done = run_job(tmp_path, data_cache, *COMMON, "run_name=keep", "train.keep_checkpoints=3", "train.steps=8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert folders(tmp_path / "outputs/keep") == ["latest", "step_000004", "step_000006", "step_000008"]
