"""Tiny training runs shared by the Hugging Face tests: each is trained once per session, by
`python -m train` in subprocesses (so the checkpoints are whatever the job writes today), on a
small generated corpus with a BPE tokenizer trained on it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from models.config import GPTConfig, ModelConfig, MoEConfig
from models.gpt import GPT
from tests.jobs import read_metrics, run_job, val_losses

WORDS = (
    "the king queen lord land sea ship night day light dark fire water stone tree bird song old young "
    "speak hear come go give take keep hold fall rise stand walk love fear hope grief joy war peace "
    "and but or for with upon under over into from of to in on by is was shall will not"
).split()

_state: dict[str, Path] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module: these models are tiny, and intra-op threads only add overhead
    (seconds per forward on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def workdir(tmp_path_factory) -> Path:
    """One directory for every shared run, holding the corpus (written once)."""
    if "workdir" not in _state:
        root = tmp_path_factory.mktemp("hf-runs")
        rng = random.Random(0)
        lines = []
        for _ in range(900):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            lines.append(" ".join(words).capitalize() + rng.choice(".,;!?"))
        (root / "corpus.txt").write_text("\n".join(lines) + "\n")
        _state["workdir"] = root
    return _state["workdir"]


def base_overrides(root: Path) -> list[str]:
    return [
        "model=tiny",
        "moe.num_experts=4",
        "moe.expert_ffn_hidden=64",
        "data=files",
        f"data.paths=[{root / 'corpus.txt'}]",
        "data.val_fraction=0.1",
        "data.tokenizer.kind=bpe",
        "data.tokenizer.vocab_size=320",
        "train.seq_len=32",
        "train.micro_batch=4",
        "train.log_interval=1",
        "train.eval_batches=1",
        "logging.wandb.mode=disabled",
        "logging.progress_bar=false",
    ]


def trained_run(tmp_path_factory, data_cache, name: str, *overrides: str, nproc: int = 1) -> Path:
    """outputs/<name> of a run with the shared base settings and `overrides` (trained on first use)."""
    root = workdir(tmp_path_factory)
    if name not in _state:
        done = run_job(root, data_cache, *base_overrides(root), f"run_name={name}", *overrides, nproc=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        _state[name] = root / "outputs" / name
    return _state[name]


def moe_run(tmp_path_factory, data_cache) -> Path:
    """The default architecture (MoE in every block, top-2 softmax), checkpoints at steps 1 and 2."""
    return trained_run(
        tmp_path_factory, data_cache, "moe", "train.steps=2", "train.ckpt_interval=1", "train.eval_interval=2"
    )


def last_val_loss(run_dir: Path) -> float:
    losses = val_losses(read_metrics(run_dir.parent.parent, run_dir.name))
    return losses[max(losses)]


def first_val_loss(run_dir: Path) -> float:
    return val_losses(read_metrics(run_dir.parent.parent, run_dir.name))[0]


def random_model(seed: int = 0, vocab_size: int = 257, **settings) -> GPT:
    """A small GPT with weights far from their initialisation (norm gains and router included), so
    that a wrong mapping of any of them shows in the logits. `settings`: model_* / moe_* fields."""
    model_kw = {k.removeprefix("model_"): v for k, v in settings.items() if k.startswith("model_")}
    moe_kw = {k.removeprefix("moe_"): v for k, v in settings.items() if k.startswith("moe_")}
    cfg = GPTConfig(
        ModelConfig(
            **{
                "vocab_size": vocab_size,
                "max_seq_len": 48,
                "n_layers": 4,
                "d_model": 32,
                "n_heads": 4,
                "ffn_hidden": 48,
                **model_kw,
            }
        ),
        MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_ffn_hidden": 16, **moe_kw}),
    )
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)  # RMSNorm gains
            elif name.endswith("gate_ED"):
                p.normal_(0, 1.0)  # decisive routing
            else:
                p.normal_(0, 0.2)
        for layer in model.moe_layers():
            if layer.router.bias_update_rate > 0:
                layer.router.expert_bias.normal_(0, 0.3)
    return model.eval()


def generate_with_ep2(rank: int, world_size: int, expected: list[int]) -> None:
    """Rank body for tests/test_hf_generate.py: sample from `random_model()` sharded with ep=2."""
    from models.generate import generate_ids
    from parallel.dims import init_parallel
    from parallel.expert_parallel import apply_expert_parallel

    model = random_model()  # the same weights on every rank
    apply_expert_parallel(model, init_parallel(2, model.cfg.moe.num_experts, torch.device("cpu")))
    assert model.moe_layers()[0].experts.num_experts == 2  # half of the experts here
    assert generate_ids(model, list(b"To be"), 12, temperature=0.8, top_k=20, seed=5) == expected


def _memory_kib() -> dict[str, int]:
    """This process's resident memory now (VmRSS) and its peak since the last reset (VmHWM), KiB."""
    import re

    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(key + r":\s+(\d+)", status)[1]) for key in ("VmRSS", "VmHWM")}


