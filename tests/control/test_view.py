"""The fleet view's single-flight wake door: whether this process's proxy asked for the
wake under way (``FleetView.asked``), through a reload's cut (``remove_app``,
``end_wake``)."""

from __future__ import annotations

import asyncio

import pytest

from autoscaler.control.view import FleetView

APP = "web"


class Waker:
    """A wake that runs until cancelled, and notes what ``asked`` says as it is cut (what
    the cluster leader's wake counts itself by)."""

    def __init__(self, view: FleetView) -> None:
        self.view = view
        self.running = asyncio.Event()
        self.asked_when_cut: list[bool] = []

    async def __call__(self, app: str) -> str:
        self.running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.asked_when_cut.append(self.view.asked(app))
            raise
        return "none"


@pytest.mark.parametrize("cut", ["remove_app", "end_wake"])
async def test_a_wake_cut_by_a_reload_reads_its_flag_and_leaves_none_behind(cut: str) -> None:
    """A wake our proxy asked for, cut by a reload, still reads as asked while it ends (it
    counts itself cancelled); once it has ended, nothing says the app's wake was asked:
    the cut dropped the task but kept the flag (beside it, in a set of its own)."""
    view = FleetView()
    waker = Waker(view)
    view.set_waker(waker)
    task = view.wake(APP)
    await waker.running.wait()
    if cut == "remove_app":
        view.remove_app(APP)
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        await view.end_wake(APP)
    assert task.cancelled()
    assert waker.asked_when_cut == [True]
    assert not view.asked(APP)
    await view.close()


async def test_a_wake_begun_while_a_cut_one_ends_is_a_wake_of_its_own() -> None:
    """A wake asked for while the cut one is still ending is a new task (it never joins
    the one cut), with its own flag: the cut one, as it ends, reads the new one's."""
    view = FleetView()
    waker = Waker(view)
    view.set_waker(waker)
    cut = view.wake(APP)
    await waker.running.wait()
    view.remove_app(APP)
    served = view.wake(APP, asked=False)  # the leader serving another replica's request
    assert served is not cut
    with pytest.raises(asyncio.CancelledError):
        await cut
    assert waker.asked_when_cut == [False]
    assert not view.asked(APP)
    assert view.wake(APP) is served  # our proxy joins it
    assert view.asked(APP)
    await view.close()
    assert served.cancelled()
    assert not view.asked(APP)
