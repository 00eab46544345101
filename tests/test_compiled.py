"""The fast decode step (engine/compiled.py) against the eager step, on CPU in fp32: the C++ step
(cpu_step.py, where the AVX2 kernels load) and Inductor's compiled step, each through the same
Session, serve-slot and fuzz tests (the `fast` fixture has one instance of each).

Cost: one in-process compile of the tiny checkpoint's Inductor step (2 layers; kept in Inductor's
cache, from which the cache test's process loads it); the CLI process takes the C++ step; one
compile of the graphs variant; the W4 compile (marked slow). The fallback test makes a compile
really fail (the C++ compiler named by $CXX does not exist, and an empty cache forces a build).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decode_helpers import greedy_steps
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.engine import compiled, cpu_gemv, direct_call, language
from internvl_chat.engine.loader import load_model
from session_fuzz import SessionFuzz, fuzz_seeds, fuzz_steps, make_fuzz_media

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4
CONTEXT = 1024


@pytest.fixture(scope="module")
def eager(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT, compile="off")


@pytest.fixture(scope="module", params=["native", "inductor"])
def fast(tiny_original, request):
    """The CLI's configuration (fp32) at the CLI tests' context, so the cache test's process loads
    the Inductor instance from Inductor's cache. Twice: the whole step in C++ (cpu_step.py, where
    the AVX2 kernels load) and Inductor's compiled step (the other CPUs')."""
    native = request.param == "native"
    if native and cpu_gemv.supported() is not None:
        pytest.skip(f"no C++ step here: {cpu_gemv.supported()}")
    messages: list[str] = []
    saved, compiled.NATIVE_CPU_STEP = compiled.NATIVE_CPU_STEP, native
    try:
        loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT, compile="on", progress=messages.append)
    finally:
        compiled.NATIVE_CPU_STEP = saved
    step = loaded.model.compiled_step
    assert step is not None and step.active, "the decode step did not compile"
    assert (step.native is not None) == native
    assert messages[0] == "compiling the decode step …"
    assert messages[-1].startswith("decode step ready in" if native else "decode step compiled in")
    assert step.compile_s > 0
    return loaded


def test_compiled_step_gives_the_eager_greedy_tokens(eager, fast):
    ids = eager.tokenizer.encode("one two three four five six seven") * 3
    before = fast.model.compiled_step.steps
    want, want_logits = greedy_steps(eager.model, ids, 24)
    got, got_logits = greedy_steps(fast.model, ids, 24)
    assert fast.model.compiled_step.steps - before == 24  # every step ran compiled
    if fast.model.compiled_step.native is None and hasattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list"):
        assert fast.model.compiled_step.direct  # without Dynamo's per-call guard check
        assert fast.model.compiled_step.flat is not None  # nor the Python layers above Inductor's entry
    assert got == want
    diff = (got_logits - want_logits).abs().max().item()
    assert diff <= TOL * want_logits.abs().max().item(), diff


def _answers(session: Session) -> list[list[int]]:
    return [list(t.answer_ids) for t in session.turns]


def _drain(events) -> None:
    for _ in events:
        pass


def test_session_with_undo_and_retry_matches_eager(eager, fast):
    """Undo and retry move start_pos back; the compiled step must read the cache exactly as eager."""
    params = SamplingParams(max_new_tokens=10)
    sessions = [Session(eager, params), Session(fast, params)]
    history = []
    for action in ("ask:Hello there!", "ask:Tell me more about it.", "undo", "ask:Something else?", "retry",
                   "ask:And finally?"):  # fmt: skip
        for s in sessions:
            if action == "undo":
                s.undo()
            elif action == "retry":
                _drain(s.retry())
            else:
                _drain(s.ask(action[4:]))
        a, b = (_answers(s) for s in sessions)
        assert b == a, action
        assert sessions[0].start_pos == sessions[1].start_pos
        history.append(sessions[1].start_pos)
    assert history[2] < history[1]  # undo moved the cache back
    assert fast.model.compiled_step.active and fast.model.compiled_step.steps > 0


def test_serve_slots_swap_kv_caches_under_the_compiled_step(eager, fast):
    """`internvl-chat serve` keeps one KV cache per slot and points the model at the active one
    (chat/kv_slots.OwnKVCache); the compiled step must read and write that one, never the cache it
    was compiled with. Interleaved compiled conversations match each conversation run alone, eager."""
    params = SamplingParams(max_new_tokens=8)
    prompts = [["Hello there!", "Tell me more."], ["Something else?", "And finally?"]]
    want = []
    for turns in prompts:
        alone = Session(eager, params)
        for text in turns:
            _drain(alone.ask(text))
        want.append(_answers(alone))
    step = fast.model.compiled_step
    before = step.steps
    slots = [Session(fast, params) for _ in prompts]
    for i, s in enumerate(slots):
        s.own_kv_cache(share_model_cache=(i == 0))
    try:
        for turn in range(2):
            for s, turns in zip(slots, prompts):
                s.activate_kv_cache()
                _drain(s.ask(turns[turn]))
    finally:
        slots[0].activate_kv_cache()  # the model's own cache again, for the other tests
    assert [_answers(s) for s in slots] == want
    assert step.active and step.failure is None and step.steps > before


@pytest.mark.parametrize("seed", fuzz_seeds(1, first=1000))
def test_random_conversations_under_the_compiled_step(eager, fast, tmp_path, seed):
    """tests/test_session_fuzz.py's fuzz with the compiled step answering (the eager model prefilling
    from scratch is the reference): every compiled step reads the cache that undo, retry, cancelled,
    abandoned and failed answers, /system and loads left behind."""
    step = fast.model.compiled_step
    before = step.steps
    SessionFuzz(fast, eager, make_fuzz_media(tmp_path / "media"), tmp_path, seed).run(fuzz_steps())
    assert step.active and step.failure is None and step.steps > before  # never fell back to eager


def test_an_entry_without_matching_guards_keeps_the_guarded_call(eager):
    """direct_call.unguarded takes Dynamo's compiled code only for an entry whose guards accept the
    example; a function never compiled (or compiled for other inputs) has none."""
    lm = eager.model.language_model
    token = torch.tensor([3])
    with torch.inference_mode():
        logits = lm.decode_exact(token, 5)
        assert direct_call.unguarded(type(lm).decode_exact, None, (lm, token, 5, lm.caches()), logits) is None


def test_a_function_dynamo_did_not_compile_has_no_flat_call(eager):
    lm = eager.model.language_model
    assert direct_call.FlatCall.build(type(lm).decode_exact, lm, torch.tensor([3]), lm.caches(), 0) is None


def test_the_compiled_graph_is_found_past_an_empty_closure_cell(monkeypatch):
    """torch 2.11's AOTAutograd wrapper closes over a name not yet bound (an empty cell), which
    raised ValueError and left the step without its flat call."""
    from torch._inductor import output_code

    class StandIn:  # a real CompiledFxGraph needs a compiled graph to be made
        pass

    monkeypatch.setattr(output_code, "CompiledFxGraph", StandIn)
    graph = StandIn()

    def wrapper_of(compiled):
        def forward(*args):
            return later, compiled

        if False:
            later = None  # noqa: F841 — a cell that stays empty
        return forward

    assert direct_call._compiled_graph(wrapper_of(graph)) is graph


def test_converted_weights_leave_the_flat_call(eager, fast):
    """After `.to()`-style conversions (weights_version moves) the step must not call Inductor's
    entry with the weights it recorded: it takes Dynamo's code, which reads the module again."""
    step = fast.model.compiled_step
    flat = step.flat
    if flat is None:
        pytest.skip("this torch offers no flat call")
    lm = fast.model.language_model
    recorded = flat._entry

    def stale_call(*args):
        raise AssertionError("the flat call ran with stale weights")

    flat._entry = stale_call
    try:
        lm.float()  # fp32 already: the same weights, but a conversion all the same
        assert flat.version != lm.weights_version
        ids = eager.tokenizer.encode("four five six")
        before = step.steps
        assert greedy_steps(fast.model, ids, 6)[0] == greedy_steps(eager.model, ids, 6)[0]
        assert step.active and step.steps - before == 6
    finally:
        flat._entry, flat.version = recorded, lm.weights_version  # the same tensors: valid again


