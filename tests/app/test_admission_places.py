"""The admission limit as plain logic: places taken and given back, the refusal's words, and the
service's replies holding a place from their first step to their end (however they end)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from optdemo.app.admission import Admission, QueueFullError
from optdemo.app.service import DemoService
from optdemo.app.settings import AppSettings
from optdemo.core.errors import BusyError, NoModelError
from optdemo.core.generation import GenerationParams, GenerationStats, GenerationUpdate
from optdemo.runtime.manager import ModelManager


def test_places_are_the_queue_size_plus_the_batch_and_the_refusal_says_so() -> None:
    admission = Admission(waiting=2, running=3)
    assert admission.limit == 5
    for _ in range(5):
        admission.enter()
    with pytest.raises(QueueFullError) as refused:
        admission.enter()
    assert str(refused.value) == "too many requests are waiting (at most 2 here): try again in a moment"
    assert isinstance(refused.value, BusyError) and admission.count == 5
    admission.leave()
    admission.enter()  # a place given back is a place taken again
    assert admission.count == 5


def test_a_place_is_given_back_when_the_block_fails_and_never_twice() -> None:
    admission = Admission(waiting=0, running=1)
    with pytest.raises(ValueError), admission.place():
        raise ValueError("the reply failed")
    assert admission.count == 0
    with pytest.raises(RuntimeError, match="nobody held"):
        admission.leave()


def test_many_threads_never_take_more_places_than_there_are() -> None:
    admission = Admission(waiting=3, running=2)
    let_in, refused, start = [], [], threading.Barrier(40)

    def ask() -> None:
        start.wait()
        try:
            admission.enter()
            let_in.append(1)
        except QueueFullError:
            refused.append(1)

    threads = [threading.Thread(target=ask) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(let_in), len(refused), admission.count) == (5, 35, 5)


class Held(ModelManager):
    """A fake model: every completion yields once, then waits for ``go`` (or fails without one)."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def stream_completion(
        self, prompt, params, stop_event=None, *args, **kwargs
    ) -> Iterator[GenerationUpdate]:
        if prompt == "fail":
            raise NoModelError("no model is loaded: load one first")
        yield GenerationUpdate("a")
        self.go.wait(5)
        yield GenerationUpdate("ab", GenerationStats(1, 2, 0.01, 0.02, 10.0))


def test_replies_hold_a_place_until_they_end_however_they_end() -> None:
    service = DemoService(Held(), AppSettings(queue_size=1, max_batch=1))
    params = GenerationParams()
    first = service.complete("s1", "go", params)
    second = service.complete("s2", "go", params)
    assert service.admission.count == 0  # a reply not yet started holds nothing
    assert next(first).text == "a" and next(second).text == "a"
    with pytest.raises(QueueFullError, match="at most 1 here"):
        next(service.complete("s3", "go", params))
    first.close()  # a client that went away: Gradio closes the generator
    assert service.admission.count == 1
    with pytest.raises(NoModelError):  # a reply that fails gives its place back too
        next(service.complete("s3", "fail", params))
    service.manager.go.set()
    assert [step.text for step in second] == ["ab"]
    assert service.admission.count == 0
