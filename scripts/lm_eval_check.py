"""Run lm-evaluation-harness's `local-completions` model against `internvl-chat serve` for real.

    python scripts/lm_eval_check.py [--venv /tmp/venv-lmeval] [--batch-size N] [--num-concurrent N] [--output DIR]

with the project's Python (this checkout's package is imported and served). It creates a separate
venv for lm-eval when the one named is missing (lm-eval[api] and transformers for the tokenizer, no
torch: nothing is added to the project), serves the demo model on a free port, runs the three tiny
tasks under scripts/lm_eval_tasks/ offline (a multiple-choice one: loglikelihood requests, prompts
with echo and logprobs; a generate_until one: prompts with stop sequences; a loglikelihood_rolling
one: texts scored after a one-token context) as token ids and as text
(tokenized_requests=False: lm-eval decodes its ids, special tokens included), then once more as token
ids with lm-eval's remote tokenizer (tokenizer_backend=remote, no local tokenizer: the server's
/tokenize, /detokenize and /tokenizer_info), stops the server, and checks what lm-eval logged
against the same checkpoint loaded here: every choice's loglikelihood and is-greedy flag and every
text's loglikelihood against one full forward (to 1e-3), every generation against a greedy decode
cut at the task's stop strings; the remote tokenizer's run must log exactly what the local
tokenizer's ids run logged. Exit status 0 when all agree. Not part of the test suite: it installs
packages and takes a minute or two. Needs python3.11 on PATH (or --python) to make the venv.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # this checkout's package, not another one installed
    sys.path.insert(0, str(ROOT))

from internvl_chat.engine.loader import load_model  # noqa: E402
from internvl_chat.files import visible  # noqa: E402
from script_args import positive_int  # noqa: E402

MODEL = ROOT / "internvl_chat" / "demo_model"
TASKS = ROOT / "scripts" / "lm_eval_tasks"
LM_EVAL = "lm-eval[api]==0.4.13"  # the version this script was last run with (2026-12-05)
EXPECTED = {"internvl_demo_mc": (20, 4), "internvl_demo_gen": (10, 1), "internvl_demo_text": (3, 1)}  # docs, requests each
GEN_STOPS = (".", "\n", "<|im_end|>")  # the task's `until` and the eos string lm-eval adds
GEN_MAX_TOKENS = 24  # the task's max_gen_toks
TOLERANCE = 1e-3
SERVER_START_S = 120
# lm-eval's tokenized_requests (token ids, its default, or text it decodes from them and the server encodes
# again) and its tokenizer: the checkpoint's, loaded by transformers, or the server's endpoints ("remote")
REQUEST_MODES = {"ids": (True, "huggingface"), "text": (False, "huggingface"), "remote": (True, "remote")}
SAME_AS = {"remote": "ids"}  # a run whose logged answers must equal another's


def main() -> int:
    args = parse_args()
    lm_eval = ensure_venv(Path(args.venv), args.python)
    output = Path(args.output or tempfile.mkdtemp(prefix="lm-eval-check-"))
    # lm-eval gives up on a 429 after max_retries quick retries: every concurrent request needs a place in the queue
    server, port = start_server(queue_depth=max(8, args.num_concurrent))
    try:
        problems = [p for mode in REQUEST_MODES for p in run_and_check(lm_eval, port, output / mode, mode, args)]
        problems += [p for mode, other in SAME_AS.items() for p in compare_runs(output, mode, other)]
    finally:
        stop_server(server)
    for problem in problems[:20]:
        print("MISMATCH", problem)
    print(f"{'FAILED' if problems else 'OK'}: {lm_eval_version(lm_eval)}, {len(problems)} problems; samples in {output}")
    return 1 if problems else 0


def run_and_check(lm_eval: Path, port: int, output: Path, mode: str, args: argparse.Namespace) -> list[str]:
    run = run_lm_eval(lm_eval, port, output, args.batch_size, args.num_concurrent, *REQUEST_MODES[mode])
    if run.returncode != 0:
        print(run.stdout[-4000:])
        return [f"{mode} requests: lm_eval failed (exit {run.returncode}); its output is above"]
    print("\n".join(line for line in run.stdout.splitlines() if line.startswith("|")))
    return [f"{mode} requests: {problem}" for problem in check_samples(load_samples(output))]


def compare_runs(output: Path, mode: str, other: str) -> list[str]:
    """Each doc's logged responses in run `mode` against run `other`'s (the same requests, so the same answers)."""
    ours, theirs = load_samples(output / mode), load_samples(output / other)
    problems = []
    for task in EXPECTED:
        by_doc = {s["doc_id"]: s["resps"] for s in theirs[task]}
        problems += [f"{mode} requests: {task} doc {s['doc_id']} logged {s['resps']!r}, the {other} run "
                     f"{by_doc.get(s['doc_id'])!r}" for s in ours[task] if s["resps"] != by_doc.get(s["doc_id"])]  # fmt: skip
    return problems


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run lm-eval's local-completions model against the demo model's server")
    parser.add_argument("--venv", default="/tmp/venv-lmeval", help="lm-eval's venv, created when missing")
    parser.add_argument("--python", default="python3.11", help="interpreter that creates the venv")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="lm-eval's --batch_size (prompts per request)")
    parser.add_argument("--num-concurrent", type=positive_int, default=1, help="lm-eval's num_concurrent (requests at once)")
    parser.add_argument("--output", help="folder for lm-eval's results and samples (default: a new temp folder)")
    args = parser.parse_args()
    if not (Path(args.venv) / "bin" / "lm_eval").exists() and shutil.which(args.python) is None:  # a FileNotFoundError traceback
        parser.error(f"argument --python: {visible(args.python)} is not found, and {visible(args.venv)} has no lm_eval yet; "
                     "pass --python with a Python 3.11 interpreter, or --venv with lm-eval's venv")  # fmt: skip
    return args


# ---- the venv, the server, lm_eval ---------------------------------------------------------


def ensure_venv(venv: Path, python: str) -> Path:
    lm_eval = venv / "bin" / "lm_eval"
    if not lm_eval.exists():
        print(f"creating {venv} with {LM_EVAL} (a few minutes) ...", flush=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", LM_EVAL, "transformers"], check=True)
    return lm_eval


def lm_eval_version(lm_eval: Path) -> str:
    pip = lm_eval.parent / "pip"
    shown = subprocess.run([str(pip), "show", "lm-eval"], capture_output=True, text=True).stdout
    version = re.search(r"^Version: (.+)$", shown, re.M)
    return f"lm-eval {version.group(1) if version else '?'}"


def start_server(queue_depth: int) -> tuple[subprocess.Popen, int]:
    """The demo model's server on a free port (--port 0), the port read from its first line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "internvl_chat", "serve", "--model", str(MODEL), "--port", "0",
               "--queue-depth", str(queue_depth)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    too_slow = threading.Timer(SERVER_START_S, server.kill)  # a server that hangs silently ends the loop below
    too_slow.start()
    try:
        for line in server.stdout:
            print("server:", line.rstrip(), flush=True)
            found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                drain_in_background(server)
                return server, int(found.group(1))
    finally:
        too_slow.cancel()
    stop_server(server)
    raise SystemExit(f"the server did not start (it exited, or named no address within {SERVER_START_S} s); "
                     "its output is above")  # fmt: skip


