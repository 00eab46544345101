"""The fast one-token decode step: our C++ step, or `torch.compile` (Inductor) of the decoder's step.

- CPU with AVX2 and FMA, where our kernels' library builds (cpu_gemv.py): the whole step in one
  C++ call (cpu_step.py), for every float32 or bfloat16 Qwen2 decoder; nothing is traced or
  compiled by Inductor. What follows is the step everywhere else.
- CPU: Inductor's C++ kernels (gcc or clang is needed the first time a model shape is compiled).
  The position is a symbolic int, so one compiled graph serves every cache length, and attention
  reads exactly the valid prefix: no bucket padding and no mask.
- CUDA: Triton kernels; the position lives on the device and the KV bucket is a symbolic int, so
  the same single compile is replayed from one CUDA graph per bucket (`cuda_graph.DecodeGraphs`).

Per layer, eager decode makes ~53 aten calls; compiled on CPU a handful: fused C++ kernels
(residual + RMSNorm, RoPE with the qkv bias and both cache writes, SiLU·mul), SDPA, and the
GEMVs. language.py's eager code is written so that these fuse. On a CPU with AVX2 and FMA the
one-row linears call our own GEMV kernel (cpu_gemv.py, built on first use); elsewhere they become
Inductor multiply-reduce kernels fused with their neighbours (rows longer than 4,096, the MLP's
down projection, from a copy cut into column blocks: `language.chunk_long_rows`). The CPU step
is then called without Dynamo's per-call guard check and without the Python layers above
Inductor's C++ entry (direct_call.py).

The first compile of a shape takes tens of seconds; Inductor's FX-graph and kernel caches (kept in
~/.cache/internvl-chat/inductor unless $TORCHINDUCTOR_CACHE_DIR says otherwise) turn later starts
into a load (an entry cut short by a crash is removed first, not warned about at every start).
Any failure to compile (no compiler, an unsupported CPU, an Inductor error, a cache folder that
cannot be made), and any attempt to recompile later, leaves the eager step in place with a
one-line note: never a crash.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..files import NoHomeFolder, visible, xdg_dir
from . import cpu_gemv, cpu_step, language
from .direct_call import FlatCall, unguarded
from .out_of_memory import is_out_of_memory

MODES = ("auto", "on", "off")
# Where "auto" compiles. CPU: decoders whose weights a token streams are large enough that the
# compiled step's bandwidth-bound kernels pay for the compile within an answer or two (measured
# in benchmarks/RESULTS.md); tiny models already decode faster than anyone reads, and start
# instantly. CUDA: not measured on a GPU in this build yet (scripts/gpu_check.sh does), so opt-in.
AUTO_MIN_DECODER_BYTES = {"cpu": 256 * 2**20, "cuda": None}
# On a CPU where the AVX2 kernels load, the whole step runs in C++ (cpu_step.py) instead of
# Inductor's code: nothing to compile, and ×1.3-2.2 the speed of Inductor's step on the demo model
# (level on the GEMV-bound 0.5B shape; benchmarks/RESULTS.md, Update 8). Tests turn it off to
# check the Inductor step that other CPUs get.
NATIVE_CPU_STEP = True
# Inductor options. CPU: a C++ wrapper instead of a Python one (less per-call overhead); loops
# run on several threads only with ≥ 256k elements of work per thread (the large GEMVs): every
# parallel region ends in a barrier that waits for the slowest thread, and a decode step has
# dozens of small loops (a busy second core made 2-thread steps 50× slower). Shape asserts are
# redundant with Dynamo's guards. realize_opcount_threshold 0: a value that is broadcast (a
# norm's output against every weight row of a multiply-reduce GEMV) or used twice is stored
# once, never recomputed per use; by default Inductor recomputes anything under ~50 operations.
CPU_OPTIONS = {"cpp_wrapper": True, "size_asserts": False, "cpp.min_chunk_size": 1 << 18, "realize_opcount_threshold": 0}
CUDA_OPTIONS = {"size_asserts": False}
# Programmatic Dependent Launch on Hopper and newer (sm90+), where the installed Inductor has it
# (`triton.enable_pdl`): each of the step's generated kernels starts while the one before it
# finishes, waiting only where it reads that kernel's output. It trims the per-kernel gap that a
# launch-bound decode step is made of. Off: set this False (or run without --compile).
CUDA_PDL = True


def inductor_options(device: torch.device) -> dict:
    """The Inductor options of the compiled step on `device`."""
    if device.type != "cuda":
        return dict(CPU_OPTIONS)
    options = dict(CUDA_OPTIONS)
    if CUDA_PDL and pdl_supported(device):
        options["triton.enable_pdl"] = True
    return options


def dynamo_options() -> dict:
    """Dynamo's settings while the step compiles: raise rather than run eagerly past 64 compiled
    entries, and floats as constants. The limit settings by the names this torch has: torch 2.6 knows
    only the old ones, and `config.patch` refuses a name it does not know (the step never compiled)."""
    from torch._dynamo import config as dynamo_config

    if hasattr(dynamo_config, "recompile_limit"):
        limits = {"fail_on_recompile_limit_hit": True, "recompile_limit": 64}
    else:
        limits = {"fail_on_cache_limit_hit": True, "cache_size_limit": 64}
    return {**limits, "specialize_float": True}


def pdl_supported(device: torch.device) -> bool:
    """Whether Inductor can generate PDL kernels for `device`: an sm90+ GPU and an Inductor that has
    the option (torch 2.9 and later)."""
    from torch._inductor import config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl") or torch.version.hip:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9

Notify = Callable[[str], None]


def _collect_frozen_at_exit() -> None:
    """Give what `gc.freeze` kept back to the collector before the interpreter ends: frozen cycles
    are never freed, and Triton's bindings (nanobind) print every such object of theirs still
    alive at exit as a leak — dozens of lines after the last answer."""
    if "triton" in sys.modules:
        gc.unfreeze()
        gc.collect()


def wanted(mode: str, device: torch.device, lm=None) -> bool:
    """Whether the `model.compile` setting asks for a compiled step for `lm` on `device`."""
    if mode != "auto":
        return mode == "on"
    threshold = AUTO_MIN_DECODER_BYTES.get(device.type)
    return threshold is not None and lm is not None and lm.decoder_bytes() >= threshold


def use_cache_dir() -> Path:
    """Point Inductor's caches at ~/.cache/internvl-chat/inductor (or $XDG_CACHE_HOME/…) unless
    $TORCHINDUCTOR_CACHE_DIR names another folder; make the folder, and return it (absolute).

    Importing torch._dynamo fills the variable with torch's default (a temp folder, lost on
    reboot), so that value counts as unset; before that import, a value is the user's. That import
    also makes the folder, and raises torch's own error where it cannot: so this runs first, and
    a folder that cannot be made (a file in the way, no such parent, no permission, no home
    folder) raises CacheFolderError here, before anything imports torch._dynamo.
    Inductor reads the variable whenever it caches."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and not _torch_default(current):
        folder = Path(os.path.abspath(current))
        fix = "set $TORCHINDUCTOR_CACHE_DIR to a folder you can write"
    else:
        try:
            base = xdg_dir(os.environ, "XDG_CACHE_HOME", ".cache")
        except NoHomeFolder as e:
            raise CacheFolderError(str(e)) from None
        folder = Path(os.path.abspath(base / "internvl-chat" / "inductor"))
        fix = "set $XDG_CACHE_HOME, or $TORCHINDUCTOR_CACHE_DIR, to a folder you can write"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = e.strerror or type(e).__name__
        if isinstance(e, FileExistsError):  # something not a folder in the way: the folder or one above it
            where = str(e.filename or folder)
            if os.path.islink(where):  # "a file is there" sent people looking for a file that is not
                why = f"{visible(where)} is a link to {visible(os.readlink(where))}, which is not a folder"
            else:
                why = "a file is there, not a folder" if where == str(folder) else f"{visible(where)} is a file, not a folder"
        if e.errno in _DISK_FULL:
            fix = f"free space on its disk, or {fix.replace('a folder you can write', 'a folder on another disk')}"
        raise CacheFolderError(f"the compile cache folder {visible(str(folder))} cannot be made ({why}); {fix}") from None
    # only a folder that exists: one that cannot be made, left in the variable, would read as the
    # user's at the next compile (a note naming a variable they never set) and make a later import
    # of torch._dynamo raise, where torch's own default folder would have served
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


