"""`model.init_from`: where a fresh run's initial weights come from.

    null               random initialisation from train.seed (the default)
    hf:HF_DIR          a transformers directory of the same architecture (train/import_hf.py prints
                       the overrides that match it)
    upcycle:SOURCE     a dense model, a Switchyard run directory (moe.every > model.n_layers) or a
                       dense transformers Llama/Arcee directory, turned into this run's MoE model
                       (Komatsuzaki et al., "Sparse Upcycling"): every expert of a block starts as a
                       copy of that block's dense FFN, dense blocks and everything else are copied.

Why upcycling keeps the function at step 0: the k experts a token is routed to are identical and
their renormalised weights sum to 1, so the MoE output equals the dense FFN's whatever the router
says. The router therefore keeps its random initialisation (tokens spread over experts from the
first step, so the copies diverge), shared experts start with a zero output projection, and
`moe.normalize_topk=true` and `moe.capacity_factor=null` are required.

`check_init_from` runs in the pre-flight (train/preflight.py: configs only, before any process exists);
`load_initial_weights` runs in the set-up of a fresh run on every rank, after parallelize: each
rank copies its own shards out of the source's weights. From a transformers directory a rank reads
the dense weights and only its own experts (train.hf.mapping.ExpertRows); upcycled experts are
views of the dense FFN (`expand`), never E copies. A resumed run
loads its checkpoint instead and never reads the source.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from models.config import GPTConfig
from models.gpt import GPT
from train.config import split_init_from
from train.data.tokenizer import Tokenizer
from train.hf.files import same_vocabulary
from train.hf.mapping import moe_block_ids


def parse_init_from(value: str | None) -> tuple[str, Path] | None:
    spec = split_init_from(value)
    if spec is None:
        return None
    kind, path = spec
    return kind, Path(path).expanduser().resolve()


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def source_config(kind: str, path: Path) -> GPTConfig:
    """The source model's config (no weights read)."""
    where = f"model.init_from={kind}:{path}"
    if not path.is_dir():
        raise ValueError(f"{where}: no such directory")
    if _is_hf_dir(path):
        from train.hf.importing import read_hf_config

        return read_hf_config(path).cfg
    if kind == "upcycle" and (path / ".hydra" / "config.yaml").is_file():
        from train.checkpoint.run_weights import run_checkpoint_config

        return run_checkpoint_config(path)[0].gpt_config()
    if kind == "hf":
        raise ValueError(f"{where}: not a transformers directory (no config.json); a Switchyard run continues with train.resume=true, or use upcycle:")
    raise ValueError(f"{where}: neither a transformers directory (config.json) nor a Switchyard run directory (.hydra/config.yaml)")


def source_weights(kind: str, path: Path, lazy_experts: bool = False) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer]:
    if _is_hf_dir(path):
        from train.hf.importing import load_hf_weights

        model, state_dict = load_hf_weights(path, lazy_experts)
        return model.cfg, state_dict, model.tokenizer
    from train.checkpoint.run_weights import load_run_weights

    weights = load_run_weights(path)
    return weights.job.gpt_config(), weights.state_dict, weights.tokenizer


def _settings(cfg: GPTConfig) -> dict[str, object]:
    from train.hf.importing import model_settings

    return model_settings(cfg)


def _first_mismatch(have: dict[str, object], want: dict[str, object]) -> str | None:
    return next((key for key, value in have.items() if want.get(key) != value), None)


def check_same_model(source: GPTConfig, target: GPTConfig, where: str) -> None:
    """hf: the run's settings must give the source's function exactly."""
    from train.hf.importing import shape_settings

    hint = "(python -m train.import_hf HF_DIR prints every setting)"
    have, want = _settings(source), _settings(target)
    if key := _first_mismatch(have, want):
        raise ValueError(f"{where}: the source has {key}={have[key]}, this run {key}={want[key]}; set {key}={have[key]} {hint}")
    if moe_block_ids(source) != moe_block_ids(target):
        need = source.moe.every if moe_block_ids(source) else f"more than model.n_layers={source.model.n_layers} (no MoE block)"
        raise ValueError(f"{where}: the source's MoE blocks are {moe_block_ids(source)}, this run's {moe_block_ids(target)}; set moe.every to {need}")
    have, want = shape_settings(source), shape_settings(target)
    del have["moe.every"]  # compared as blocks above (a dense model has many equivalent values)
    if key := _first_mismatch(have, want):
        raise ValueError(f"{where}: the source has {key}={have[key]}, this run {key}={want[key]}; set {key}={have[key]} {hint}")