def test_the_flat_call_refuses_caches_of_another_layout(fast):
    """Its C++ code was built for one cache shape: other caches raise (the step then goes eager)."""
    flat = fast.model.compiled_step.flat
    if flat is None:
        pytest.skip("this torch offers no flat call")
    caches = fast.model.language_model.caches()
    longer = [tuple(torch.zeros(t.shape[0], t.shape[1], 2 * t.shape[2], t.shape[3]) for t in pair) for pair in caches]
    with pytest.raises(ValueError, match="does not fit the compiled step"):
        flat(5, longer)
    with torch.inference_mode():
        assert torch.equal(flat(5, caches), flat(5, caches))  # its own caches still work


def test_the_cache_list_follows_swapped_and_converted_buffers(tiny_original):
    """Qwen2ForCausalLM.caches() keeps its list between steps; swapping a slot's caches in or
    converting the model must give the new tensors."""
    lm = load_model(tiny_original, device="cpu", dtype="float32", max_context=64, compile="off").model.language_model
    first = lm.caches()
    assert lm.caches() is first
    own = [torch.zeros_like(t) for t in lm.k_cache]
    lm.k_cache = own
    assert len(lm.caches()) == len(own) and all(a is b for (a, _), b in zip(lm.caches(), own))
    lm.double()
    assert all(k.dtype == v.dtype == torch.float64 for k, v in lm.caches())


def test_decode_step_traces_as_one_graph(eager):
    """fullgraph=True would refuse a graph break; this names the count (zero) for both entry points."""
    lm = eager.model.language_model
    token = torch.tensor([3])
    with torch.inference_mode():
        exact = torch._dynamo.explain(lm.decode_exact)(token, 5, lm.caches())
        masked = torch._dynamo.explain(lm.decode_masked)(token, torch.tensor([5]), 256, lm.caches())
    for out in (exact, masked):
        assert out.graph_count == 1 and out.graph_break_count == 0, out.break_reasons


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "internvl_chat.cli", *args],
        input="", capture_output=True, text=True, env=full_env, timeout=900, cwd=cwd,
    )  # fmt: skip


