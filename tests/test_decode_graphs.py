"""CUDA-graph decode (engine/cuda_graph.py) checked on the CPU: `DecodeGraphs._capture`, the one
function that needs a GPU, is replaced by a fault (it raises as a capture can on a GPU) or by a
stand-in that replays the same step from the same static buffers; the model's forward, the
streaming generator and the session around it are the real code."""

from __future__ import annotations

import pytest
import torch

from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.engine.cuda_graph import DecodeGraphs
from internvl_chat.engine.loader import load_model
from internvl_chat.errors import GenerationError
from session_helpers import final_event

CONTEXT = 1024
# a question whose answer crosses the first KV bucket (its prompt: ~250 tokens; the bucket: 256)
LONG = "one two three four five six seven eight nine ten " * 3
OOM = "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB of which 3.06 MiB is free."


def _load(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT, compile="off")


@pytest.fixture(scope="module")
def eager(tiny_original):
    return _load(tiny_original)


@pytest.fixture
def graphed(tiny_original):
    """The tiny model decoding through DecodeGraphs, as `enable_cuda_graphs()` sets it up on a GPU."""
    loaded = _load(tiny_original)
    loaded.model.decode_graphs = DecodeGraphs(loaded.model)
    return loaded


def _answers(loaded, script) -> list[list[int]]:
    """Run `script(session)` on a fresh greedy session; every turn's answer ids."""
    session = Session(loaded, SamplingParams(max_new_tokens=16))
    script(session)
    return [list(t.answer_ids) for t in session.turns]


def _two_turns(session: Session) -> None:
    final_event(session.ask(LONG))
    final_event(session.ask("And again?"))


class _CpuGraph:
    """Stands for a captured graph on the CPU: `replay` runs the captured step again from the
    graphs' static token and position buffers into the same output tensor."""

    def __init__(self, graphs: DecodeGraphs, kv_len: int):
        self.run = lambda: graphs._step(kv_len)
        self.out = self.run()

    def replay(self) -> None:
        self.out.copy_(self.run())


def _capture_on_cpu(graphs: DecodeGraphs, kv_len: int):
    graph = _CpuGraph(graphs, kv_len)
    return graph, graph.out


def test_replayed_steps_follow_the_eager_answers_across_buckets_undo_and_retry(eager, graphed, monkeypatch):
    # static buffers refilled each step, one graph per bucket, positions moving back after /undo
    # and /retry: the graphs' step gives the eager step's tokens
    def script(session: Session) -> None:
        _two_turns(session)
        session.undo()
        final_event(session.retry())
        final_event(session.ask("A third question."))

    monkeypatch.setattr(DecodeGraphs, "_capture", _capture_on_cpu)
    got = _answers(graphed, script)
    assert got == _answers(eager, script)
    assert sorted(graphed.model.decode_graphs.graphs) == [256, 512]


@pytest.mark.parametrize(
    "error",
    [lambda: torch.OutOfMemoryError(OOM), lambda: RuntimeError("CUDA error: operation not permitted when stream is capturing")],
    ids=["out of memory", "not capturable"],
)
def test_a_failed_capture_is_one_note_and_the_answers_come_without_graphs(eager, graphed, monkeypatch, capfd, error):
    tries = []

    def failing(graphs, kv_len):
        tries.append(kv_len)
        raise error()

    monkeypatch.setattr(DecodeGraphs, "_capture", failing)
    assert _answers(graphed, _two_turns) == _answers(eager, _two_turns)
    graphs = graphed.model.decode_graphs
    assert tries == [256] and not graphs.graphs and graphs.failure  # tried once, never again
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("internvl-chat:")]
    assert len(notes) == 1 and "decoding without CUDA graphs" in notes[0] and graphs.failure in notes[0]
    assert len(notes[0]) < 200


def test_running_out_of_memory_after_a_failed_capture_is_one_error_and_the_conversation_goes_on(eager, graphed, monkeypatch):
    # the first bucket's graph replays; the second one's capture fails, and its step, launched
    # without graphs, runs out of memory too: the turn fails with the one line, the conversation
    # is as before, and the next turn answers as the eager model does
    graphs = graphed.model.decode_graphs

    def capture(graphs, kv_len):
        if kv_len > 256:
            raise torch.OutOfMemoryError(OOM)
        return _capture_on_cpu(graphs, kv_len)

    step, failed_once = graphs.step_fn, []

    def step_fn(token, position, kv_len):
        if kv_len > 256 and not failed_once:
            failed_once.append(kv_len)
            raise torch.OutOfMemoryError(OOM)
        return step(token, position, kv_len)

    monkeypatch.setattr(DecodeGraphs, "_capture", capture)
    graphs.step_fn = step_fn
    session = Session(graphed, SamplingParams(max_new_tokens=16))
    final_event(session.ask("First."))
    assert list(graphs.graphs) == [256] and graphs.failure is None
    with pytest.raises(GenerationError, match="^out of memory during generation; ") as failed:
        final_event(session.ask(LONG))
    assert "\n" not in str(failed.value) and failed_once and graphs.failure and not graphs.graphs
    assert [t.user_text for t in session.turns] == ["First."]
    final_event(session.ask(LONG))
    want = Session(eager, SamplingParams(max_new_tokens=16))
    for text in ("First.", LONG):
        final_event(want.ask(text))
    assert [t.answer_ids for t in session.turns] == [t.answer_ids for t in want.turns]


def test_a_compiled_step_that_fails_leaves_the_eager_step_inside_the_graphs(eager, graphed, monkeypatch, capfd):
    # the compiled step DecodeGraphs captures (CompiledStep.masked) raising, as a recompile or a
    # kernel's launch can, in the warm-up before a capture: one note, the eager step is captured
    # instead, and the answers are the eager model's
    from internvl_chat.engine.compiled import CompiledStep

    model = graphed.model
    step = CompiledStep(model.language_model, model.device, for_graphs=True)
    calls = []

    def failing(*args):
        calls.append(args)
        raise RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'")

    step._fn, step.active = failing, True  # as compile() leaves it
    model.compiled_step = step
    model.decode_graphs = DecodeGraphs(model, step.masked)
    monkeypatch.setattr(DecodeGraphs, "_capture", _capture_on_cpu)
    assert _answers(graphed, _two_turns) == _answers(eager, _two_turns)
    assert len(calls) == 1 and not step.active and "Detected recompile" in step.failure
    graphs = model.decode_graphs
    assert graphs.failure is None and sorted(graphs.graphs) == [256, 512]
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("internvl-chat:")]
    assert len(notes) == 1 and "using the eager step" in notes[0]
