"""Find a checkpoint's weight files and check its shard index.

Weight files and index files are untrusted: an index may only name plain files in the checkpoint
folder, and every refusal is one line naming the user's path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import visible
from .checkpoint_json import read_json_object
from .tensor_reader import open_regular, pickle_shapes, safetensors_entries, shown_value, weight_file_head

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class DeclaredTensor:
    """A tensor as its weight file declares it, data unread (a validated safetensors header, or a
    pickle loaded memory-mapped): its bytes are in the file."""

    file: Path
    name: str  # as stored
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Payload:
    """What the weight files hold, known before any tensor is read: `nbytes` of weight data, and
    every tensor the files declare (safetensors headers; pickles loaded memory-mapped, once: the
    embeddings check and the 4-bit check each loaded every .bin again before the weights were)."""

    nbytes: int
    declared: tuple[DeclaredTensor, ...] = ()


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint, in reading order.

    kind: "safetensors" (single or sharded), "bin" (PyTorch pickle shards) or "tinychat" (one `.pt`
    state dict, llm-awq's TinyChat format). `index` is the shard index file when there is one.
    """

    kind: str
    files: tuple[Path, ...]
    index: Path | None = None

    def payload(self) -> Payload:
        """Bytes of weight data and the tensors the headers declare, for checking config.json
        against before anything is allocated.

        Safetensors headers are validated here, every shard's, so a damaged shard is reported
        before the model is built; pickles count their size on disk and declare their tensors
        from one memory-mapped load each (tensor_reader.pickle_shapes), data unread.
        """
        total = 0
        declared: list[DeclaredTensor] = []
        for path in self.files:
            shown = visible(str(path))
            if self.kind == "safetensors":
                open_regular(path, "weight file").close()
                for name, dtype, shape, nbytes in safetensors_entries(path, shown):
                    total += nbytes
                    declared.append(DeclaredTensor(path, name, dtype, shape))
                continue
            weight_file_head(path, 0)  # a Git LFS pointer's size would be "a partial download"
            try:
                total += path.stat().st_size
            except OSError as e:
                raise CheckpointError(f"cannot read {shown} ({e.strerror or e}); check the file") from None
            declared += [DeclaredTensor(path, name, dtype, shape) for name, dtype, shape in pickle_shapes(path)]
        return Payload(total, tuple(declared))


def _is_plain_file_name(name: str, suffix: str) -> bool:
    """A shard name an index may use: one file in the checkpoint folder, never a path elsewhere."""
    return (
        name.endswith(suffix)
        and name not in (".", "..")
        and not any(c in name for c in "/\\\0")
        and visible(name) == name
        and len(name.encode("utf-8")) <= 255  # NAME_MAX: a longer one made the existence check raise OSError
    )


def _files_from_index(index: Path, suffix: str) -> tuple[Path, ...]:
    shown = visible(str(index))
    data = read_json_object(index, "the shard index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"the shard index {shown} has no weight_map of tensor names to files; the download may be incomplete")
    names: set[str] = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not _is_plain_file_name(name, suffix):
            raise CheckpointError(
                f"the shard index {shown} maps {shown_value(tensor)} to {shown_value(name)}, which is not a {suffix} file name "
                "in the checkpoint folder; the index is damaged"
            )
        names.add(name)
    files = tuple(index.parent / n for n in sorted(names))
    for file in files:
        if file.exists() and not file.is_file():  # there, but no file: "missing" sent the user downloading
            raise _not_a_file(file)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{visible(index.name)} names {', '.join(map(shown_value, missing[:3]))}{' …' if len(missing) > 3 else ''}, which "
            f"{'is' if len(missing) == 1 else 'are'} missing from {visible(str(index.parent))}; download the remaining shards"
        )
    return files


def _not_a_file(path: Path) -> CheckpointError:
    """Why a weight file's name holds nothing to read. A link to nothing is what an interrupted
    download into the Hugging Face cache leaves; a folder, a pipe or a device (a link to /dev/zero)
    in its place is no download at all."""
    shown = visible(str(path))
    if path.is_symlink() and not path.exists():
        return CheckpointError(f"{shown} is a link to a file that does not exist; the download is incomplete (download it again)")
    kind = "a folder" if path.is_dir() else "a pipe or a device"
    return CheckpointError(f"{shown} is {kind}, not a weight file; replace it with the checkpoint's downloaded file")


def _refuse_non_files(folder: Path, pattern: str) -> None:
    """Weight file names that hold no regular file are named: skipped, they made the folder look
    like it held no weights ("the download may be incomplete"), or fewer shards than it does."""
    for path in sorted(folder.glob(pattern)):
        if not path.is_file():
            raise _not_a_file(path)


# the kinds a folder may hold in several files, most preferred first:
# (kind, index, single file, shards' names, the suffix an index's files must have)
_SHARDED_KINDS = (
    ("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "*.safetensors", ".safetensors"),
    ("bin", BIN_INDEX, BIN_SINGLE, "pytorch_model*.bin", ".bin"),
)


def _weights_of_kind(folder: Path, kind: str, index: str, single: str, pattern: str, suffix: str) -> WeightFiles | None:
    """`folder`'s weights of one kind: those its index lists, else its single file, else the files
    named like shards; None when it holds none of them."""
    # os.path.lexists: an index that is a broken link (an interrupted download into the Hugging Face
    # cache) is named by the reader, not taken for none
    if os.path.lexists(folder / index):
        return WeightFiles(kind, _files_from_index(folder / index, suffix), folder / index)
    if (folder / single).is_file():
        return WeightFiles(kind, (folder / single,))
    shards = sorted(p for p in folder.glob(pattern) if p.is_file())
    _refuse_non_files(folder, pattern)
    return WeightFiles(kind, tuple(shards)) if shards else None


def find_weight_files(model_dir: str | Path) -> WeightFiles:
    """Locate the weights of a checkpoint folder (or a single weight file).

    Preference: safetensors (index, model.safetensors, any *.safetensors), then PyTorch `.bin`
    (index, pytorch_model.bin, any pytorch_model*.bin), then a TinyChat `.pt`.
    """
    path = Path(model_dir)
    shown = visible(str(path))
    if path.is_file():
        kind = {".safetensors": "safetensors", ".bin": "bin", ".pt": "tinychat"}.get(path.suffix)
        if kind is None:
            raise CheckpointError(f"{shown} is not a .safetensors, .bin or .pt weight file; pass the checkpoint folder")
        return WeightFiles(kind, (path,))
    if not path.is_dir():
        raise CheckpointError(f"model folder {shown} does not exist; pass --model with a checkpoint folder")

    for kind, index, single, pattern, suffix in _SHARDED_KINDS:
        found = _weights_of_kind(path, kind, index, single, pattern, suffix)
        if found is not None:
            return found
    _refuse_non_files(path, "*.pt")
    tinychat = sorted(path.glob("*.pt"))
    if len(tinychat) == 1:
        return WeightFiles("tinychat", tuple(tinychat))
    if len(tinychat) > 1:
        raise CheckpointError(
            f"{shown} holds several .pt files ({', '.join(visible(p.name) for p in tinychat[:4])}); keep only the one to load"
        )
    raise CheckpointError(
        f"no weights in {shown} (no *.safetensors, pytorch_model*.bin or TinyChat *.pt); the download may be incomplete"
    )