def _ask(model: Path, mode: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return _cli("--model", str(model), "-p", "Count to ten, please.", "--json", "--max-new-tokens", "16",
                "--device", "cpu", "--dtype", "float32", "--max-context", str(CONTEXT), "--compile", mode, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def cli_eager_tokens(tiny_original) -> list[int]:
    """The eager CLI's answer, computed once for the CLI tests below."""
    off = _ask(tiny_original, "off")
    assert off.returncode == 0, off.stderr
    return json.loads(off.stdout)["token_ids"]


def test_cli_compiled_answer_equals_eager(tiny_original, cli_eager_tokens):
    on = _ask(tiny_original, "on")
    assert on.returncode == 0, on.stderr
    assert json.loads(on.stdout)["token_ids"] == cli_eager_tokens
    assert "not compiled" not in on.stderr and "failed" not in on.stderr, on.stderr


def test_no_leak_report_from_triton_after_an_inductor_step(tiny_original):
    """An fp16 step is Inductor's (the C++ step takes fp32/bf16). Where Triton is installed,
    Inductor loads it, and objects of its bindings kept alive by gc.freeze were reported as
    leaks at exit: dozens of 'nanobind: leaked ...' lines after the answer."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: nothing of it can be reported")
    run = _cli("--model", str(tiny_original), "-p", "Count to ten, please.", "--max-new-tokens", "4",
               "--device", "cpu", "--dtype", "float16", "--max-context", str(CONTEXT), "--compile", "on")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "decode step" not in run.stderr, run.stderr  # it compiled (no fallback note)
    assert "leaked" not in run.stderr, run.stderr[-2000:]


def test_the_dynamo_settings_are_ones_this_torch_has():
    # torch 2.6 has the recompile limits only by their old names; naming the new ones made
    # `config.patch` raise, and the step never compiled there
    from torch._dynamo import config as dynamo_config

    options = compiled.dynamo_options()
    with dynamo_config.patch(**options):
        assert all(getattr(dynamo_config, name) == value for name, value in options.items())
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    assert options[limit] == 64


def test_a_failing_compiler_falls_back_to_eager_with_one_line(tiny_original, cli_eager_tokens, tmp_path):
    env = {"CXX": str(tmp_path / "no-such-compiler" / "g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    broken = _ask(tiny_original, "on", env)
    assert broken.returncode == 0, broken.stderr
    assert json.loads(broken.stdout)["token_ids"] == cli_eager_tokens
    notes = [line for line in broken.stderr.splitlines() if "decode step" in line]
    assert len(notes) == 1 and "was not compiled" in notes[0] and "using the eager step" in notes[0], broken.stderr
    assert "Traceback" not in broken.stderr


@pytest.mark.parametrize("where", ["a file", "under a file", "relative under a file"])
def test_an_unusable_cache_folder_falls_back_to_eager_with_one_line(tiny_original, cli_eager_tokens, tmp_path, where):
    """$TORCHINDUCTOR_CACHE_DIR naming a file (or a folder that cannot be made) crashed with
    torch's FileExistsError traceback as torch._dynamo was first imported: the answer comes eager,
    after one note that names the folder and what to do."""
    (tmp_path / "file").write_text("not a folder")
    folder = {"a file": str(tmp_path / "file"), "under a file": str(tmp_path / "file" / "cache"),
              "relative under a file": "file/cache"}[where]  # fmt: skip
    broken = _cli("--model", str(tiny_original), "-p", "Count to ten, please.", "--json", "--max-new-tokens", "16",
                  "--device", "cpu", "--dtype", "float32", "--max-context", str(CONTEXT), "--compile", "on",
                  env={"TORCHINDUCTOR_CACHE_DIR": folder}, cwd=tmp_path)  # fmt: skip
    assert broken.returncode == 0, broken.stderr
    assert "Traceback" not in broken.stderr, broken.stderr
    assert json.loads(broken.stdout)["token_ids"] == cli_eager_tokens
    notes = [line for line in broken.stderr.splitlines() if "decode step" in line]
    assert len(notes) == 1 and "was not compiled" in notes[0] and "using the eager step" in notes[0], broken.stderr
    assert str(tmp_path / "file") in notes[0] and "TORCHINDUCTOR_CACHE_DIR" in notes[0], notes


def test_a_default_cache_folder_that_cannot_be_made_is_not_left_in_the_variable(monkeypatch, tmp_path):
    """$XDG_CACHE_HOME naming a file: the folder under it that cannot be made was left in
    $TORCHINDUCTOR_CACHE_DIR, so the next compile (graphs turned on, another model) blamed that
    variable, which the user never set, and a later import of torch._dynamo raised torch's
    NotADirectoryError instead of using torch's own default folder."""
    (tmp_path / "file").write_text("not a folder")
    # setenv first: delenv of an unset variable records nothing to undo, and use_cache_dir sets it
    # below, which left a tmp folder as every later test's (and subprocess's) compile cache
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    for _ in range(2):
        with pytest.raises(compiled.CacheFolderError, match=r"set \$XDG_CACHE_HOME, or \$TORCHINDUCTOR_CACHE_DIR"):
            compiled.use_cache_dir()
        assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert compiled.use_cache_dir() == tmp_path / "cache" / "internvl-chat" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "internvl-chat" / "inductor")


def _fake_cache(root: Path) -> dict[str, Path]:
    """A compile cache folder with an entry of each kind drop_damaged_entries meets."""
    import pickle

    key = root / "fxgraph" / "ab" / "fabcd"
    key.mkdir(parents=True)
    (root / "aotautograd" / "akey").mkdir(parents=True)
    (root / "triton" / "0").mkdir(parents=True)
    whole = pickle.dumps({"graph": list(range(50))})
    paths = {"whole": key / "whole", "cut": key / "cut", "empty": root / "aotautograd" / "akey" / "empty",
             "writing": key / ".123.456.tmp", "other cache": root / "triton" / "0" / "kernel.json"}  # fmt: skip
    paths["whole"].write_bytes(whole)
    paths["cut"].write_bytes(whole[: len(whole) // 2])
    paths["empty"].write_bytes(b"")
    paths["writing"].write_bytes(whole[:3])
    paths["other cache"].write_text("{}")
    return paths


def test_damaged_cache_entries_are_dropped_and_only_they(tmp_path):
    paths = _fake_cache(tmp_path / "cache")
    assert compiled.drop_damaged_entries(tmp_path / "cache") == 2
    assert {name for name, path in paths.items() if not path.exists()} == {"cut", "empty"}


def test_a_symlink_in_the_cache_folder_is_left_alone(tmp_path):
    """A symlink among the entries (a cache assembled from links, a shared folder) pointing at a
    file elsewhere that is no pickle was deleted as a damaged entry; the app deletes only the
    plain files Inductor writes."""
    paths = _fake_cache(tmp_path / "cache")
    elsewhere = tmp_path / "notes.txt"
    elsewhere.write_text("the user's, not Inductor's")
    link = paths["whole"].parent / "linked"
    link.symlink_to(elsewhere)
    assert compiled.drop_damaged_entries(tmp_path / "cache") == 2
    assert link.is_symlink() and elsewhere.read_text() == "the user's, not Inductor's"


def test_a_fifo_in_the_cache_folder_does_not_block_the_start(tmp_path):
    """A FIFO among the entries: opening it to read its last byte waited for a writer for ever,
    before the first prompt. It is left alone (no plain file of Inductor's)."""
    import threading

    paths = _fake_cache(tmp_path / "cache")
    fifo = paths["whole"].parent / "fifo"
    os.mkfifo(fifo)
    result = []
    walker = threading.Thread(target=lambda: result.append(compiled.drop_damaged_entries(tmp_path / "cache")), daemon=True)
    walker.start()
    walker.join(60)  # not a timing: only so that a blocked open fails the test instead of hanging it
    if walker.is_alive():  # blocked in open(): give it a writer so that the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        walker.join()
        pytest.fail("drop_damaged_entries blocked on a FIFO")
    assert result == [2] and fifo.exists()


def test_a_cache_folder_that_is_a_dangling_link_is_named_as_one(monkeypatch, tmp_path):
    """The cache folder a symlink to a folder that is gone (a moved disk): the note said "a file is
    there, not a folder", and no file was there."""
    link = tmp_path / "cache"
    link.symlink_to(tmp_path / "gone")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(link))
    with pytest.raises(compiled.CacheFolderError) as raised:
        compiled.use_cache_dir()
    message = str(raised.value)
    assert "a file is there" not in message, message
    assert f"{link} is a link to {tmp_path / 'gone'}, which is not a folder" in message, message


def test_no_home_folder_for_the_cache_falls_back_to_eager(eager, monkeypatch, capsys):
    """With HOME unset and no account entry (a container's arbitrary uid), --compile on refused to
    start the app at all (the cache folder's NoHomeFolder escaped compile()): eager, one note."""
    from internvl_chat.files import xdg_dir

    def no_home(env, name, default):
        return xdg_dir({}, name, default)

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(compiled, "xdg_dir", no_home)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    step = compiled.CompiledStep(eager.model.language_model, eager.model.device, for_graphs=False)
    assert step.compile() is False and not step.active
    note = capsys.readouterr().err
    assert "was not compiled" in note and "set HOME or $XDG_CACHE_HOME" in note and "using the eager step" in note, note
    assert len(note.strip().splitlines()) == 1, note


def test_a_full_disk_while_compiling_is_one_line_that_says_what_to_do(eager, monkeypatch, capsys, tmp_path):
    """Inductor's error on a full disk came cut mid-word inside torch's own advice ("Set
    TORCHDYNAMO_VERBOSE=1 … if you're reporting a bug to PyTor"): the note gives the cause and the fix."""
    from torch._inductor.exc import InductorError

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiled, "NATIVE_CPU_STEP", False)
    step = compiled.CompiledStep(eager.model.language_model, eager.model.device, for_graphs=False)

    def full(options):
        error = InductorError(OSError(28, "No space left on device"), None)
        error.args = (error.args[0] + (  # as torch's augment_exc_message adds it
            "\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're reporting a "
            'bug to PyTorch). For even more developer context, set TORCH_LOGS="+dynamo"\n'),)  # fmt: skip
        assert "PyTorch" in str(error)
        raise error

    monkeypatch.setattr(step, "_build", full)
    assert step.compile() is False and not step.active
    note = capsys.readouterr().err
    assert len(note.strip().splitlines()) == 1, note
    assert "No space left on device" in note and "using the eager step" in note, note
    assert "TORCHDYNAMO_VERBOSE" not in note and "PyTor" not in note, note
    assert f"free space on the disk of {tmp_path}" in note and "TORCHINDUCTOR_CACHE_DIR" in note, note


@pytest.mark.parametrize("wrapped", ["errno", "text"])
def test_a_full_quota_while_compiling_says_what_to_do_as_a_full_disk_does(eager, monkeypatch, capsys, tmp_path, wrapped):
    """EDQUOT (a home folder's quota, common on shared machines, filled by the cache) got no fix,
    where ENOSPC gets one: free space there, or put the cache on another disk."""
    import errno

    from torch._inductor.exc import InductorError

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiled, "NATIVE_CPU_STEP", False)
    step = compiled.CompiledStep(eager.model.language_model, eager.model.device, for_graphs=False)
    inner = OSError(errno.EDQUOT, "Disk quota exceeded") if wrapped == "errno" else RuntimeError("write failed: Disk quota exceeded")

    def full(options):
        raise InductorError(inner, None)

    monkeypatch.setattr(step, "_build", full)
    assert step.compile() is False
    note = capsys.readouterr().err
    assert len(note.strip().splitlines()) == 1 and "Disk quota exceeded" in note, note
    assert f"free space on the disk of {tmp_path}" in note and "TORCHINDUCTOR_CACHE_DIR" in note, note


