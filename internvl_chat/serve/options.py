"""What the server was started with: the [serve] settings plus request defaults from the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..chat.sampling import SamplingParams, params_from_settings
from ..errors import UsageError
from ..files import expand_home
from ..settings import Settings

KiB = 1 << 10
MiB = 1 << 20


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""
    model_id: str = ""
    slots: int = 2
    queue_depth: int = 8
    max_body_bytes: int = 64 * MiB
    max_images: int = 32
    max_image_pixels: int = 40_000_000
    max_frames: int = 64
    max_video_decode_pixels: int | None = 20_000 * 10**6  # None: no limit
    # a non-streamed request's logprob entries at worst (serve/engine.py's check_logprobs); None: no limit
    max_logprobs_bytes: int | None = 1024 * MiB
    feature_cache_bytes: int = 256 * MiB
    shared_cache: bool = True  # False: each request is a cache namespace of its own (serve/namespaces.py)
    allow_remote_media: bool = False
    allow_local_media: Path | None = None  # resolved folder
    allow_origins: tuple[str, ...] = ()  # web origins answered with CORS headers, as browsers send them
    # slow and abusive clients (serve/connections.py, serve/app.py)
    max_connections: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    write_timeout: float = 60.0
    keep_alive_timeout: float = 5.0
    max_header_bytes: int = 16 * KiB
    # request defaults (a request's own values win)
    defaults: SamplingParams = field(default_factory=SamplingParams)
    max_tiles: int | None = None  # max_dynamic_patch when a request gives none (None: the checkpoint's)
    frames: int = 8  # frames sampled from a video file when a request gives none
    system_message: str | None = None  # None: the checkpoint's own
    stream_interval: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> ServeOptions:
        s, g = settings.serve, settings.generation
        local = None
        if s.allow_local_media:
            local = expand_home(s.allow_local_media)
            if not local.is_dir():
                raise UsageError(f"--allow-local-media {local} is not a folder; name an existing folder or leave it empty")
            local = local.resolve()
        if "*" in s.allow_origins and not s.api_key:
            # every web page the user opens could then drive the model, and read its answers
            raise UsageError("--allow-origin * lets any web page use this server: set --api-key KEY too, or name "
                             "the pages' origins (e.g. --allow-origin http://localhost:3000)")  # fmt: skip
        defaults = params_from_settings(settings)
        return cls(
            host=s.host,
            port=s.port,
            api_key=s.api_key,
            model_id=s.model_id,
            slots=s.slots,
            queue_depth=s.queue_depth,
            max_body_bytes=s.max_body_mb * MiB,
            max_images=s.max_images,
            max_image_pixels=s.max_image_pixels,
            max_frames=s.max_frames,
            max_video_decode_pixels=s.max_video_decode_megapixels * 10**6 or None,
            max_logprobs_bytes=s.max_logprobs_mb * MiB or None,
            feature_cache_bytes=s.feature_cache_mb * MiB,
            shared_cache=s.shared_cache,
            allow_remote_media=s.allow_remote_media,
            allow_local_media=local,
            allow_origins=tuple(s.allow_origins),
            max_connections=s.max_connections,
            header_timeout=s.header_timeout,
            body_timeout=s.body_timeout,
            write_timeout=s.write_timeout,
            keep_alive_timeout=s.keep_alive_timeout,
            max_header_bytes=s.max_header_kb * KiB,
            defaults=defaults,
            max_tiles=settings.media.max_tiles,
            frames=min(settings.media.frames, s.max_frames),
            system_message=settings.system.message,
            stream_interval=g.stream_interval,
        )
