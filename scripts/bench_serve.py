"""Benchmark `internvl-chat serve` against the local Session on the same checkpoint (issue 11).

  followup  TTFT of a follow-up turn (a 3-tile image in turn 1, history resent in full) through the
            server vs the local Session; prefilled/cached tokens as each side reports them
  stream    time per streamed token, first to last content chunk (serve) vs first to last text
            event (Session): the per-token cost of the HTTP/SSE path
  load      8 concurrent clients for N seconds against a queue of 4: every request must be answered
            or refused with 429; the server's RSS at the start and at the end

The server runs as `internvl-chat serve` in its own process (as users run it), the client and the
local Session in this one; both sides use one torch thread and run in turn, never together.
Default model: bench_lib's FULL random-weight shapes (InternViT 256×4, Qwen2 512×8) with the test
tokenizer's vocabulary only, so every generated id is text and answers run to max_tokens;
`--model DIR` uses another checkpoint (e.g. internvl_chat/demo_model).

    python scripts/bench_serve.py [--model DIR] [--quick] [--seconds 60] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lib as bl  # noqa: E402
from script_args import one_line_errors, output_file, positive_int, seconds as seconds_arg  # noqa: E402

from internvl_chat.chat.sampling import SamplingParams  # noqa: E402
from internvl_chat.chat.session import Session  # noqa: E402
from internvl_chat.engine.loader import load_model  # noqa: E402

MAX_CONTEXT = 4096
HISTORY = [
    ("Describe this picture in detail.", True),
    ("Which colours dominate it?", False),
]
# each follow-up starts with another word, so the server cannot reuse the previous follow-up's text
FIRST_WORDS = ["Count", "Name", "List", "Find", "Describe", "Compare", "Explain", "Show", "Tell", "Give", "Say"]
FOLLOW_UP = "{word} the distinct shapes you can see, and where they are."
STORY = "Tell me a long story about a small robot who wants to learn how to paint the sea."


# ---- the server process ---------------------------------------------------------------------


class ServerProcess:
    def __init__(self, model: Path, queue_depth: int, slots: int = 2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "INTERNVL_CHAT_CONFIG": os.devnull,
               "PYTHONPATH": str(bl.REPO_ROOT)}  # fmt: skip
        cmd = [sys.executable, "-m", "internvl_chat.cli", "serve", "--model", str(model), "--port", "0",
               "--device", "cpu", "--dtype", "float32", "--max-context", str(MAX_CONTEXT), "--slots", str(slots),
               "--queue-depth", str(queue_depth), "--model-id", "bench", "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stderr], daemon=True).start()
        self.url = None
        while self.url is None:
            line = lines.get(timeout=300)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            self.url = found and found.group(1)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(60)


def stream_request(http: httpx.Client, url: str, messages: list, max_tokens: int) -> dict:
    """One streamed completion: client-side content-chunk times, the end time, the final timings and usage."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    times, text, final, t_end = [], [], {}, None
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
                text.append(event["choices"][0]["delta"]["content"])
            if event.get("choices") and event["choices"][0]["finish_reason"]:
                t_end = time.perf_counter()
            if event.get("usage"):
                final = event
    return {"t0": t0, "times": times, "t_end": t_end, "text": "".join(text), "usage": final.get("usage"),
            "timings": final.get("timings")}  # fmt: skip


def image_message(text: str, image_url: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]}


# ---- sections ---------------------------------------------------------------------------------