def test_a_cache_folder_that_cannot_be_made_on_a_full_disk_gives_one_fix(eager, monkeypatch, capsys, tmp_path):
    """mkdir failing with ENOSPC: the note gave two fixes, the second for "the disk of the compile
    cache folder" without naming it; now one, naming the folder, with the full disk's fix."""
    import errno

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(Path, "mkdir", full)
    step = compiled.CompiledStep(eager.model.language_model, eager.model.device, for_graphs=False)
    assert step.compile() is False and not step.active
    note = capsys.readouterr().err
    assert len(note.strip().splitlines()) == 1 and "using the eager step" in note, note
    assert f"{tmp_path / 'cache'} cannot be made (No space left on device)" in note, note
    assert note.count("free space") == 1 and note.count("TORCHINDUCTOR_CACHE_DIR") == 1, note
    assert "disk of the compile cache folder" not in note, note


def _compiled_on_a_noexec_disk(eager, monkeypatch, capsys, cache: Path):
    """Compile with the cache in `cache`, the build failing as a noexec disk makes it fail (the
    loader cannot map the library): (the one-line note, the step)."""
    from torch._inductor.exc import InductorError

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    monkeypatch.setattr(compiled, "NATIVE_CPU_STEP", False)
    step = compiled.CompiledStep(eager.model.language_model, eager.model.device, for_graphs=False)

    def noexec(options):
        raise InductorError(OSError(f"{cache}/ab/cab.main.so: failed to map segment from shared object"), None)

    monkeypatch.setattr(step, "_build", noexec)
    assert step.compile() is False
    note = capsys.readouterr().err
    assert len(note.strip().splitlines()) == 1 and "using the eager step" in note, note
    return note, step