def drain_in_background(server: subprocess.Popen) -> None:
    """Keep reading the server's log so a full pipe never blocks it."""
    threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def run_lm_eval(lm_eval: Path, port: int, output: Path, batch_size: int, concurrent: int, tokenized: bool,
                backend: str) -> subprocess.CompletedProcess:  # fmt: skip
    local = [f"tokenizer={MODEL}"] if backend == "huggingface" else []  # remote: the server's endpoints alone
    model_args = ",".join([
        "model=demo_model", f"base_url=http://127.0.0.1:{port}/v1/completions", *local,
        f"tokenizer_backend={backend}", f"num_concurrent={concurrent}", "max_retries=1",
        f"tokenized_requests={tokenized}",
    ])  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(output / "hf-home")}  # fmt: skip
    command = [str(lm_eval), "--model", "local-completions", "--model_args", model_args, "--batch_size", str(batch_size),
               "--tasks", ",".join(EXPECTED), "--include_path", str(TASKS.relative_to(ROOT)), "--log_samples",
               "--output_path", str(output)]  # fmt: skip
    print("running", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)  # the tasks' data paths are ROOT's


# ---- the check ---------------------------------------------------------------------------------


def load_samples(output: Path) -> dict[str, list[dict]]:
    samples = {}
    for task in EXPECTED:
        # the newest run's file (its name ends with the run's time): an --output used before holds older ones
        files = sorted(glob.glob(str(output / "**" / f"samples_{task}_*.jsonl"), recursive=True))
        samples[task] = [json.loads(line) for line in open(files[-1])] if files else []
    return samples