def import_with_ep4(rank: int, world_size: int, hf_dir: str, checkpoint_bytes: int, expert_bytes: int) -> None:
    """Rank body for tests/test_hf_import.py: the job's import (load_initial_weights into a trainer
    from parallel.parallelize, ep=4) reads only this rank's experts, and its peak resident memory
    stays below the whole checkpoint's bytes."""
    from parallel.dims import init_parallel
    from parallel.parallelize import parallelize
    from train.config import JobConfig
    from train.data.tokenizer import Tokenizer
    from train.hf import importing as import_hf
    from train.hf.files import SafetensorsWeights
    from train.hf.init_from import load_initial_weights

    torch.set_num_threads(1)
    source = import_hf.read_hf_config(hf_dir).cfg
    job = JobConfig(model=source.model, moe=source.moe)
    job.model.init_from = f"hf:{hf_dir}"
    dims = init_parallel(4, job.moe.num_experts, torch.device("cpu"))
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    trainer = parallelize(model, dims, job)

    readers = []

    class CountingWeights(SafetensorsWeights):  # every reader the import opens, to count its bytes
        def __init__(self, *args):
            super().__init__(*args)
            readers.append(self)

    import_hf.SafetensorsWeights = CountingWeights
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _memory_kib()
    load_initial_weights(trainer, job, Tokenizer())
    peak_bytes = (_memory_kib()["VmHWM"] - before["VmRSS"]) * 1024
    read = sum(r.bytes_read for r in readers)
    # The dense weights whole, a quarter of the experts (each of them once).
    assert read == checkpoint_bytes - expert_bytes + expert_bytes // 4, (rank, read, checkpoint_bytes)
    assert peak_bytes < checkpoint_bytes, (rank, peak_bytes, checkpoint_bytes)

    # The weights landed: this rank's experts are the source's rows for its experts.
    from parallel.zero import local_tensor

    _, whole = import_hf.load_hf_weights(hf_dir)
    name = "blocks.0.ffn.experts.w1_EDF"
    experts = trainer.experts[name.rsplit(".", 1)[0]]
    first, local = experts.first_expert, experts.num_experts
    assert local == job.moe.num_experts // 4
    mine = local_tensor(dict(trainer.named_expert_parameters)[name]).detach()
    assert torch.equal(mine, whole[name][first : first + local]), (
        rank,
        first,
        (mine - whole[name][first : first + local]).abs().max(),
    )

    # The measure sees an import that reads everything: reading and stacking all experts exceeds it.
    Path("/proc/self/clear_refs").write_text("5")
    before = _memory_kib()
    everything = import_hf.load_hf_weights(hf_dir)
    assert (_memory_kib()["VmHWM"] - before["VmRSS"]) * 1024 > checkpoint_bytes
    del everything
