"""Decoding work, counted in pixels of the frames a decoder produces (the sampled ones and those it
passes through to reach them): `DecodeCost`, planned before decoding, and `DecodeMeter`, which refuses a
plan over the caller's limit and stops a decode that passes it (`DecodeOverBudget`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MediaError
from .video_header import shown_path

# Decoding work is counted in pixels, each frame as at least this side squared: a frame has a fixed
# cost too (a 16×16 one takes as long as about 130×130 pixels of a large one, in FFmpeg and here)
MIN_FRAME_SIDE = 128


class DecodeOverBudget(MediaError):
    """Decoding the frames sampled takes more pixels than the caller allows (load_video's
    max_decode_pixels): `cost` is the plan refused, None when the decoding itself passed the limit."""

    def __init__(self, message: str, cost: DecodeCost | None = None) -> None:
        super().__init__(message)
        self.cost = cost


@dataclass(frozen=True)
class DecodeCost:
    """The decoding a sampling takes: `frames` frames of width × height, the sampled ones and those
    the decoder passes through to reach them (frames after a key frame need the ones before them)."""

    frames: int
    width: int
    height: int
    backend: str
    from_start: bool = False  # decoded from the start up to the last frame sampled: fewer frames save little

    @property
    def pixels(self) -> int:
        return self.frames * frame_work(self.width, self.height)

    def __str__(self) -> str:
        """How the pixels come about, for messages: "1,874 frames of 4096×4096 (31,440.5 megapixels)"."""
        side = MIN_FRAME_SIDE
        floor = "" if self.width * self.height >= side**2 else f", each frame counted as {side}×{side}"
        return f"{self.frames:,} frames of {self.width}×{self.height} ({megapixels(self.pixels)} megapixels{floor})"


def frame_work(width: int, height: int) -> int:
    return max(width * height, MIN_FRAME_SIDE**2)


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:,.6g}"


class DecodeMeter:
    """Counts the frames and pixels a decoder produces against the limit: a plan is checked
    before decoding (`check_plan`); a stream whose frames are larger than its header says passes
    the limit while it decodes (`charge`), and its decoding ends."""

    def __init__(self, path: Path, limit: int | None) -> None:
        self.path, self.limit = path, limit
        self.frames = self.pixels = 0

    def check_plan(self, cost: DecodeCost) -> None:
        """Refuse a plan that would take the decoding past the limit (with what an earlier pass
        spent already: an attempt that failed, or one that found the stream shorter), before any
        of it is decoded."""
        if self.limit is None or self.pixels + cost.pixels <= self.limit:
            return
        after = f" ({megapixels(self.pixels)} of them spent already by an earlier pass over the file)" if self.pixels else ""
        raise DecodeOverBudget(
            f"video {shown_path(self.path)} needs {cost} decoded to reach the frames sampled, over the limit of "
            f"{megapixels(self.limit)} megapixels{after}; cut the clip shorter or scale it down",
            cost,
        )

    def charge(self, frames: int, width: int, height: int) -> None:
        self.frames += frames
        self.pixels += frames * frame_work(width, height)
        if self.limit is not None and self.pixels > self.limit:
            raise DecodeOverBudget(
                f"decoding video {shown_path(self.path)} passed the limit of {megapixels(self.limit)} megapixels after "
                f"{self.frames:,} frames (its frames are larger than its header says); cut the clip shorter or scale it down"
            )
