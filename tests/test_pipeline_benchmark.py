"""benchmarks/pipeline.py's pure helpers: the theoretical bubble, and the replay of recorded
schedules (`simulate`) against hand-computed timelines. The replay with equal stages must give the
textbook fraction for GPipe, 1F1B and interleaved 1F1B orders, so the benchmark's "simulated"
column and its "theory" column measure the same thing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline.py"
spec = importlib.util.spec_from_file_location("pipeline_benchmark", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def gpipe_orders(pp: int, n: int) -> dict[int, list]:
    return {r: [("F", r, m) for m in range(n)] + [("B", r, m) for m in range(n)] for r in range(pp)}


def one_f_one_b_orders(pp: int, n: int) -> dict[int, list]:
    """Each rank: pp - 1 - rank warm-up forwards, then one forward and one backward in turn, then
    the remaining backwards (PipeDream-Flush / Megatron's 1F1B)."""
    orders = {}
    for r in range(pp):
        warmup = min(pp - 1 - r, n)
        ops = [("F", r, m) for m in range(warmup)]
        f, b = warmup, 0
        while f < n:
            ops += [("F", r, f), ("B", r, b)]
            f, b = f + 1, b + 1
        ops += [("B", r, m) for m in range(b, n)]
        orders[r] = ops
    return orders


def equal_stages(num_stages: int, forward: float = 1.0, backward: float = 2.0) -> dict:
    return {(kind, s): cost for s in range(num_stages) for kind, cost in (("F", forward), ("B", backward))}


def test_theoretical_bubble_values():
    assert bench.theoretical_bubble("gpipe", 2, 4) == pytest.approx(1 / 5)
    assert bench.theoretical_bubble("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bench.theoretical_bubble("interleaved_1f1b", 2, 4, stages_per_rank=2) == pytest.approx(1 / 9)
    # stages_per_rank only counts for the interleaved schedule
    assert bench.theoretical_bubble("1f1b", 2, 4, stages_per_rank=2) == pytest.approx(1 / 5)


def test_one_f_one_b_timeline_by_hand():
    """pp=2, n=4, F=1, B=2: worked out on paper, rank 0 ends its last backward at t=15."""
    makespan, busy = bench.simulate(one_f_one_b_orders(2, 4), equal_stages(2), num_stages=2)
    assert makespan == 15
    assert busy == {0: 12, 1: 12}
    assert bench.idle_fraction(makespan, busy) == pytest.approx(0.2)


@pytest.mark.parametrize("pp", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_equal_stages_replay_gives_the_textbook_fraction(pp, n):
    for orders in (gpipe_orders(pp, n), one_f_one_b_orders(pp, n)):
        makespan, busy = bench.simulate(orders, equal_stages(pp), num_stages=pp)
        assert bench.idle_fraction(makespan, busy) == pytest.approx(bench.theoretical_bubble("1f1b", pp, n))


def test_interleaved_replay_by_hand():
    """pp=2, 2 stages per rank (rank 0: stages 0 and 2), n=2, F=1, B=2 per stage: makespan 15, each
    rank busy 12, idle 1/5 = (pp-1)/(v*n+pp-1)."""
    orders = {
        0: [("F", 0, 0), ("F", 0, 1), ("F", 2, 0), ("F", 2, 1), ("B", 2, 0), ("B", 2, 1), ("B", 0, 0), ("B", 0, 1)],
        1: [("F", 1, 0), ("F", 1, 1), ("F", 3, 0), ("B", 3, 0), ("F", 3, 1), ("B", 3, 1), ("B", 1, 0), ("B", 1, 1)],
    }
    makespan, busy = bench.simulate(orders, equal_stages(4), num_stages=4)
    assert (makespan, busy) == (15, {0: 12, 1: 12})
    assert bench.idle_fraction(makespan, busy) == pytest.approx(bench.theoretical_bubble("interleaved_1f1b", 2, 2, 2))


def test_the_loss_sits_between_the_last_forward_and_its_backward():
    """A loss op of cost 1 on the last stage delays that stage's backward by 1 (and the makespan)."""
    orders = {0: [("F", 0, 0), ("B", 0, 0)], 1: [("F", 1, 0), ("L", 1, 0), ("B", 1, 0)]}
    durations = {**equal_stages(2), ("L", 1): 1.0}
    makespan, busy = bench.simulate(orders, durations, num_stages=2)
    assert makespan == 1 + 1 + 1 + 2 + 2
    assert busy == {0: 3, 1: 4}


def test_equal_costs_with_a_free_loss_keep_the_textbook_fraction():
    """The benchmark's "torch's order, equal stages" column: the loss ops are recorded but cost 0."""
    orders = one_f_one_b_orders(2, 4)
    orders[1] = [op for f in orders[1] for op in ([f, ("L", 1, f[2])] if f[0] == "F" else [f])]
    makespan, busy = bench.simulate(orders, bench.equal_costs(2), num_stages=2)
    assert bench.idle_fraction(makespan, busy) == pytest.approx(0.2)


def test_unequal_stages_make_the_bubble_larger():
    slow_last = {**equal_stages(2), ("F", 1): 2.0, ("B", 1): 4.0}
    makespan, busy = bench.simulate(gpipe_orders(2, 4), slow_last, num_stages=2)
    # the slow stage sets the pace: rank 0 idles while it runs, so the mean bubble exceeds 1/5
    assert bench.idle_fraction(makespan, busy) > 0.2 + 0.1


def test_label_ops_numbers_micro_batches_per_stage_and_kind():
    events = [("F", 0), ("F", 2), ("F", 0), ("B", 2), ("F", 2), ("B", 2), ("B", 0)]
    assert bench.label_ops(events) == [
        ("F", 0, 0),
        ("F", 2, 0),
        ("F", 0, 1),
        ("B", 2, 0),
        ("F", 2, 1),
        ("B", 2, 1),
        ("B", 0, 0),
    ]


def test_an_impossible_order_is_refused():
    orders = {0: [("B", 0, 0), ("F", 0, 0)], 1: [("F", 1, 0), ("B", 1, 0)]}
    with pytest.raises(ValueError, match="deadlock"):
        bench.simulate(orders, equal_stages(2), num_stages=2)