# Inductor's caches that keep one pickle per file. One cut short (a crash or power loss after the
# rename that publishes it, before its data reached the disk) is never replaced: every later start
# printed torch's warning with a traceback for it (and another from the half-built graph's
# __del__) before compiling the step again.
PICKLED_CACHES = ("fxgraph", "aotautograd")


def drop_damaged_entries(cache_dir: Path) -> int:
    """Remove the entries of Inductor's pickled caches in `cache_dir` that are cut short (empty,
    or not ending with the pickle's STOP opcode "."); return how many. Files being written
    (Inductor's write_atomic: a hidden temporary, then a rename), and what is not a plain file
    (a symlink, a FIFO), are left alone."""
    dropped = 0
    for name in PICKLED_CACHES:
        for folder, _, files in os.walk(cache_dir / name):
            for file in files:
                if file.startswith("."):
                    continue
                path = os.path.join(folder, file)
                try:
                    # Inductor writes plain files: anything else (a symlink to a file elsewhere, a
                    # FIFO, whose open would block the start for ever) is not its entry to judge
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        continue
                    with open(path, "rb") as f:
                        if f.seek(0, os.SEEK_END) > 0:
                            f.seek(-1, os.SEEK_END)
                            if f.read(1) == b".":
                                continue
                    os.unlink(path)
                    dropped += 1
                except OSError:
                    pass  # unreadable or already gone: Inductor copes (and says so) as before
    return dropped


