"""SIGTERM and SIGHUP at each phase of a one-shot or --script run (the demo model, in a child process).

Each signal is sent by the child to itself from inside the phase (a patched function sends it on
its first call), so it lands at that very point every run, with no sleep and no timing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

# the child: `target` (module:Class.method or module:function, then @N for its Nth call, else its
# first) sends `signame` as it is called
CHILD = """
import importlib, os, signal, sys
target, signame = sys.argv[1], sys.argv[2]
signal.signal(getattr(signal, signame), signal.SIG_DFL)  # as a shell starts it: pytest itself may run under nohup
target, _, nth = target.partition("@")
module_name, _, attribute = target.partition(":")
owner = importlib.import_module(module_name)
*path, name = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), []

def signalled(*args, **kwargs):
    calls.append(True)
    if len(calls) == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, signame))
    return real(*args, **kwargs)

setattr(owner, name, signalled)
from internvl_chat.cli import main
sys.exit(main(sys.argv[3:]))
"""

PHASES = {
    "loading": "internvl_chat.engine.loader:check_tokenizer_fits_vocab",
    "encoding the picture": "internvl_chat.engine.model:InternVLModel.encode_images",
    "before the first token": "internvl_chat.chat.sampling:Sampler.read",
}


def run_signalled(tmp_path: Path, target: str, signame: str, *args: str, stdin: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull, "HOME": str(tmp_path)}
    env.pop("XDG_STATE_HOME", None)
    return subprocess.run([sys.executable, "-c", CHILD, target, signame, "--device", "cpu", "--max-new-tokens", "8", *args],
                          input=stdin, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip


def picture(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(path)
    return path


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_signal_before_the_answer_begins_ends_a_oneshot_run_with_one_line(tmp_path, phase, signame):
    """Before the first token SIGTERM (`timeout`) and SIGHUP had their defaults: the process was
    killed (status -15 / -1 to its parent) without a word. They end it as Ctrl-C does: one line,
    status 128 + the signal."""
    done = run_signalled(tmp_path, PHASES[phase], signame, "--image", str(picture(tmp_path)), "-p", "describe")
    assert done.returncode == 128 + getattr(signal, signame), done.stderr
    assert done.stdout == ""
    assert done.stderr.endswith(f"internvl-chat: stopped by {signame}\n") and "Traceback" not in done.stderr, done.stderr


def test_a_sigterm_while_a_script_saves_leaves_no_temp_file(tmp_path):
    """SIGTERM's default killed a --script run inside /save's write, leaving the hidden
    `.s.json.*.tmp` beside where the session was to go; now the write is undone and the run ends
    with one line, status 143."""
    script = f"/image {picture(tmp_path)}\ndescribe\n/save s.json\n"
    done = run_signalled(tmp_path, "os:fsync", "SIGTERM", "--script", "-", stdin=script)
    assert done.returncode == 143, done.stderr
    assert done.stderr.endswith("internvl-chat: stopped by SIGTERM\n") and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.png"]  # no session, whole or half, nor its temp file


def test_a_sigterm_mid_answer_in_a_script_ends_the_answers_line(tmp_path):
    """Killed mid-answer, a --script transcript ended inside the answer's line, with nothing on
    stderr saying why."""
    target = "internvl_chat.chat.sampling:Sampler.read@3"  # two tokens are out
    done = run_signalled(tmp_path, target, "SIGTERM", "--script", "-", stdin="describe\n")
    assert done.returncode == 143, done.stderr
    assert done.stdout.endswith("\n") and ">>> describe\n" in done.stdout
    assert done.stderr.endswith("internvl-chat: stopped by SIGTERM\n") and "Traceback" not in done.stderr, done.stderr


def test_a_sigterm_just_after_the_last_token_still_ends_the_answers_line(tmp_path):
    """The answer's own handlers were put back at its last token, before its line was ended: a
    SIGTERM there (the run's first Session.describe, just after the answer) ended the run with the
    text unended and "stopped by SIGTERM" continuing its line on a terminal."""
    done = run_signalled(tmp_path, "internvl_chat.chat.session:Session.describe", "SIGTERM", "-p", "describe")
    assert done.returncode == 143, done.stderr
    assert done.stdout.strip() and done.stdout.endswith("\n"), repr(done.stdout)  # the whole answer, its line ended
    assert done.stderr.endswith("internvl-chat: stopped by SIGTERM\n") and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    "target, args",
    [
        # one that lands as main puts its handlers in, the first in and the second not yet
        ("signal:getsignal@2", ["-p", "describe"]),
        # one that lands as an error's line is printed (a picture that is not there)
        ("internvl_chat.cli:_print_error", ["--image", "missing.png", "-p", "describe"]),
    ],
    ids=["as the handlers are put in", "as an error is reported"],
)
def test_a_sigterm_at_the_edges_of_main_ends_the_run_with_one_line(tmp_path, target, args):
    """EndedBySignal was caught only around run(): raised as main put its handlers in, or inside
    main's own `except` while another ending was reported, it escaped main as a traceback, status 1."""
    done = run_signalled(tmp_path, target, "SIGTERM", *args)
    assert done.returncode == 143, done.stderr
    assert done.stderr.endswith("internvl-chat: stopped by SIGTERM\n") and "Traceback" not in done.stderr, done.stderr


# the child for a stdout nobody reads: every token is " triangle", never the end, so the answer fills the pipe
ENDLESS = """  # 2,000 tokens: 18,000 bytes of text, its --json object over 25,000
import signal, sys
# as a shell starts it: pytest itself may run under nohup (SIGHUP ignored) or as a background job
# (SIGINT ignored), which the child inherits and the CLI keeps ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
from internvl_chat.chat import sampling
real = sampling.Sampler.read
def read(self, token):
    real(self, token)
    return 288  # " triangle"
sampling.Sampler.read = read
from internvl_chat.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs Linux's /proc/PID/wchan")
@pytest.mark.parametrize("signame, json_flag", [("SIGTERM", []), ("SIGINT", []), ("SIGHUP", ["--json"])],
                         ids=["SIGTERM", "SIGINT", "SIGHUP, --json"])
def test_a_signal_while_stdout_waits_on_a_reader_that_does_not_read_ends_the_run(tmp_path, signame, json_flag):
    """Once the answer had begun a stop signal only asked for a stop at the next token; with the
    answer's write waiting on a reader that stopped reading (its pipe full: `timeout 60
    internvl-chat -p … | stalled`), no next token came: SIGTERM, Ctrl-C and SIGHUP did nothing, for
    good. Now one that lands in the write ends the run with the usual line and status."""
    import fcntl
    import time

    read_end, write_end = os.pipe()
    with suppress(OSError):
        fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: a small pipe fills with a short answer
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull, "HOME": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-c", ENDLESS, "--device", "cpu", "--max-new-tokens", "2000", "-p", "hi", *json_flag],
                             stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE, env=env, cwd=tmp_path)  # fmt: skip
    os.close(write_end)
    try:
        deadline = time.monotonic() + 300  # a safety net only: the child blocks as soon as the pipe is full
        while "pipe_write" not in _wchan(child.pid):
            assert child.poll() is None and time.monotonic() < deadline, "the answer never filled the pipe"
            time.sleep(0.05)
        child.send_signal(getattr(signal, signame))
        try:
            _, stderr = child.communicate(timeout=120)  # stdout is still not read
        except subprocess.TimeoutExpired:
            pytest.fail(f"{signame} did not end a run whose stdout waited on its reader")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(read_end)
    note = "interrupted" if signame == "SIGINT" else f"stopped by {signame}"
    assert child.returncode == 128 + getattr(signal, signame), stderr
    assert stderr.decode().endswith(f"internvl-chat: {note}\n") and b"Traceback" not in stderr, stderr