def test_a_cache_folder_on_a_noexec_disk_says_what_to_do(eager, monkeypatch, capsys, tmp_path):
    """Compiled code in a folder on a disk mounted noexec cannot be loaded ("failed to map segment
    from shared object"): the one-line note said only that, now also where to put the cache."""
    note, _ = _compiled_on_a_noexec_disk(eager, monkeypatch, capsys, tmp_path)
    assert f"the disk of {tmp_path} does not let programs run" in note and "TORCHINDUCTOR_CACHE_DIR" in note, note


def test_a_compile_error_quoting_a_hostile_path_is_shown_inert(eager, monkeypatch, capsys, tmp_path):
    """Inductor passes the C compiler's (or the loader's) text on, and it quotes paths as they are:
    a cache folder named with an escape sequence and a bidi override reached the terminal raw in
    the one-line note, and in `compile_failure` (which the benchmarks print)."""
    hostile = tmp_path / "c\x1b[31mred\u202e"
    hostile.mkdir()
    note, step = _compiled_on_a_noexec_disk(eager, monkeypatch, capsys, hostile)
    for shown in (note, step.failure):
        assert "\x1b" not in shown and "\u202e" not in shown, repr(shown)
        assert "\\e[31mred\\u202e/ab/cab.main.so" in shown, shown
    assert "\\\\e" not in note, note  # escaped once, not twice


