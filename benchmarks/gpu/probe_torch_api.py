"""Probe every torch API Switchyard calls, on the torch that is installed: one line per API, ok or missing.

    python benchmarks/gpu/probe_torch_api.py [--json PATH]

Switchyard supports torch >= 2.11 (pyproject.toml); the lent GPU image runs 2.11.0+cu130 and CI
runs a newer CPU build. Each check imports the API and inspects its signature, or calls it on a tiny
CPU tensor where a signature cannot be read (builtins), so it runs in a second on any machine.
The list was written from a grep of the code for torch APIs and checked against torch 2.11.0's
Python sources (git_version 70d99e998b4955e0049d13a98d77ae1b14db1f45); add a check when the code
starts using another API. Exit status 1 if anything is missing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

MIN_TORCH = (2, 11)
CHECKS: list[tuple[str, str, Callable[[], str | None]]] = []  # (API, where Switchyard uses it, probe)


def check(api: str, used_in: str):
    def register(probe: Callable[[], str | None]):
        CHECKS.append((api, used_in, probe))
        return probe

    return register


def has_params(fn, *names: str) -> None:
    params = inspect.signature(fn).parameters
    missing = [n for n in names if n not in params]
    if missing:
        raise AttributeError(f"no parameter {', '.join(missing)}")


def has_attrs(owner, *names: str) -> None:
    missing = [n for n in names if not hasattr(owner, n)]
    if missing:
        raise AttributeError(f"{getattr(owner, '__name__', owner)} has no {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------
# Models (models/)
# ---------------------------------------------------------------------------------------------


@check("torch.nn.functional.grouped_mm(offs=)", "models/moe/experts.py: run_experts_grouped")
def _grouped_mm():
    has_params(torch.nn.functional.grouped_mm, "mat_a", "mat_b", "offs")


@check(
    "torch.nn.functional.grouped_mm on CPU and CUDA (bf16, fp32)",
    "models/moe/experts.py: grouped_mm_supported lets fp32 and bf16 through",
)
def _grouped_mm_devices():
    """Reported per device and dtype, never a failure: where it raises, the layer must fall back to
    the loop (torch 2.11's docstring and meta kernel speak of bf16 on CUDA only)."""
    results = []
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device, dtype in [(d, t) for d in devices for t in (torch.bfloat16, torch.float32)]:
        x = torch.randn(6, 16, dtype=dtype, device=device)
        w = torch.randn(2, 16, 8, dtype=dtype, device=device)
        offs = torch.tensor([2, 6], dtype=torch.int32, device=device)
        try:
            torch.testing.assert_close(
                torch.nn.functional.grouped_mm(x, w, offs=offs),
                torch.cat([x[:2] @ w[0], x[2:] @ w[1]]),
                rtol=2e-2,
                atol=2e-2,
            )
            results.append(f"{device} {dtype}: ok")
        except (RuntimeError, NotImplementedError) as err:
            results.append(f"{device} {dtype}: {str(err).splitlines()[0][:80]}")
    return "; ".join(results)


@check("torch.nn.functional.scaled_dot_product_attention(is_causal=, enable_gqa=)", "models/gpt.py: attention")
def _sdpa():
    q = torch.randn(1, 4, 3, 8)
    kv = torch.randn(1, 2, 3, 8)
    out = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    assert out.shape == q.shape


@check("torch.nn.RMSNorm", "models/gpt.py: pre-norms, q/k norms")
def _rmsnorm():
    has_params(torch.nn.RMSNorm, "normalized_shape", "eps")


@check("torch.is_autocast_enabled(device_type), torch.get_autocast_dtype", "models/moe/experts.py: compute_dtype")
def _autocast_queries():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@check("torch.autocast(device_type, dtype=, enabled=)", "train/loop.py, models/moe/router.py (fp32 router)")
def _autocast():
    has_params(torch.autocast.__init__, "device_type", "dtype", "enabled")


@check("torch.utils.checkpoint.checkpoint(use_reentrant=False)", "parallel/activation_checkpointing.py")
def _checkpoint():
    from torch.utils.checkpoint import checkpoint

    has_params(checkpoint, "use_reentrant")


@check("torch.cuda.set_sync_debug_mode / get_sync_debug_mode", "benchmarks/gpu/run_all.sh: the CUDA sync count")
def _sync_debug():
    has_attrs(torch.cuda, "set_sync_debug_mode", "get_sync_debug_mode")


@check("torch.utils._python_dispatch.TorchDispatchMode", "the CPU sync-budget test (counts host syncs)")
def _dispatch_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    has_attrs(TorchDispatchMode, "__torch_dispatch__")


# ---------------------------------------------------------------------------------------------
# Processes (parallel/)
# ---------------------------------------------------------------------------------------------


@check(
    "torch.distributed.init_process_group(store=, device_id=), HashStore, PrefixStore, rendezvous", "parallel/dims.py"
)
def _process_group():
    import torch.distributed as dist

    has_params(dist.init_process_group, "backend", "store", "rank", "world_size", "timeout", "device_id")
    has_attrs(dist, "HashStore", "PrefixStore", "rendezvous", "destroy_process_group", "is_initialized")


@check(
    "torch.distributed.all_to_all_single(async_op=), all_reduce, barrier, all_gather, all_gather_object",
    "parallel/all_to_all.py, parallel/collectives.py, parallel/flat_split.py, train/checkpoint/manager.py",
)
def _collectives():
    import torch.distributed as dist

    has_params(
        dist.all_to_all_single, "output", "input", "output_split_sizes", "input_split_sizes", "group", "async_op"
    )
    has_params(dist.all_reduce, "tensor", "op", "group", "async_op")
    has_attrs(dist, "barrier", "all_gather", "all_gather_object", "ReduceOp", "Work", "ProcessGroup")


@check(
    "torch.distributed.device_mesh.init_device_mesh(mesh_dim_names=), DeviceMesh.get_group, mesh[name]",
    "parallel/dims.py",
)
def _device_mesh():
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    has_params(init_device_mesh, "device_type", "mesh_shape", "mesh_dim_names")
    has_attrs(DeviceMesh, "get_group", "__getitem__", "size", "get_local_rank")  # mesh["edp", "ep"]: a sub-mesh


@check(
    "torch.distributed.pipelining: PipelineStage(input_args=, output_args=, group=), its "
    "backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward), ScheduleGPipe/Schedule1F1B/"
    "ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=, scale_grads=), step(target=, losses=)",
    "parallel/pipeline.py: PipelineRunner",
)
def _pipelining():
    from torch.distributed.pipelining import PipelineStage, schedules

    has_params(PipelineStage.__init__, "submodule", "stage_index", "num_stages", "device", "input_args", "output_args")
    has_params(PipelineStage.__init__, "group")
    has_params(PipelineStage.backward_maybe_with_nosync, "backward_type", "bwd_kwargs", "last_backward")
    for name in ("ScheduleGPipe", "Schedule1F1B", "ScheduleInterleaved1F1B"):
        has_params(getattr(schedules, name).__init__, "n_microbatches", "loss_fn", "scale_grads")
        has_params(getattr(schedules, name).step, "target", "losses")


@check("torch.distributed.new_subgroups(group_size=), get_global_rank", "parallel/parallelize.py, parallel/pipeline.py")
def _subgroups():
    import torch.distributed as dist

    has_params(dist.new_subgroups, "group_size")
    has_attrs(dist, "get_global_rank")


@check(
    "torch.distributed.fsdp.fully_shard(mesh=, reshard_after_forward=, shard_placement_fn=, mp_policy=)",
    "parallel/zero.py: shard_experts",
)
def _fully_shard():
    from torch.distributed.fsdp import fully_shard

    has_params(fully_shard, "mesh", "reshard_after_forward", "shard_placement_fn", "mp_policy")


@check("torch.distributed.fsdp.MixedPrecisionPolicy(param_dtype=, reduce_dtype=)", "parallel/zero.py: bf16 experts")
def _mp_policy():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@check(
    "FSDPModule.set_gradient_divide_factor, set_force_sum_reduction_for_comms, set_requires_gradient_sync, "
    "set_is_last_backward, reshard, unshard",
    "parallel/zero.py, parallel/trainer.py",
)
def _fsdp_module():
    from torch.distributed.fsdp import FSDPModule

    has_attrs(
        FSDPModule,
        "set_gradient_divide_factor",
        "set_force_sum_reduction_for_comms",
        "set_requires_gradient_sync",
        "set_is_last_backward",
        "reshard",
        "unshard",
    )


@check(
    "torch.distributed.tensor.DTensor.from_local(run_check=, shape=, stride=), Shard, Replicate",
    "parallel/zero.py: expert_global_view; parallel/training_state.py: the dense state",
)
def _dtensor():
    from torch.distributed.tensor import DTensor, Replicate, Shard  # noqa: F401

    has_params(DTensor.from_local, "local_tensor", "device_mesh", "placements", "run_check", "shape", "stride")
    has_attrs(DTensor, "to_local", "full_tensor", "redistribute")


@check(
    "torch.profiler.profile(profile_memory=), torch._C._profiler._EventType.Allocation, experimental_event_tree",
    "parallel/memory.py: peak set-up memory on CPU",
)
def _profiler():
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.ones(4)
    prof.profiler.kineto_results.experimental_event_tree()
    has_attrs(_EventType, "Allocation")


# ---------------------------------------------------------------------------------------------
# Checkpoints (train/checkpoint/)
# ---------------------------------------------------------------------------------------------


@check(
    "torch.distributed.checkpoint.save(storage_writer=), load(storage_reader=, planner=, no_dist=), async_save",
    "train/checkpoint/manager.py",
)
def _dcp():
    import torch.distributed.checkpoint as dcp

    has_params(dcp.save, "state_dict", "storage_writer")
    has_params(dcp.load, "state_dict", "storage_reader", "planner", "no_dist")
    has_attrs(dcp, "async_save", "FileSystemWriter", "FileSystemReader", "DefaultLoadPlanner")


@check(
    "FileSystemReader._get_metadata_path, .fs.create_stream, .load_id; DefaultLoadPlanner.load_bytes",
    "train/checkpoint/safe_dcp.py: SafeFileSystemReader, TensorOnlyLoadPlanner",
)
def _dcp_reader(tmp=None):
    import tempfile

    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    with tempfile.TemporaryDirectory() as folder:
        reader = FileSystemReader(folder)
        reader._get_metadata_path(None)
        has_attrs(reader, "fs", "load_id")
        has_attrs(reader.fs, "create_stream")
    has_attrs(DefaultLoadPlanner, "load_bytes")


@check(
    "DCP metadata classes (Metadata, StorageMeta, _MEM_FORMAT_ENCODING, _StorageInfo, serialization._get_layout)",
    "train/checkpoint/safe_dcp.py: the unpickling allow-list",
)
def _dcp_metadata():
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md
    import torch.serialization

    has_attrs(
        md,
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
    has_attrs(fs, "_StorageInfo")
    has_attrs(torch.serialization, "_get_layout")


@check(
    "torch.distributed.tensor.distribute_tensor(src_data_rank=)",
    "parallel/training_state.py: whole weights (model.init_from) cut into each rank's DTensor piece",
)
def _distribute_tensor():
    from torch.distributed.tensor import distribute_tensor

    has_params(distribute_tensor, "tensor", "device_mesh", "placements", "src_data_rank")


# ---------------------------------------------------------------------------------------------


def run_checks() -> list[dict]:
    results = []
    for api, used_in, probe in CHECKS:
        try:
            detail = probe()
            results.append({"api": api, "used_in": used_in, "ok": True, "detail": detail or ""})
        except Exception as err:  # noqa: BLE001 - every failure is a finding, reported on its line
            results.append({"api": api, "used_in": used_in, "ok": False, "detail": f"{type(err).__name__}: {err}"})
    return results


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    version_ok = torch_version() >= MIN_TORCH
    needed = ".".join(map(str, MIN_TORCH))
    print(
        f"{'ok' if version_ok else 'OLD':7} torch {torch.__version__} (Switchyard needs >= {needed}); "
        f"cuda {torch.version.cuda}, cuda available: {torch.cuda.is_available()}"
    )
    results = run_checks()
    for r in results:
        line = f"{'ok' if r['ok'] else 'MISSING':7} {r['api']}"
        if r["detail"]:
            line += f"  [{r['detail']}]"
        print(line)
    missing = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(missing)} of {len(results)} torch APIs present")
    if args.json:
        record = {"torch": torch.__version__, "version_ok": version_ok, "checks": results}
        args.json.write_text(json.dumps(record, indent=2))
    return 0 if version_ok and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
