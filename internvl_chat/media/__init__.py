"""Media inputs: images → dynamic tiles, videos → sampled frames (one tile each)."""

from .image import ImageInput, choose_grid, count_tiles, load_image, normalize_tiles, probe_image, tile_image
from .video import VideoInput, VideoLength, load_video, measure_video, probe_video
from .video_sampling import frame_indices

__all__ = [
    "ImageInput",
    "VideoInput",
    "VideoLength",
    "choose_grid",
    "count_tiles",
    "frame_indices",
    "load_image",
    "load_video",
    "measure_video",
    "normalize_tiles",
    "probe_image",
    "probe_video",
    "tile_image",
]
