"""The resource optimizer: slots from a device's report, task time from observation or score."""

from __future__ import annotations

from processdistro.shared.capacity import NodeView, plan_slots, worth_moving


def test_slots_from_cores_memory_and_cap() -> None:
    assert plan_slots(cores=8, memory_gb=8, kind="browser", max_concurrency=16) == 7  # one core for the page
    assert plan_slots(cores=2, memory_gb=None, kind="browser", max_concurrency=16) == 2
    assert plan_slots(cores=8, memory_gb=None, kind="native", max_concurrency=16) == 8
    assert plan_slots(cores=8, memory_gb=0.5, kind="native", max_concurrency=16) == 2  # memory bound
    assert plan_slots(cores=64, memory_gb=None, kind="native", max_concurrency=8) == 8
    assert plan_slots(cores=1, memory_gb=0.1, kind="browser", max_concurrency=8) == 1


def test_task_time_observed_or_scaled_from_a_peer_by_score() -> None:
    seen = NodeView("a", "a~1", 1, score=2e8, ewma_ms={"mandelbrot": 100.0})
    new = NodeView("b", "b~1", 1, score=5e7)
    blank = NodeView("c", "c~1", 1)
    assert seen.task_ms("mandelbrot", [seen, new]) == 100.0
    assert new.task_ms("mandelbrot", [seen, new]) == 400.0  # a quarter of the score
    assert blank.task_ms("mandelbrot", [seen]) is None
    # a slow holder's work is worth moving to the fast idle node, not the other way round
    assert worth_moving(new, [seen], "mandelbrot", 1.5, [seen, new])
    assert not worth_moving(seen, [new], "mandelbrot", 1.5, [seen, new])
    assert not worth_moving(seen, [blank], "mandelbrot", 1.5, [seen, blank])
