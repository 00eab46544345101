"""Calling a compiled CPU decode step without the Python layers around Inductor's C++ code.

A call through `torch.compile` passes Dynamo's frame hook and guard check, then the bytecode
Dynamo wrote (it gathers every weight from the module tree: ~40 attribute chains on the demo
model), then AOTAutograd's runtime wrappers, then Inductor's own wrapper. On a tiny model those
layers cost as much as a third of a step (measured in benchmarks/RESULTS.md). Two shortcuts,
each taken only after it reproduced the guarded call's logits bit for bit, else the longer way
stays:

- `unguarded`: the code Dynamo compiled, called as a plain function (no frame hook, no guards);
- `FlatCall`: Inductor's compiled graph called with the flat argument list that code builds,
  recorded once (weights, the token buffer, constants), with only the position and the caches
  filled in per step.

Nothing the skipped guards check can change underneath `CompiledStep.exact`: the token is its own
buffer, caches are swapped only for tensors of the same shape, dtype and device
(Qwen2ForCausalLM._set_cache), positions < 2 never come, and the weights are never replaced after
compiling (`Qwen2ForCausalLM.weights_version` counts conversions such as `.to()`; a changed count
sends the step from `FlatCall` back to Dynamo's code, which reads the module again).
"""

from __future__ import annotations

import types

import torch

COMPILED_FN_PREFIX = "__compiled_fn"  # how Dynamo names the graph it installs in a module's globals
# every name the Python wrapper of Inductor's C++ entry uses when it only turns ints into tensors
CPP_WRAPPER_NAMES = frozenset(
    ("isinstance", "torch", "Tensor", "tensor", "_C", "_aoti", "unsafe_alloc_void_ptrs_from_tensors", "clear",
     "alloc_tensors_by_stealing_from_void_ptrs")
)  # fmt: skip


def unguarded(target, guarded, example: tuple, expected: torch.Tensor):
    """The code Dynamo compiled for `target` with `example`, as a plain function, or None.

    Taken only where torch lists a compiled entry whose guards accept `example` and it reproduces
    the guarded call's logits bit for bit (a torch whose internals differ keeps the guarded call)."""
    try:
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(target.__code__)
        names = target.__code__.co_varnames[: target.__code__.co_argcount]
        f_locals = dict(zip(names, example))
        code = next(e.code for e in entries if e.guard_manager.check(f_locals))
        direct = types.FunctionType(code, target.__globals__, target.__name__, target.__defaults__, target.__closure__)
        return direct if torch.equal(direct(*example), expected) and torch.equal(guarded(*example), expected) else None
    except Exception:  # noqa: BLE001 — no such entry, or an internal that changed: keep the guarded call
        return None


def _compiled_graph(root, depth: int = 0, seen: set | None = None):
    """The Inductor CompiledFxGraph reachable from AOTAutograd's compiled function (through
    closures and attributes; a full graph has one), or None."""
    from torch._inductor.output_code import CompiledFxGraph

    seen = set() if seen is None else seen
    if id(root) in seen or depth > 16 or isinstance(root, (torch.Tensor, torch.nn.Module, type, str, int, float)):
        return None
    seen.add(id(root))
    if isinstance(root, CompiledFxGraph):
        return root
    # a cell can be empty: torch 2.11's AOTAutograd runtime wrapper closes over `output_handlers`,
    # bound only when an output aliases an input
    cells = [c.cell_contents for c in getattr(root, "__closure__", None) or () if _filled_cell(c)]
    children = [c for c in cells if c is not None]
    if isinstance(root, (list, tuple)):
        children += list(root)
    elif not isinstance(root, (types.FunctionType, types.BuiltinFunctionType)) and hasattr(root, "__dict__"):
        children += list(vars(root).values())
    for child in children:
        found = _compiled_graph(child, depth + 1, seen)
        if found is not None:
            return found
    return None