def test_the_cpp_step_does_not_import_dynamo(tiny_original):
    """The C++ step traces nothing, but compile() marked the KV caches static for Dynamo first:
    importing torch._dynamo for that cost every start seconds before the first prompt."""
    if cpu_gemv.supported() is not None:
        pytest.skip(f"no C++ step here: {cpu_gemv.supported()}")
    code = (
        "import sys; from internvl_chat.engine.loader import load_model\n"
        f"m = load_model({str(tiny_original)!r}, device='cpu', dtype='float32', max_context=64, compile='on')\n"
        "step = m.model.compiled_step\n"
        "print(step is not None and step.native is not None, 'torch._dynamo' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "False"], (run.stdout, run.stderr)


def test_auto_compiles_large_decoders_on_cpu_only(eager):
    lm = eager.model.language_model
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiled.wanted("on", cpu, lm) and not compiled.wanted("off", cpu, lm)
    small = lm.decoder_bytes()
    assert 0 < small < compiled.AUTO_MIN_DECODER_BYTES["cpu"]
    assert not compiled.wanted("auto", cpu, lm)  # a tiny model starts instantly and is fast enough eager
    big = {**compiled.AUTO_MIN_DECODER_BYTES, "cpu": small}
    try:
        compiled.AUTO_MIN_DECODER_BYTES, saved = big, compiled.AUTO_MIN_DECODER_BYTES
        assert compiled.wanted("auto", cpu, lm)
        assert not compiled.wanted("auto", cuda, lm)  # not yet measured on a GPU
    finally:
        compiled.AUTO_MIN_DECODER_BYTES = saved


def test_cuda_options_ask_for_pdl_on_hopper_only(monkeypatch):
    """PDL where Inductor has it and the GPU is sm90+; never on older GPUs, when turned off, or on
    the CPU; and Inductor knows every option we pass."""
    from torch._inductor import config as inductor_config

    has_pdl = hasattr(inductor_config.triton, "enable_pdl")
    cuda = torch.device("cuda", 0)
    for major, want in ((9, has_pdl), (10, has_pdl), (8, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, major=major: (major, 0))
        assert compiled.inductor_options(cuda).get("triton.enable_pdl", False) == want
        with inductor_config.patch(compiled.inductor_options(cuda)):  # as torch.compile does: an unknown key raises
            pass
    monkeypatch.setattr(compiled, "CUDA_PDL", False)
    assert "triton.enable_pdl" not in compiled.inductor_options(cuda)
    assert compiled.inductor_options(torch.device("cpu")) == compiled.CPU_OPTIONS


def test_the_compile_cache_serves_the_next_start(tiny_original, fast, tmp_path):
    """A second start finds the step the first one compiled (same model and settings) in Inductor's
    cache (~/.cache/internvl-chat, here under a fresh $XDG_CACHE_HOME) and compiles nothing. Both
    starts are new processes: this one's compiles depend on what it compiled before (Dynamo keeps
    state per function across models), so its cache entries need not be the ones a start writes."""
    if fast.model.compiled_step.native is not None:
        pytest.skip("Inductor's cache is checked with the Inductor step")
    code = (
        "from internvl_chat.engine import compiled\n"
        "compiled.NATIVE_CPU_STEP = False\n"  # Inductor's step, as where the C++ step cannot run
        "from internvl_chat.engine.loader import load_model\n"
        f"m = load_model({str(tiny_original)!r}, device='cpu', dtype='float32', max_context={CONTEXT}, compile='on').model\n"
        "from torch._dynamo.utils import counters\n"
        "print(m.compiled_step is not None, counters['inductor']['fxgraph_cache_hit'], counters['inductor']['fxgraph_cache_miss'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path))
    starts = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
        assert run.returncode == 0, run.stderr
        starts.append(run.stdout.split())
    assert any((tmp_path / "internvl-chat" / "inductor").glob("fxgraph/*")), "nothing was cached"
    (ok, _, first_misses), (ok_again, hits, misses) = starts
    assert ok == ok_again == "True" and int(first_misses) >= 1, starts  # the first start compiled
    assert int(hits) >= 1 and int(misses) == 0, starts
    # entries cut short (a crash before the disk had their data) were never replaced: each start
    # printed torch's warnings with tracebacks, then compiled again; they are removed, then rebuilt
    entries = [p for name in compiled.PICKLED_CACHES for p in (tmp_path / "internvl-chat" / "inductor" / name).rglob("*") if p.is_file()]
    assert entries
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
        assert run.returncode == 0 and run.stdout.split()[0] == "True", run.stderr
        assert "Traceback" not in run.stderr and "unable to load" not in run.stderr, run.stderr
    assert compiled.drop_damaged_entries(tmp_path / "internvl-chat" / "inductor") == 0


@pytest.mark.slow
def test_w4_compiled_step_gives_the_eager_greedy_tokens(tiny_original):
    """The 4-bit path (Int4Linear, PyTorch's CPU int4 kernel) inside the compiled step (its own compile)."""
    from bench_lib import quantize_decoder_

    models = []
    for mode in ("off", "on"):
        loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=512)
        assert quantize_decoder_(loaded.model, "torch", group_size=32) == 4 * loaded.config.text.num_layers
        if mode == "on":
            assert loaded.model.enable_compile(True)
        models.append(loaded.model)
    ids = list(range(5, 40))
    want, want_logits = greedy_steps(models[0], ids, 16)
    got, got_logits = greedy_steps(models[1], ids, 16)
    assert got == want and models[1].compiled_step.steps == 16
    assert (got_logits - want_logits).abs().max().item() <= 1e-3 * want_logits.abs().max().item()


def test_the_graphs_variant_compiles_once_for_every_bucket(eager, tiny_original):
    """What CUDA graphs capture on a GPU (engine/cuda_graph.py): the position on the device and a
    fixed KV bucket with the stale tail masked. Checked on CPU (multiply-reduce GEMVs): one compile serves two buckets and decodes the eager tokens (the capture itself
    needs a GPU: tests/test_cuda.py)."""
    from internvl_chat.engine.cuda_graph import kv_bucket

    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT)
    model, lm = loaded.model, loaded.model.language_model
    ids = (eager.tokenizer.encode("one two three four five six seven") * 64)[:250]
    want, _ = greedy_steps(eager.model, ids, 12)
    step = compiled.CompiledStep(lm, model.device, for_graphs=True)
    assert step.compile()
    with torch.inference_mode():
        token = model.forward(ids, 0).argmax().view(1)
        got, seen = [], set()
        position = torch.tensor([len(ids)])
        with torch.compiler.set_stance("fail_on_recompile"):
            for _ in range(12):
                got.append(int(token))
                kv_len = kv_bucket(int(position), model.max_seq_len)
                seen.add(kv_len)
                token = step.masked(token, position, kv_len).argmax().view(1)
                position += 1
    assert got == want and seen == {256, 512}  # crossed a bucket boundary without recompiling
    assert step.active


def test_the_guarded_step_reaches_the_end_of_the_context(eager, tiny_original, monkeypatch):
    """Where Dynamo's guards are checked (a torch without the unguarded call), the context's last
    position failed the compiled step (its whole-cache slice is contiguous, which the compile guarded
    against: a recompile, refused), so a one-line note said so and every later token decoded eagerly.
    That one position now takes the eager step and the compiled one stays."""
    monkeypatch.setattr(compiled, "NATIVE_CPU_STEP", False)
    monkeypatch.setattr(compiled, "unguarded", lambda *args: None)
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT, compile="on")
    step = loaded.model.compiled_step
    assert step is not None and step.active and not step.direct
    ids = (eager.tokenizer.encode("one two three four five six seven") * 200)[: CONTEXT - 4]
    want, want_logits = greedy_steps(eager.model, ids, 4)
    got, got_logits = greedy_steps(loaded.model, ids, 4)  # the last one at position CONTEXT - 1
    assert got == want and step.active, step.failure
    assert step.steps == 3  # all but the last position ran compiled
    assert (got_logits - want_logits).abs().max().item() <= TOL * want_logits.abs().max().item()