# a full disk, and a full quota (a home folder on a shared machine: the same fix)
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


class CacheFolderError(Exception):
    """The compile cache folder cannot be used; the message says why and what to do."""


def _torch_default(value: str) -> bool:
    """Whether `value` of $TORCHINDUCTOR_CACHE_DIR is the default torch._dynamo's import filled in
    (only once it is imported: importing torch's helper imports it, making that folder)."""
    if "torch._dynamo" not in sys.modules:
        return False
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(value) == os.path.abspath(default_cache_dir())


# what torch appends to a compile error's message for its own developers ("… if you're reporting a
# bug to PyTorch", the user code's frames): cut, it pushed the cause out of the one-line note
_TORCH_TAILS = ("\nfrom user code:", "\nSet TORCHDYNAMO_VERBOSE", "\nLast frame execution", "\nMinifier script")


def _one_line(error: BaseException) -> str:
    """A compiler's or capture's error as one short line, shown inert: Inductor passes on the C
    compiler's output, which quotes paths (the cache folder's) and source as they are."""
    text = str(error)
    for tail in _TORCH_TAILS:
        text = text.split(tail)[0]
    text = " ".join(text.split())
    first = text.split(". ")[0]
    return f"{type(error).__name__}: {visible(first[:160])}" if first else type(error).__name__


