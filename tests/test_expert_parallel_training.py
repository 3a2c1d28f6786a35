"""Expert-parallel training under torchrun (gloo) gives the single-process loss curve.

The single process runs the same global batches as micro-batches with gradient accumulation
(the sampler lays a step's rows out by micro-step, then rank), so every micro-batch, and hence
every per-micro-batch aux loss, is identical; only the reduction order differs.
"""

import pytest

from tests.jobs import TINY, read_metrics, run_job, train_losses

STEPS = ["train.steps=6", "train.eval_interval=6", "train.ckpt_interval=6", "moe.bias_update_rate=0.01"]


@pytest.mark.parametrize("nproc", [2, 4])
def test_ep2_training_matches_single_process(tmp_path, data_cache, nproc):
    single = run_job(tmp_path, data_cache, *TINY, *STEPS, "run_name=single", f"train.grad_accum={nproc}")
    assert single.returncode == 0, single.stderr[-3000:]
    ep = run_job(tmp_path, data_cache, *TINY, *STEPS, "run_name=ep", "parallel.ep=2", nproc=nproc)
    assert ep.returncode == 0, ep.stderr[-3000:]

    expected = train_losses(read_metrics(tmp_path, "single"))
    got = train_losses(read_metrics(tmp_path, "ep"))
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)
    records = read_metrics(tmp_path, "ep")
    assert any(r.get("moe/layer0/all_to_all_bytes", 0) > 0 for r in records)


def test_bad_ep_fails_on_every_rank_without_hanging(tmp_path, data_cache):
    # Plain torchrun: every rank stops before any collective (so nothing hangs: the timeout), rank 0
    # alone prints the line, and torchrun reports the failed workers (launch/torchrun.sh checks first).
    done = run_job(tmp_path, data_cache, *TINY, "parallel.ep=3", nproc=4, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("switchyard: error:")]
    assert errors == [
        "switchyard: error: parallel.ep (3) must divide the number of processes (4); allowed: divisors of 4"
    ]
    assert (
        "exitcode  : 2" in done.stderr
    )  # rank 0 exited with the code one process would; torchrun then stopped the others
    done = run_job(
        tmp_path, data_cache, *TINY, "parallel.ep=4", "moe.num_experts=6", "moe.top_k=2", nproc=4, timeout=120
    )
    assert done.returncode != 0
    assert "parallel.ep (4) must divide moe.num_experts (6)" in done.stderr