def masked_steps(model, step, ids: list[int], steps: int) -> tuple[list[int], list[int]]:
    """`steps` greedy tokens after `ids` through the graphs variant's step `step` (as DecodeGraphs
    calls it: the position on the device, each step's KV bucket), with a recompile refused; and the
    bucket each step attended."""
    from internvl_chat.engine.cuda_graph import kv_bucket

    with torch.inference_mode():
        token = model.forward(ids, 0).argmax().view(1)
        got, seen = [], []
        position = torch.tensor([len(ids)])
        with torch.compiler.set_stance("fail_on_recompile"):
            for _ in range(steps):
                got.append(int(token))
                seen.append(kv_bucket(int(position), model.max_seq_len))
                token = step.masked(token, position, seen[-1]).argmax().view(1)
                position += 1
    return got, seen


def test_the_graphs_variant_reaches_the_end_of_the_context_without_recompiling(eager, tiny_original):
    """The last bucket of a context: attention over the whole cache is a contiguous slice of it, which
    the compile took as never so (a guard), so a conversation reaching it compiled the step a second
    time (23 s here, 17-33 s on an H200) mid-answer. The buckets stop one short of the whole cache, and
    the context's very last position takes the eager step (captured all the same)."""
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT)
    model, lm = loaded.model, loaded.model.language_model
    ids = (eager.tokenizer.encode("one two three four five six seven") * 200)[: CONTEXT - 6]
    want, _ = greedy_steps(eager.model, ids, 6)
    step = compiled.CompiledStep(lm, model.device, for_graphs=True)
    assert step.compile()
    got, seen = masked_steps(model, step, ids, 6)  # to the cache's last position
    assert got == want and seen == [CONTEXT - 1] * 5 + [CONTEXT]
    assert step.active, step.failure  # no recompile tried


@pytest.mark.parametrize("context", [64, 256])
def test_the_graphs_variant_compiles_once_in_a_context_no_longer_than_the_first_bucket(tiny_original, context):
    """A context of MIN_BUCKET (256) tokens or fewer: the step was compiled over min(256, context) keys,
    there the whole cache (a contiguous slice, guarded on), while every bucket but the last position's
    stops one short of it, so the conversation's first step compiled it again (refused here)."""
    eager_small = load_model(tiny_original, device="cpu", dtype="float32", max_context=context, compile="off")
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=context)
    model = loaded.model
    ids = list(range(5, 5 + context - 4))
    want, _ = greedy_steps(eager_small.model, ids, 4)
    step = compiled.CompiledStep(model.language_model, model.device, for_graphs=True)
    assert step.compile()
    got, seen = masked_steps(model, step, ids, 4)  # to the cache's last position
    assert seen == [context - 1] * 3 + [context]
    assert step.active, step.failure  # no recompile tried
    assert got == want


def test_column_blocks_hold_every_long_row_exactly(tiny_original, monkeypatch):
    """chunk_long_rows cuts each linear with rows longer than ROW_CHUNK into contiguous column
    blocks that put the weight back together, counts them in memory_bytes, and leaves short rows
    and non-dense layers alone."""
    monkeypatch.setattr(language, "ROW_CHUNK", 40)
    model = load_model(tiny_original, device="cpu", dtype="float32", max_context=64, compile="off").model
    lm, before = model.language_model, model.memory_bytes()
    extra = language.chunk_long_rows(lm)
    long_rows = [m for m in lm.modules() if type(m) is torch.nn.Linear and m.in_features > 40]
    assert long_rows and extra == sum(m.weight.numel() * m.weight.element_size() for m in long_rows)
    for m in long_rows:
        assert all(c.is_contiguous() and c.shape[1] <= 48 for c in m.gemv_chunks)  # 40 rounded up to 16s
        assert torch.equal(torch.cat(m.gemv_chunks, dim=1), m.weight)
    assert all(not hasattr(m, "gemv_chunks") for m in lm.modules() if m not in long_rows)
    assert model.memory_bytes() == before + extra
    language.drop_row_chunks(lm)
    assert model.memory_bytes() == before


