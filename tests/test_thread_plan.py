"""The per-thread active plan both attention modules use (`service.thread_plan`): nested blocks restore the outer
plan, an exception still ends the block, and another thread never sees this thread's plan."""

from __future__ import annotations

import threading

import pytest

from service.thread_plan import ThreadPlan


def test_nested_blocks_restore_the_outer_plan_and_end_with_none() -> None:
    plans: ThreadPlan[str] = ThreadPlan()
    assert plans.current() is None
    with plans.active("outer") as outer:
        assert outer == "outer" and plans.current() == "outer"
        with plans.active("inner"):
            assert plans.current() == "inner"
        assert plans.current() == "outer"
    assert plans.current() is None


def test_an_exception_inside_the_block_still_ends_it() -> None:
    plans: ThreadPlan[str] = ThreadPlan()
    with pytest.raises(RuntimeError), plans.active("step"):
        raise RuntimeError("a forward failed")
    assert plans.current() is None


def test_another_thread_sees_no_plan_and_two_helpers_are_independent() -> None:
    plans, others = ThreadPlan[str](), ThreadPlan[str]()
    seen: list[str | None] = []
    with plans.active("engine step"):
        worker = threading.Thread(target=lambda: seen.append(plans.current()))
        worker.start()
        worker.join()
        assert others.current() is None
    assert seen == [None]