def check_samples(samples: dict[str, list[dict]]) -> list[str]:
    problems = []
    for task, (docs, per_doc) in EXPECTED.items():
        got = samples[task]
        if len(got) != docs or any(len(s["resps"]) != per_doc for s in got):
            problems.append(f"{task}: {len(got)} docs logged, expected {docs} with {per_doc} responses each")
    local = reference_model()
    problems += [p for s in samples["internvl_demo_mc"] for p in check_choices(local, s)]
    problems += [p for s in samples["internvl_demo_gen"] for p in check_generation(local, s)]
    problems += [p for s in samples["internvl_demo_text"] for p in check_rolling(local, s)]
    return problems


@functools.cache
def reference_model():
    return load_model(MODEL, device="cpu", dtype="float32")


def check_choices(local, sample: dict) -> list[str]:
    """Each choice's (loglikelihood, is_greedy) as lm-eval logged it against one full forward."""
    problems = []
    for request, resp in zip(sample["arguments"].values(), sample["resps"]):
        context, continuation = request["arg_0"], request["arg_1"]
        logged, logged_greedy = float(resp[0][0]), resp[0][1] in (True, "True")
        expected, greedy = reference_loglikelihood(local, context, continuation)
        if not math.isclose(logged, expected, abs_tol=TOLERANCE) or logged_greedy != greedy:
            problems.append(f"doc {sample['doc_id']} {continuation!r}: lm-eval logged ({logged:.5f}, {logged_greedy}), "
                            f"a full forward gives ({expected:.5f}, {greedy})")  # fmt: skip
    return problems


def reference_loglikelihood(local, context: str, continuation: str) -> tuple[float, bool]:
    """Tokenized as lm-eval tokenizes a pair: the context's trailing spaces moved to the
    continuation, the whole text encoded and split after the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = local.tokenizer.encode(context + continuation)
    context_ids = local.tokenizer.encode(context)
    targets = whole[len(context_ids) :]
    rows = full_logprobs(local, whole)[len(context_ids) - 1 : -1]
    picked = rows[torch.arange(len(targets)), torch.tensor(targets)]
    return float(picked.sum()), bool((rows.argmax(-1) == torch.tensor(targets)).all())


def check_rolling(local, sample: dict) -> list[str]:
    """A text's rolling loglikelihood (one window: the text is short) against one full forward of
    lm-eval's prefix token (the tokenizer's eos: it has no bos) and the text."""
    text, logged = sample["arguments"]["gen_args_0"]["arg_0"], float(sample["resps"][0][0])
    ids = [local.special.im_end, *local.tokenizer.encode(text)]
    rows = full_logprobs(local, ids)[:-1]
    expected = float(rows[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
    if not math.isclose(logged, expected, abs_tol=TOLERANCE):
        return [f"doc {sample['doc_id']}: lm-eval logged a rolling loglikelihood of {logged:.5f}, "
                f"a full forward gives {expected:.5f}"]  # fmt: skip
    return []


def check_generation(local, sample: dict) -> list[str]:
    context = sample["arguments"]["gen_args_0"]["arg_0"]
    logged = sample["resps"][0][0]
    expected = greedy_text(local, local.tokenizer.encode(context))
    if logged != expected:
        return [f"doc {sample['doc_id']}: lm-eval logged {logged!r}, a greedy decode gives {expected!r}"]
    return []


def greedy_text(local, ids: list[int]) -> str:
    """The greedy continuation (image tokens and <|im_start|> banned, as the sampler bans them) up to a stop token
    or GEN_MAX_TOKENS, its text cut before the first stop string."""
    special = local.special
    out: list[int] = []
    for _ in range(GEN_MAX_TOKENS):
        logits = full_logprobs(local, ids + out)[-1].clone()
        logits[[special.img_start, special.img_end, special.img_context, special.im_start]] = -math.inf
        token = int(logits.argmax())
        if token in (special.im_end, special.endoftext):
            break
        out.append(token)
    text = local.tokenizer.decode(out)
    cut = min((i for i in (text.find(stop) for stop in GEN_STOPS) if i >= 0), default=len(text))
    return text[:cut]


def full_logprobs(local, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return local.model.forward(ids, 0, all_logits=True).float().log_softmax(-1)


if __name__ == "__main__":
    sys.exit(main())