@pytest.mark.parametrize("kernel", ["avx2", "inductor"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_step_over_column_blocks_gives_the_eager_greedy_tokens(tiny_original, monkeypatch, dtype, kernel):
    """With every linear's rows longer than 40 (the tiny model has no row as long as a real down
    projection), the compiled step decodes the eager step's greedy tokens: with the AVX2 GEMV
    kernel (cpu_gemv.py), which reads whole rows, and with Inductor's loops over column blocks."""
    monkeypatch.setattr(language, "ROW_CHUNK", 40)
    monkeypatch.setattr(compiled, "NATIVE_CPU_STEP", False)  # Inductor's step, with or without the kernel
    if kernel == "inductor":
        monkeypatch.setattr(cpu_gemv, "loaded", lambda: False)  # as where it cannot be built
    elif cpu_gemv.ensure_loaded(compiled.use_cache_dir()) is not None:
        pytest.skip(f"no AVX2 GEMV kernel here: {cpu_gemv.failure()}")
    models = [load_model(tiny_original, device="cpu", dtype=dtype, max_context=256, compile=c).model for c in ("off", "on")]
    assert models[1].compiled_step is not None
    ids = list(range(5, 45))
    want, want_logits = greedy_steps(models[0], ids, 12)
    got, got_logits = greedy_steps(models[1], ids, 12)
    assert got == want and models[1].compiled_step.steps == 12
    tol = 0.05 if dtype == "bfloat16" else TOL
    assert (got_logits - want_logits).abs().max().item() <= tol * want_logits.abs().max().item()
    lm = models[1].language_model
    if kernel == "inductor":
        assert all(len(layer.mlp.down_proj.gemv_chunks) > 1 for layer in lm.model.layers)
    else:
        assert language.row_chunk_bytes(lm) == 0  # the kernel needs no copies


def test_kv_buckets_waste_little_at_long_contexts():
    from internvl_chat.engine.cuda_graph import kv_bucket

    sizes = {kv_bucket(pos, 32768) for pos in range(32768)}
    assert min(sizes) == 256 and max(sizes) == 32768 and len(sizes) <= 41  # the last position's whole cache: one more
    assert kv_bucket(32766, 32768) == 32767 and kv_bucket(32767, 32768) == 32768
    for pos in (0, 255, 256, 1000, 4095, 4096, 9999, 16383, 30000):
        size = kv_bucket(pos, 32768)
        assert pos < size <= max(256, (pos + 1) * 1.125 + 256), (pos, size)
    assert kv_bucket(5000, 4608) == 4608  # never past the cache


def test_bf16_without_native_bf16_keeps_an_fp32_kv_cache_eager_and_compiled_alike(tiny_original, monkeypatch):
    """bf16 weights on a CPU without native bf16 keep the KV cache in fp32 (cpu_features.
    kv_cache_dtype): prefill, chunk prefill after undo/retry, the compiled and the eager step and a
    serve slot's own cache all use it, and the compiled step decodes the eager step's tokens."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # what such a CPU takes, on any CPU
    monkeypatch.setattr(language, "ROW_CHUNK", 40)  # the column-block test's graph: one compile for both
    eager_bf16, fast_bf16 = (load_model(tiny_original, device="cpu", dtype="bfloat16", max_context=256, compile=c)
                             for c in ("off", "on"))  # fmt: skip
    assert fast_bf16.model.compiled_step is not None
    text = eager_bf16.config.text
    for loaded in (eager_bf16, fast_bf16):
        lm = loaded.model.language_model
        assert lm.lm_head.weight.dtype == torch.bfloat16
        assert all(k.dtype == v.dtype == torch.float32 for k, v in lm.caches())
        assert lm.cache_bytes() == 2 * text.num_layers * text.num_kv_heads * 256 * text.head_dim * 4
    ids = list(range(5, 45))
    want, want_logits = greedy_steps(eager_bf16.model, ids, 12)
    got, got_logits = greedy_steps(fast_bf16.model, ids, 12)
    assert got == want and fast_bf16.model.compiled_step.steps == 12
    assert (got_logits - want_logits).abs().max().item() <= 0.05 * want_logits.abs().max().item()

    params = SamplingParams(max_new_tokens=8)
    sessions = [Session(eager_bf16, params), Session(fast_bf16, params)]
    for action in ("ask:Hello there!", "ask:Tell me more about it.", "undo", "ask:Something else?", "retry"):
        for s in sessions:
            if action == "undo":
                s.undo()
            else:
                _drain(s.retry() if action == "retry" else s.ask(action[4:]))
        assert _answers(sessions[1]) == _answers(sessions[0]), action
    slot = Session(fast_bf16, params)  # a serve slot with KV tensors of its own
    assert slot.own_kv_cache() == fast_bf16.model.language_model.cache_bytes()
    alone = Session(eager_bf16, params)
    slot.activate_kv_cache()
    assert all(k.dtype == torch.float32 for k in fast_bf16.model.language_model.k_cache)
    for s in (slot, alone):
        _drain(s.ask("Something else?"))
    assert _answers(slot) == _answers(alone)
    assert fast_bf16.model.compiled_step.active and fast_bf16.model.compiled_step.failure is None
