"""ReentrantSlots: the CPU slots a window keeps from its response to its Parquet write."""

from __future__ import annotations

import threading

from terralayr_etl.resources import ReentrantSlots


def test_slots_reenter_in_same_thread() -> None:
    slots = ReentrantSlots(1)

    with slots:
        with slots:
            taken_inside = not slots._semaphore.acquire(blocking=False)
        taken_after_inner = not slots._semaphore.acquire(blocking=False)

    assert taken_inside
    assert taken_after_inner
    assert slots._semaphore.acquire(blocking=False)


def test_slots_block_other_thread_until_last_release() -> None:
    slots = ReentrantSlots(1)
    got_slot = threading.Event()

    def other_thread() -> None:
        with slots:
            got_slot.set()

    slots.acquire()
    slots.acquire()
    worker = threading.Thread(target=other_thread)
    worker.start()
    slots.release()
    blocked_after_inner_release = not got_slot.wait(0.2)
    slots.release()
    worker.join(timeout=5)

    assert blocked_after_inner_release
    assert got_slot.is_set()
