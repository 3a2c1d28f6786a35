import os

import pytest

from tests.slurm_cluster import running_cluster, unavailable_reason


@pytest.fixture(autouse=True)
def no_gpu_unless_marked(request, monkeypatch):
    """A test not marked `gpu` runs on the CPU also on a machine with GPUs: its own process and every
    job or rank it starts (they inherit the environment) see no CUDA device, so `train.device=auto`
    picks the CPU and no rank lands on a GPU by its LOCAL_RANK."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One prepared-data cache for every job in the session (preparation runs once per corpus)."""
    return tmp_path_factory.mktemp("switchyard-cache")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A two-node SLURM cluster on this machine (tests/slurm_cluster.py), shared by the session's
    SLURM tests and stopped after them. Skipped where it cannot run, unless SWITCHYARD_REQUIRE_SLURM=1
    (CI), where that is a failure."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("SWITCHYARD_REQUIRE_SLURM") == "1":
            pytest.fail(f"SWITCHYARD_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    with running_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
