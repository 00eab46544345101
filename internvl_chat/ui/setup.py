"""What every mode does first: settings → sampling params, the conversation (a local model's Session,
or a server's RemoteConversation when `remote.server` is set), media from flags."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from .. import demo
from ..chat.conversation import Conversation
from ..chat.sampling import params_from_settings
from ..chat.session import Media, Session
from ..engine.config import refuse_web_model
from ..engine.loader import LoadedModel, load_model
from ..errors import UsageError
from ..files import expand_home, refuse_web_address, visible
from ..settings import Settings, without_credentials
from .commands import parse_range
from .media_paths import expand_wildcards


EMBEDDED_MODEL = demo.EMBEDDED_MODEL


def in_checkout() -> bool:
    """Whether the package runs from a git checkout (the repository's own folder, or a worktree),
    not from an installed copy (site-packages), where no git command can restore its files."""
    return (EMBEDDED_MODEL.parent.parent / ".git").exists()


def resolve_model_path(settings: Settings) -> Path:
    """The --model folder, or the embedded demo model when none is set."""
    if settings.model.path:
        refuse_web_model(settings.model.path)
        return expand_home(settings.model.path)
    if not (EMBEDDED_MODEL / "config.json").is_file():
        # `make demo` needs it too: only git (or a fresh install) brings it back
        fix = "restore it (git checkout internvl_chat/demo_model)" if in_checkout() else "reinstall internvl-chat"
        raise UsageError(f"no --model given and the embedded demo model is missing; pass --model DIR, or {fix}")
    return EMBEDDED_MODEL


def load_for_settings(settings: Settings, show_progress: bool) -> LoadedModel:
    path = resolve_model_path(settings)
    status = _spinner(f"loading {visible(path.name)} …") if show_progress else nullcontext()
    with status as spinning:
        return load_model(
            path,
            device=settings.model.device,
            dtype=settings.model.dtype,
            max_context=settings.model.max_context,
            int4_backend=settings.model.int4_backend,
            compile=settings.model.compile,
            progress=spinning.update if spinning is not None else None,  # e.g. "compiling the decode step …"
            fit_context=settings.is_default("model.max_context"),
        )


def _spinner(text: str):
    from rich.console import Console

    from .spinner import spin

    return spin(Console(stderr=True), text)


def open_conversation(settings: Settings, show_progress: bool | None = None) -> Conversation:
    """The conversation the settings ask for: with `remote.server`'s model, else with the local one."""
    if settings.remote.server:
        return open_remote(settings, sys.stderr.isatty() if show_progress is None else show_progress)
    return open_session(settings, show_progress)


def open_remote(settings: Settings, show_progress: bool) -> Conversation:
    """Connect (GET /models: the model id, dialect and context). The model flags do not apply."""
    from ..chat.remote import RemoteConversation  # httpx is imported only for a server

    r = settings.remote
    status = _spinner(f"connecting to {visible(without_credentials(r.server))} …") if show_progress else nullcontext()
    with status:
        return RemoteConversation.connect(
            r.server,
            api_key=r.api_key,
            model=r.model,
            dialect=r.dialect,
            timeout=r.timeout,
            answer_timeout=r.answer_timeout,
            params=params_from_settings(settings),
            system_message=settings.system.message,
            stream_interval=settings.generation.stream_interval,
        )


def open_session(settings: Settings, show_progress: bool | None = None) -> Session:
    show = sys.stderr.isatty() if show_progress is None else show_progress
    loaded = load_for_settings(settings, show)
    return Session(
        loaded,
        params=params_from_settings(settings),
        system_message=settings.system.message,
        use_checkpoint_system=settings.system.message is None,
        stream_interval=settings.generation.stream_interval,
    )


def media_from_flags(session: Conversation, args: argparse.Namespace, settings: Settings) -> list[Media]:
    """The --image/--video flags as described Media (measured, not yet decoded)."""
    video_range = parse_range(args.video_range) if args.video_range is not None else None  # "" too: `--video-range "$R"`, R unset, sampled the whole video
    if video_range and not args.video:
        raise UsageError("--video-range needs a --video")
    for flag, paths in (("--image", args.image), ("--video", args.video)):
        if any(not str(p).strip() for p in paths):  # Path("") is the working folder: "'.' is a folder" misled
            raise UsageError(f"{flag} was given an empty path; pass the path of a file")
        if "-" in paths and not os.path.lexists("-"):  # no file of that name: it meant stdin
            raise UsageError(f"{flag} - : pictures and videos are read from files, not from stdin; "
                             f"save it to a file and pass {flag} FILE")  # fmt: skip
    images = [found for typed in args.image for found in _flag_files(typed, "image", "--image")]
    videos = [found for typed in args.video for found in _flag_files(typed, "video", "--video")]
    media = [session.describe_image(p, settings.media.max_tiles) for p in images]
    media += [session.describe_video(p, settings.media.frames, video_range) for p in videos]
    return media


def _flag_files(typed: str, kind: str, flag: str) -> list[str | Path]:
    """The files one --image/--video names: a pattern the shell left as it was (quoted, or one that
    matched nothing) stands for the files it matches, as with /image (it said "does not exist")."""
    refuse_web_address(typed)
    full = expand_home(typed)  # `./~x*.png` stays in the working folder
    found = expand_wildcards(Path(typed), lambda _: full, lambda _: [full], kind, flag)
    return [typed] if found == [Path(typed)] else list(found)