def local_stream(session: Session, text: str, media, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    times, final = [], None
    for event in session.ask(text, media, SamplingParams(max_new_tokens=max_tokens)):
        if event["text"]:
            times.append(time.perf_counter())
        final = event
    return {"t0": t0, "times": times, "t_end": time.perf_counter(), "final": final}


def section_followup(server: ServerProcess, session: Session, image: Path, repeats: int, answer_tokens: int) -> dict:
    image_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    messages: list[dict] = []
    for text, with_image in HISTORY:  # the same history on both sides, built by the local session
        media = [session.describe_image(image)] if with_image else []
        local_stream(session, text, media, answer_tokens)
        messages.append(image_message(text, image_url) if with_image else {"role": "user", "content": text})
        messages.append({"role": "assistant", "content": session.turns[-1].answer_text})
    local_ttft, serve_ttft, serve_rows = [], [], []
    with httpx.Client(timeout=300) as http:
        warm = messages + [{"role": "user", "content": FOLLOW_UP.format(word=FIRST_WORDS[0])}]
        stream_request(http, server.url, warm, answer_tokens)  # the server's cache now holds the history
        for k in range(1, repeats + 1):
            question = FOLLOW_UP.format(word=FIRST_WORDS[k % len(FIRST_WORDS)])
            run = local_stream(session, question, [], answer_tokens)
            local_ttft.append(run["times"][0] - run["t0"])
            local_prefill = run["final"]["timing"]["prefill_tokens"]
            session.undo()
            served = stream_request(http, server.url, messages + [{"role": "user", "content": question}], answer_tokens)
            serve_ttft.append(served["times"][0] - served["t0"])
            serve_rows.append({"prompt_n": served["timings"]["prompt_n"], "cache_n": served["timings"]["cache_n"],
                               "prompt_tokens": served["usage"]["prompt_tokens"], "local_prefill": local_prefill})  # fmt: skip
    local_ms, serve_ms = bl.median(local_ttft) * 1000, bl.median(serve_ttft) * 1000
    return {"history_tokens": serve_rows[-1]["prompt_tokens"], "rows": serve_rows, "repeats": repeats,
            "local_ttft_ms": local_ms, "serve_ttft_ms": serve_ms, "ratio": serve_ms / local_ms,
            "local_all_ms": [x * 1000 for x in local_ttft], "serve_all_ms": [x * 1000 for x in serve_ttft]}  # fmt: skip


def section_stream(server: ServerProcess, session: Session, repeats: int, tokens: int) -> dict:
    local_per, serve_per, counts, engine_rate, local_rate, engine_per = [], [], [], [], [], []
    with httpx.Client(timeout=300) as http:
        for k in range(repeats):
            session.clear()
            # first text to the end of the answer, per token after the first (chunks may hold several tokens)
            run = local_stream(session, f"{STORY} ({k})", [], tokens)
            n_local = len(run["final"]["token_ids"])
            local_per.append((run["t_end"] - run["times"][0]) / (n_local - 1))
            served = stream_request(http, server.url, [{"role": "user", "content": f"{STORY} ({k})"}], tokens)
            n_served = served["usage"]["completion_tokens"]
            serve_per.append((served["t_end"] - served["times"][0]) / (n_served - 1))
            engine_rate.append(served["timings"]["predicted_per_second"])
            engine_per.append(served["timings"]["predicted_per_token_ms"] / 1000)
            local_rate.append(run["final"]["timing"]["decode_tokens_per_s"])
            counts.append((n_local, n_served, len(served["times"])))
    local_ms, serve_ms = bl.median(local_per) * 1000, bl.median(serve_per) * 1000
    return {"tokens": tokens, "tokens_tokens_chunks": counts, "local_ms_per_token": local_ms, "serve_ms_per_token": serve_ms,
            "overhead": serve_ms / local_ms - 1, "local_decode_tok_s": bl.median(local_rate),
            "server_engine_ms_per_token": bl.median(engine_per) * 1000,
            "overhead_vs_server_engine": bl.median([c / e - 1 for c, e in zip(serve_per, engine_per)]),
            "server_engine_decode_tok_s": bl.median(engine_rate)}  # fmt: skip


def section_load(server: ServerProcess, image: Path, seconds: float, clients: int, answer_tokens: int) -> dict:
    image_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    outcomes: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(n: int) -> None:
        rng = random.Random(n)
        history: list[dict] = []
        with httpx.Client(timeout=600) as http:
            while time.monotonic() < stop_at:
                if len(history) >= 8:  # four turns, then a new conversation
                    history = []
                text = f"client {n}: {rng.choice(['Describe it.', 'What colour?', 'Count the shapes.', 'Why?'])}"
                user = image_message(text, image_url) if not history and rng.random() < 0.5 else {"role": "user", "content": text}
                body = {"model": "bench", "messages": history + [user], "max_tokens": answer_tokens, "temperature": 0,
                        "stream": bool(rng.random() < 0.5)}  # fmt: skip
                try:
                    r = http.post(f"{server.url}/v1/chat/completions", json=body)
                    if r.status_code == 200:
                        content = _content(r)
                        history += [user, {"role": "assistant", "content": content}]
                        outcome = "200"
                    elif r.status_code == 429:
                        outcome = "429"
                        time.sleep(min(float(r.headers.get("retry-after", "1")), 1.0))
                    else:
                        outcome = f"http {r.status_code}"
                except Exception as e:  # noqa: BLE001 - a lost request is what this section looks for
                    outcome = f"lost: {type(e).__name__}"
                with lock:
                    outcomes.append(outcome)

    rss_start = server.rss_mib()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    series, next_sample = [], time.monotonic()
    while any(t.is_alive() for t in threads):
        if time.monotonic() >= next_sample:
            series.append(round(server.rss_mib(), 1))
            next_sample += seconds / 12
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    rss_end = server.rss_mib()
    healthy = httpx.get(f"{server.url}/health").status_code == 200
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    return {"clients": clients, "seconds": seconds, "wall_s": wall, "requests": len(outcomes), "outcomes": counts,
            "answered_per_s": counts.get("200", 0) / wall, "rss_start_mib": rss_start, "rss_end_mib": rss_end,
            "rss_peak_mib": max(series + [rss_end]), "rss_series_mib": series, "healthy_after": healthy}  # fmt: skip


def _content(r: httpx.Response) -> str:
    if r.headers["content-type"].startswith("text/event-stream"):
        parts = []
        for line in r.text.split("\n\n"):
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                if event.get("choices"):
                    parts.append(event["choices"][0]["delta"].get("content") or "")
        return "".join(parts)
    return r.json()["choices"][0]["message"]["content"]


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint (default: bench_lib's FULL random-weight model, built here)")
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats, a 3-second load test (a smoke test)")
    p.add_argument("--seconds", type=seconds_arg, default=60.0, help="duration of the concurrent-clients section")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--out", type=output_file, help="write the results as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    # embedding rows = the tokenizer's size: a random model then only generates ids that decode to text
    plan = dataclasses.replace(bl.QUICK if args.quick else bl.FULL, vocab_multiple=64)
    seconds, repeats = (3.0, 2) if args.quick else (args.seconds, args.repeats)
    stream_tokens = 16 if args.quick else 128
    answer_tokens = plan.answer_tokens
    results: dict = {"machine": bl.machine_info(torch.device("cpu")), "plan": plan.name}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or bl.build_checkpoint(Path(tmp) / "model", plan)
        image = bl.write_test_image(Path(tmp) / "image.png", *plan.engine_image)
        results["model"] = str(args.model or f"random {plan.name} plan")
        session = Session(load_model(model, device="cpu", dtype="float32", max_context=MAX_CONTEXT))
        server = ServerProcess(model, queue_depth=4)
        try:
            bl.log("follow-up TTFT")
            results["followup"] = section_followup(server, session, image, repeats, answer_tokens)
            bl.log("streaming per token")
            results["stream"] = section_stream(server, session, repeats, stream_tokens)
            del session
            bl.log(f"8 clients for {seconds:.0f} s")
            results["load"] = section_load(server, image, seconds, 8, answer_tokens)
        finally:
            results["server_exit"] = server.stop()
    f, s, load = results["followup"], results["stream"], results["load"]
    print(f"follow-up TTFT: local {f['local_ttft_ms']:.1f} ms, serve {f['serve_ttft_ms']:.1f} ms, ×{f['ratio']:.2f} "
          f"(history {f['history_tokens']} tokens; serve prefilled {f['rows'][-1]['prompt_n']}, cached {f['rows'][-1]['cache_n']}; "
          f"local prefilled {f['rows'][-1]['local_prefill']})")  # fmt: skip
    print(f"streaming: local {s['local_ms_per_token']:.2f} ms/token, serve {s['serve_ms_per_token']:.2f} ms/token, "
          f"{s['overhead'] * 100:+.1f} % (decode rate inside each: local {s['local_decode_tok_s']:.1f}, server engine "
          f"{s['server_engine_decode_tok_s']:.1f} tok/s); client vs the server's own engine: "
          f"{s['overhead_vs_server_engine'] * 100:+.1f} %")  # fmt: skip
    print(f"load: {load['requests']} requests in {load['wall_s']:.0f} s → {load['outcomes']}; RSS {load['rss_start_mib']:.0f} → "
          f"{load['rss_end_mib']:.0f} MiB (samples {load['rss_series_mib']}); healthy after: {load['healthy_after']}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    lost = [k for k in load["outcomes"] if k not in ("200", "429")]
    return 1 if lost or not load["healthy_after"] or results["server_exit"] != 0 else 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