def _in_chain(error: BaseException, test: Callable[[BaseException], bool]) -> bool:
    """Whether `test` holds for `error` or one it wraps (Inductor's errors keep theirs as
    `inner_exception`; others as their cause or context)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if test(current):
            return True
        current = getattr(current, "inner_exception", None) or current.__cause__ or current.__context__
    return False


def _stderr_note(message: str) -> None:
    # `visible` leaves backslashes alone: text escaped before is not escaped twice
    print(f"internvl-chat: {visible(message)}", file=sys.stderr, flush=True)


class CompiledStep:
    """The decoder's one-token step, compiled once; `None` results mean "use the eager step".

    `exact(token, pos)` (CPU) and `masked` (the function CUDA graphs capture) are the compiled
    entry points. Until `compile()` succeeds, and after any failure, `active` is False.
    """

    def __init__(self, lm, device: torch.device, for_graphs: bool, notify: Notify | None = None):
        self.lm = lm
        self.device = device
        self.for_graphs = for_graphs  # compile `decode_masked` (CUDA graphs) instead of `decode_exact`
        self.notify = notify
        self.active = False
        self.steps = 0  # compiled steps run (tests check that the compiled path was taken)
        self.compile_s: float | None = None
        self.failure: str | None = None
        self._fn = None
        self.direct = False  # the CPU step runs without Dynamo's guard check (direct_call.unguarded)
        self.flat: FlatCall | None = None  # … and without the Python layers above Inductor's code
        self.native: cpu_step.CpuStep | None = None  # the step in C++ instead (CPU, AVX2 kernels loaded)
        with torch.inference_mode(False):  # normal tensors whatever the caller's mode: stable guards
            self._token = torch.zeros(1, dtype=torch.long, device=device)
            self._position = torch.full((1,), 2, dtype=torch.long, device=device)

    # -- building -----------------------------------------------------------------------------

    def compile(self) -> bool:
        """Trace and compile now (one warm-up step on scratch caches); False and a note on failure."""
        try:  # before anything imports torch._dynamo, which makes the folder and raises where it cannot
            self.cache_dir = use_cache_dir()
        except CacheFolderError as e:
            return self._fail(e, "was not compiled", plain=True)
        self._say("compiling the decode step …")
        start = time.perf_counter()
        options = inductor_options(self.device)
        kernel_failure = None
        if language.GEMV_AS_REDUCTION.get(self.device.type, False):
            if cpu_gemv.supported() is None:
                self._say("preparing the AVX2 kernels …")  # built once per torch and compiler: ~25 s (RESULTS.md, Update 8)
                kernel_failure = cpu_gemv.ensure_loaded(self.cache_dir)
            if NATIVE_CPU_STEP and not self.for_graphs and cpu_step.unsupported(self.lm) is None:
                return self._ready(cpu_step.CpuStep(self.lm), start)
            if not cpu_gemv.loaded():
                language.chunk_long_rows(self.lm)  # before tracing: the step reads these copies
        # only for Inductor (the C++ step above reads none of its caches): a walk of every entry
        if dropped := drop_damaged_entries(self.cache_dir):
            self._say(f"{dropped} damaged entr{'y' if dropped == 1 else 'ies'} removed from the compile cache")
        try:
            # fixed shape: never a symbolic size (a serve slot's own caches match it). Only here: the
            # C++ step above needs no torch._dynamo, whose import costs seconds at start (1.6-2.7 s, 2-core Xeon)
            for pair in self.lm.caches():
                for t in pair:
                    torch._dynamo.mark_static(t)
            # each model compiles its own entry (same code, other guards): raise rather than run eagerly
            # (specialize_float: float attributes such as RMSNorm's eps are constants; symbolic floats
            # would make Dynamo trace the whole step twice)
            with torch._dynamo.config.patch(**dynamo_options()):
                fn = self._build(options)
        except Exception as e:  # noqa: BLE001 — any compiler failure means "stay eager"
            return self._fail(e, "was not compiled")
        self._fn = fn
        # Compiling leaves millions of Python objects alive (graphs, guards, symbolic shapes); each
        # full garbage collection would walk them all again, mid-answer (a quarter of decode time
        # on the 0.5B shape). Collect once, then move everything alive now out of the collector's way.
        gc.collect()
        gc.freeze()
        atexit.unregister(_collect_frozen_at_exit)  # registered once however many steps compile
        atexit.register(_collect_frozen_at_exit)
        self.compile_s = time.perf_counter() - start
        self.active = True
        if kernel_failure is not None:  # compiled all the same, with Inductor's own loops
            _stderr_note(f"the AVX2 GEMV kernel was not built ({kernel_failure}); decoding is slower")
        self._say(f"decode step compiled in {self.compile_s:.1f} s")
        return True

    def _ready(self, native: cpu_step.CpuStep, start: float) -> bool:
        """Use the C++ step: checked on a scratch copy of the caches like the compiled one."""
        try:
            native.check(self._token)
        except Exception as e:  # noqa: BLE001 — a step that cannot run means "stay eager"
            return self._fail(e, "was not built")
        self.native = native
        self.compile_s = time.perf_counter() - start
        self.active = True
        self._say(f"decode step ready in {self.compile_s:.1f} s (C++ AVX2 kernels)")
        return True

    @torch.inference_mode()
    def _build(self, options: dict):
        """The compiled entry point, traced and compiled on scratch caches and run once.

        Scratch caches are exactly like the real ones (inference tensors or not: Dynamo guards on
        the difference), so the warm-up never writes the conversation's cache. Untouched pages of
        a large empty tensor are never made resident."""

        def like(t: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(t.is_inference()):
                return torch.empty_like(t)

        scratch = [(like(k), like(v)) for k, v in self.lm.caches()]
        for pair in scratch:
            for t in pair:
                t[:, :, :3].zero_()  # the positions the warm-up reads: comparable results, never NaN
                torch._dynamo.mark_static(t)
        if self.for_graphs:
            from .cuda_graph import kv_bucket

            fn = torch.compile(self.lm.decode_masked, fullgraph=True, dynamic=True, options=options)
            # over the first bucket, which is never the whole cache (a contiguous slice, guarded on:
            # with a context of MIN_BUCKET or less, every later bucket would compile the step again)
            fn(self._token, self._position, kv_bucket(0, self.lm.max_seq_len), scratch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return fn
        # positions 0 and 1 would specialise; `exact` never sends them
        target = type(self.lm).decode_exact
        fn = torch.compile(target, fullgraph=True, dynamic=True, options=options)
        example = (self.lm, self._token, 2, scratch)
        logits = fn(*example)
        direct = unguarded(target, fn, example, logits)
        self.direct = direct is not None
        if direct is not None:
            self.flat = FlatCall.build(direct, self.lm, self._token, scratch, self.lm.weights_version)
        return direct or fn

    def _fail(self, error: BaseException, what: str, plain: bool = False) -> bool:
        """`plain`: the error's message is already one line for the user (no type name, not cut)."""
        self.active = False
        self._fn = self.flat = self.native = None
        language.drop_row_chunks(self.lm)  # the eager step never reads them
        self.failure = visible(" ".join(str(error).split())) if plain else _one_line(error)
        fix = ""  # a plain error's message says what to do itself
        folder = visible(str(getattr(self, "cache_dir", None) or "the compile cache folder"))
        if plain:
            pass
        elif _in_chain(error, lambda e: getattr(e, "errno", None) in _DISK_FULL or any(m in str(e) for m in _DISK_FULL_TEXT)):
            fix = f"; free space on the disk of {folder}, or set $TORCHINDUCTOR_CACHE_DIR to a folder on another disk"
        elif _in_chain(error, lambda e: "failed to map segment from shared object" in str(e)):
            fix = (f"; the disk of {folder} does not let programs run from it (mounted noexec?): set "
                   "$TORCHINDUCTOR_CACHE_DIR to a folder on another disk")  # fmt: skip
        # always printed (a progress display would overwrite it); Rich's live displays pass stderr through
        _stderr_note(f"the decode step {what} ({self.failure}); using the eager step{fix}")
        return False

    def _say(self, message: str) -> None:
        if self.notify is not None:
            self.notify(message)

    # -- running ------------------------------------------------------------------------------

    def exact(self, token: torch.Tensor, pos: int) -> torch.Tensor | None:
        """Logits [V] for `token` at host position `pos`, or None: run the eager step."""
        if not self.active or self.for_graphs or not 2 <= pos < self.lm.max_seq_len:
            return None  # the general path: eager, or the overflow error
        if self.native is None and pos == self.lm.max_seq_len - 1:
            # attention over the whole cache, a contiguous slice: Inductor's step is guarded on it
            # never being so (a recompile, refused); that one position runs eager
            return None
        try:
            if self.native is not None:
                logits = self.native(token, pos)
            else:
                self._token.copy_(token.view(1))  # tokens come as inference or normal tensors: one kind in
                # the caches in use now: a server swaps in each slot's own (same shape and kind)
                flat = self.flat
                if flat is not None and flat.version == self.lm.weights_version:
                    logits = flat(pos, self.lm.caches())
                else:
                    with contextlib.nullcontext() if self.direct else torch.compiler.set_stance("fail_on_recompile"):
                        logits = self._fn(self.lm, self._token, pos, self.lm.caches())
            self.steps += 1
            return logits
        except Exception as e:  # noqa: BLE001 — a guard failure or runtime error: eager from now on
            if is_out_of_memory(e):  # not the step's fault: this token runs eager (or fails there), later ones here
                return None
            self._fail(e, "failed")
            return None

    def masked(self, token: torch.Tensor, position: torch.Tensor, kv_len: int) -> torch.Tensor:
        """The CUDA-graph step (`decode_masked`), compiled when active; for DecodeGraphs (which
        captures it, the two copies included, so they cost no launch of their own). Attention over
        the whole cache (the context's last position, `cuda_graph.kv_bucket`) takes the eager step:
        that slice is contiguous, and the compiled step, guarded on it never being so, would be
        compiled again (as long as the first compile) in the middle of an answer."""
        if not self.active or kv_len >= self.lm.max_seq_len:
            return self.lm.decode_masked(token, position, kv_len)
        try:
            self._token.copy_(token.view(1))
            self._position.copy_(position.view(1))
            return self._fn(self._token, self._position, kv_len, self.lm.caches())  # captured per cache set
        except Exception as e:  # noqa: BLE001 — as in `exact`: the eager step from now on
            # Out of memory is not the step's fault, and an error while a graph is captured is the
            # capture's (DecodeGraphs runs the step without graphs then): both go to the caller.
            # Anything else failed before a capture, in DecodeGraphs' warm-up or in a launch
            # without graphs, where the eager step can take over at once.
            if is_out_of_memory(e) or (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                raise
            self._fail(e, "failed")
            return self.lm.decode_masked(token, position, kv_len)