class FlatCall:
    """`decode_exact`'s compiled graph as `call(pos, caches) -> logits`, or `build` gives None.

    The flat argument list is recorded from two calls of `direct` (at positions 2 and 3): every
    slot must hold the same object (or equal int) both times, except one int that is the
    position and the cache tensors, which are looked up by identity in `scratch`."""

    def __init__(self, entry, template: list, pos_slot: int, cache_slots: list[tuple[int, int, int]],
                 cache_layout: tuple, version: int):  # fmt: skip
        self._entry = entry
        self._template = template
        self._pos_slot = pos_slot
        self._cache_slots = cache_slots  # (slot, layer, 0 for k / 1 for v)
        self._cache_layout = cache_layout  # every cache tensor's, as recorded
        self.version = version  # the weights_version the recorded weights belong to
        self._caches = None  # the caches list `_filled` was made for
        self._filled: list = []
        self._pos_view = None  # C++ entry only: a NumPy view of the template's 0-d position tensor

    def _to_cpp_entry(self) -> FlatCall | None:
        """The same call one level further down, or None: Inductor's C++ wrapper entry itself, which
        takes tensors only (its Python wrapper makes a tensor of every int on each call)."""
        code = self._entry.__code__
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in self._entry.__closure__ or ())))
        cpp = cells.get("f")
        # A wrapper that does anything more (appends constant tensors, as for 4-bit weights) is
        # not the one this call stands in for: a wrong argument list would crash in C++.
        if set(cells) != {"f"} or not set(code.co_names) <= CPP_WRAPPER_NAMES or not isinstance(cpp, types.BuiltinFunctionType):
            return None
        template = [torch.tensor(a) if type(a) is int else a for a in self._template]
        flat = FlatCall(cpp, template, self._pos_slot, self._cache_slots, self._cache_layout, self.version)
        flat._pos_view = template[self._pos_slot].numpy()
        return flat

    @classmethod
    def build(cls, direct, lm, token: torch.Tensor, scratch: list, version: int) -> FlatCall | None:
        try:
            names = [n for n in direct.__code__.co_names if n.startswith(COMPILED_FN_PREFIX)]
            if len(names) != 1:
                return None
            graph_fn = direct.__globals__[names[0]]
            graph = _compiled_graph(graph_fn)
            if graph is None or not callable(getattr(graph, "current_callable", None)):
                return None
            calls: list[list] = []
            outputs: list[torch.Tensor] = []

            def recorder(*args):
                calls.append(list(args))
                return graph_fn(*args)

            direct.__globals__[names[0]] = recorder
            try:
                for pos in (2, 3):
                    outputs.append(direct(lm, token, pos, scratch))
            finally:
                direct.__globals__[names[0]] = graph_fn
            first, second = calls
            if len(first) != len(second):
                return None
            where = {id(t): (layer, j) for layer, pair in enumerate(scratch) for j, t in enumerate(pair)}
            pos_slots, cache_slots = [], []
            for slot, (a, b) in enumerate(zip(first, second)):
                if id(a) in where and a is b:
                    cache_slots.append((slot, *where[id(a)]))
                elif type(a) is int and type(b) is int and (a, b) == (2, 3):
                    pos_slots.append(slot)
                elif not (a is b or (type(a) is int and a == b)):
                    return None
            layouts = {_layout(t) for pair in scratch for t in pair}
            if len(pos_slots) != 1 or len(cache_slots) != 2 * len(scratch) or len(layouts) != 1:
                return None
            for slot, _, _ in cache_slots:
                first[slot] = None  # filled per call; the scratch caches must not stay alive
            flat = cls(graph.current_callable, first, pos_slots[0], cache_slots, layouts.pop(), version)
        except Exception:  # noqa: BLE001 — an internal that changed: keep `direct`
            return None
        for candidate in (_attempt(flat._to_cpp_entry), flat):
            if candidate is not None and _attempt(lambda: all(torch.equal(candidate(p, scratch), out) for p, out in zip((2, 3), outputs))):
                candidate._caches, candidate._filled = None, []  # let the scratch caches go
                return candidate
        return None

    def __call__(self, pos: int, caches: list) -> torch.Tensor:
        if caches is not self._caches:  # a serve slot swapped its caches in: refill their slots once
            filled = list(self._template)
            for slot, layer, j in self._cache_slots:
                filled[slot] = cache = caches[layer][j]
                if _layout(cache) != self._cache_layout:  # the C++ code was built for that layout only
                    raise ValueError(f"a KV cache of {tuple(cache.shape)} {cache.dtype} does not fit the compiled step")
            self._caches, self._filled = caches, filled
        if self._pos_view is not None:  # the C++ entry: tensors in, handles stolen, nothing cleared
            self._pos_view[()] = pos
            handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(self._filled)
            (logits,) = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(self._entry(handles))
            return logits
        args = self._filled.copy()  # Inductor's Python wrapper empties the list it is given
        args[self._pos_slot] = pos
        (logits,) = self._entry(args)
        return logits


def _filled_cell(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # "Cell is empty"
        return False
    return True


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype, t.device


def _attempt(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 — an internal that changed: that way is not taken
        return None