def check_upcycle(source: GPTConfig, target: GPTConfig, where: str) -> None:
    if moe_block_ids(source):
        raise ValueError(f"{where}: the source has MoE blocks {moe_block_ids(source)}; upcycling starts from a dense model")
    target_moe = moe_block_ids(target)
    if not target_moe:
        raise ValueError(f"{where}: this run has no MoE block to upcycle into; set moe.every <= model.n_layers ({target.model.n_layers})")
    have, want = _settings(source), _settings(target)
    if len(target_moe) < target.model.n_layers:  # dense blocks are copied as they are
        have["model.ffn_hidden"], want["model.ffn_hidden"] = source.model.ffn_hidden, target.model.ffn_hidden
    if key := _first_mismatch(have, want):
        raise ValueError(f"{where}: the dense source has {key}={have[key]}, this run {key}={want[key]}; set {key}={have[key]}")
    if target.moe.expert_ffn_hidden != source.model.ffn_hidden:
        raise ValueError(f"{where}: every expert starts as a copy of the dense FFN, so moe.expert_ffn_hidden must be "
                         f"{source.model.ffn_hidden} (the source's model.ffn_hidden); got {target.moe.expert_ffn_hidden}")
    if not target.moe.normalize_topk:
        raise ValueError(f"{where}: moe.normalize_topk=false: the k copies only add up to the dense FFN when their weights "
                         "sum to 1; set moe.normalize_topk=true")
    if target.moe.capacity_factor is not None:
        raise ValueError(f"{where}: moe.capacity_factor={target.moe.capacity_factor}: dropped tokens would lose their FFN, so "
                         "the upcycled model would not start as the dense one; set moe.capacity_factor=null")


def check_init_from(job) -> None:
    """The pre-flight's check: the source exists, is readable and fits this run's settings."""
    spec = parse_init_from(job.model.init_from)
    if spec is None:
        return
    kind, path = spec
    where = f"model.init_from={job.model.init_from}"
    source = source_config(kind, path)
    if kind == "hf":
        check_same_model(source, job.gpt_config(), where)
    else:
        check_upcycle(source, job.gpt_config(), where)


def upcycle_state_dict(dense_sd: dict[str, torch.Tensor], target: GPTConfig) -> dict[str, torch.Tensor]:
    """The weights upcycling sets in a model of config `target`: the dense weights as they are, and
    each MoE block's experts as copies of that block's dense FFN. The routers (and shared experts'
    input projections) are not in it: they keep their random initialisation."""
    moe_blocks = set(moe_block_ids(target))
    to_experts = {"w1": "experts.w1_EDF", "w3": "experts.w3_EDF", "w2": "experts.w2_EFD"}
    out = {}
    for key, value in dense_sd.items():
        ffn = re.fullmatch(r"blocks\.(\d+)\.ffn\.(w[123])\.weight", key)
        if ffn is None or int(ffn[1]) not in moe_blocks:
            out[key] = value
            continue
        # nn.Linear weights are [out, in]; experts are stored [E, in, out].
        # A view (no copy): each rank copies only its experts out of it.
        out[f"blocks.{ffn[1]}.ffn.{to_experts[ffn[2]]}"] = value.T.unsqueeze(0).expand(target.moe.num_experts, -1, -1)
    if target.moe.num_shared_experts:
        shared_width = target.moe.num_shared_experts * target.moe.expert_ffn_hidden
        for block in moe_blocks:  # shared experts add nothing until they have learnt something
            out[f"blocks.{block}.ffn.shared_experts.w2.weight"] = torch.zeros(target.model.d_model, shared_width)
    return out


def load_initial_weights(trainer, job, tokenizer: Tokenizer) -> None:
    """Set-up hook for a fresh run: the weights `model.init_from` names, into this rank's shards
    (`trainer` from parallel.parallelize)."""
    spec = parse_init_from(job.model.init_from)
    if spec is None:
        return
    kind, path = spec
    where = f"model.init_from={job.model.init_from}"
    source, state_dict, source_tokenizer = source_weights(kind, path, lazy_experts=True)
    if source.model.vocab_size != job.model.vocab_size:
        raise ValueError(f"{where}: mismatched vocab sizes: the source has {source.model.vocab_size} tokens, this run's "
                         f"data.tokenizer {job.model.vocab_size}; train with the source's tokenizer (data.tokenizer.kind=file)")
    if not same_vocabulary(source_tokenizer, tokenizer):
        raise ValueError(f"{where}: the source's tokenizer is not this run's data.tokenizer (same size, other tokens); "
                         "train with the source's tokenizer (data.tokenizer.kind=file, data.tokenizer.path=<its tokenizer.json>)")
    if kind == "upcycle":
        check_upcycle(source, job.gpt_config(), where)
        state_dict = upcycle_state_dict(state_dict, job.gpt_config())
    else:
        check_same_model(source, job.gpt_config(), where)
    with torch.device("meta"):
        expected = GPT(job.gpt_config()).state_dict()
    unknown = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict)) if kind == "hf" else []
    if unknown or missing:  # internal: the checks above make the names match
        raise AssertionError(f"{where}: unexpected {unknown[:3]}, missing {missing[:3]}")
    trainer.load_model_state(state_dict)
