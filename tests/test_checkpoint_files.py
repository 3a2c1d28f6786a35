"""Damaged, missing and crafted checkpoint files: one line naming the file and what to do, nothing
overwritten, and nothing unpickled that could run code. The checks run before any heavy work, so
most cases are exercised in-process on a checkpoint written by a real (tiny) run."""

import json
import os
import pickle
import shutil
import zlib
from pathlib import Path

import pytest
import torch

from parallel.dims import ParallelDims
from tests.jobs import TINY, run_job
from train.checkpoint.manager import CheckpointError, CheckpointManager, read_tensors
from train.config import JobConfig

ONE_PROCESS = ParallelDims(world_size=1, rank=0, local_rank=0, ep=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, data_cache):
    workdir = tmp_path_factory.mktemp("ckpt-files")
    done = run_job(
        workdir, data_cache, *TINY, "run_name=src", "train.steps=4", "train.ckpt_interval=2", "train.eval_interval=4"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir / "outputs/src"


@pytest.fixture
def run_dir(saved_run, tmp_path):
    copy = tmp_path / "outputs/src"
    shutil.copytree(saved_run, copy)
    return copy


def tiny_job(run_dir: Path) -> JobConfig:
    job = JobConfig(run_dir=str(run_dir))
    job.model.vocab_size, job.model.n_layers, job.model.d_model, job.model.ffn_hidden = 257, 2, 64, 128
    job.moe.num_experts, job.moe.expert_ffn_hidden = 4, 64
    job.train.resume = True
    return job


def resume_point(run_dir: Path):
    return CheckpointManager(run_dir / "checkpoints", tiny_job(run_dir), ONE_PROCESS).resume_point()


class MakesAMarker:
    """Unpickling this creates a file: what a crafted checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def rewrite_with_matching_digest(folder: Path, name: str, data: bytes) -> None:
    """Replace a file and fix meta.json's size and CRC, as an attacker would."""
    (folder / name).write_bytes(data)
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"][name] = [len(data), zlib.crc32(data)]
    (folder / "meta.json").write_text(json.dumps(meta))


def test_an_intact_checkpoint_is_found(run_dir):
    point = resume_point(run_dir)
    assert point.folder.name == "step_000004" and point.meta["step"] == 4


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "zero_bytes": lambda data: b"",
    "random_bytes": lambda data: os.urandom(len(data)),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata"])
def test_a_damaged_file_is_named(run_dir, name, damage):
    path = run_dir / "checkpoints/step_000004" / name
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(CheckpointError) as err:
        resume_point(run_dir)
    message = str(err.value)
    assert str(path) in message and "delete" in message and "\n" not in message


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_meta_json_falls_back_to_the_previous_checkpoint(run_dir, damage, capsys):
    path = run_dir / "checkpoints/step_000004/meta.json"
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    assert resume_point(run_dir).folder.name == "step_000002"
    assert f"{path} is missing or damaged; resuming from step_000002" in capsys.readouterr().out


def test_latest_naming_a_missing_folder_falls_back_and_says_so(run_dir, capsys):
    (run_dir / "checkpoints/latest").write_text("step_000009")
    assert resume_point(run_dir).folder.name == "step_000004"
    assert "names step_000009, which does not exist; resuming from step_000004" in capsys.readouterr().out
    (run_dir / "checkpoints/latest").write_bytes(os.urandom(64))
    assert resume_point(run_dir).folder.name == "step_000004"


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda meta: meta.update(format=99), "format 99"),
        (lambda meta: meta.pop("format"), "format 1"),
        (lambda meta: meta.pop("files"), "lists no files"),
    ],
)
def test_a_checkpoint_of_another_format_is_refused(run_dir, change, words):
    path = run_dir / "checkpoints/step_000004/meta.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=words):
        resume_point(run_dir)


def test_a_missing_shard_is_named(run_dir):
    (run_dir / "checkpoints/step_000004/__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="__0_0.distcp is missing"):
        resume_point(run_dir)


@pytest.mark.parametrize("name", [".metadata", "__0_0.distcp"])
def test_a_crafted_pickle_is_refused_without_running(run_dir, tmp_path, name):
    marker = tmp_path / "pwned"
    folder = run_dir / "checkpoints/step_000004"
    rewrite_with_matching_digest(folder, name, pickle.dumps(MakesAMarker(marker)))
    with pytest.raises(CheckpointError, match="refus|could not be read"):
        read_tensors(folder)
    assert not marker.exists()


def test_a_crafted_checkpoint_stops_the_job_with_one_line(run_dir, data_cache):
    marker = run_dir.parent / "pwned"
    rewrite_with_matching_digest(run_dir / "checkpoints/step_000004", ".metadata", pickle.dumps(MakesAMarker(marker)))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "checkpoints").rglob("*"))
    done = run_job(
        run_dir.parent.parent, data_cache, *TINY, "run_name=src", "train.steps=6", "train.resume=true", timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("switchyard: error:")
        and "asks to unpickle" in last
        and "open, which a checkpoint never needs" in last
    ), last
    assert "Traceback" not in done.stderr and not marker.exists()
    assert (
        sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "checkpoints").rglob("*")) == before
    )  # nothing overwritten


def test_the_model_signature_covers_the_attention_settings(run_dir):
    """A checkpoint written before the signature had the attention keys resumes (they were the defaults);
    one saved with other key/value heads is refused by name, before any tensor is read."""
    path = run_dir / "checkpoints/step_000004/meta.json"
    meta = json.loads(path.read_text())
    for key in ("model.n_kv_heads", "model.head_dim", "model.qk_norm", "model.qkv_bias", "moe.shared_expert_gate"):
        meta["model_signature"].pop(key)
    path.write_text(json.dumps(meta))
    assert resume_point(run_dir).folder.name == "step_000004"
    meta["model_signature"]["model.n_kv_heads"] = 2
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"saved with model\.n_kv_heads=2, this run has model\.n_kv_heads=None"):
        resume_point(run_dir)
