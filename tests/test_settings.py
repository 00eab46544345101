from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from internvl_chat.errors import UsageError
from internvl_chat.settings import (
    DEFAULT_CONFIG_FILE,
    NAME_PROBLEMS_SHOWN,
    Settings,
    format_settings,
    load_settings,
)

REPO = Path(__file__).resolve().parents[1]

# The defaults the issue asks for, written out by hand.
EXPECTED_DEFAULTS = {
    "model": {"path": "", "device": "auto", "dtype": "auto", "max_context": 8192, "int4_backend": "auto", "compile": "auto"},
    "generation": {
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.0,
        "max_new_tokens": 1024,
        "seed": None,
        "stream_interval": 1,
    },
    "media": {"max_tiles": None, "frames": 8, "auto_attach": True},
    "ui": {
        "markdown": True,
        "stats": True,
        "color": "auto",
        "history": True,
        "history_file": "",
        "plain": False,
    },
    "system": {"message": None},
    "serve": {
        "host": "127.0.0.1",
        "port": 8000,
        "api_key": "",
        "model_id": "",
        "slots": 2,
        "queue_depth": 8,
        "max_body_mb": 64,
        "max_images": 32,
        "max_image_pixels": 40_000_000,
        "max_frames": 64,
        "max_video_decode_megapixels": 20_000,
        "feature_cache_mb": 256,
        "max_logprobs_mb": 1024,
        "allow_remote_media": False,
        "shared_cache": True,
        "allow_local_media": "",
        "allow_origins": [],
        "max_connections": 100,
        "header_timeout": 10.0,
        "body_timeout": 60.0,
        "write_timeout": 60.0,
        "keep_alive_timeout": 5.0,
        "max_header_kb": 16,
    },
    "remote": {"server": "", "api_key": "", "model": "", "dialect": "auto", "timeout": 300.0, "answer_timeout": 3600.0},
}


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment with no user config file and no INTERNVL_CHAT_* variables."""
    return {"HOME": str(tmp_path / "home"), **extra}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults ----------------------------------------------------------------------------------


def test_repo_default_toml_is_identical_to_the_packaged_one():
    assert (REPO / "configs" / "default.toml").read_bytes() == DEFAULT_CONFIG_FILE.read_bytes()
    assert DEFAULT_CONFIG_FILE == REPO / "internvl_chat" / "configs" / "default.toml"


def test_default_toml_holds_every_default():
    data = tomllib.loads(DEFAULT_CONFIG_FILE.read_text(encoding="utf-8"))
    # TOML has no null: unset values are absent from the file, everything else is there.
    expected = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in EXPECTED_DEFAULTS.items()}
    assert data == expected


def test_default_toml_comments_out_exactly_the_unset_settings_with_a_valid_example():
    section, commented = None, {}
    for line in DEFAULT_CONFIG_FILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            section = line[1 : line.index("]")]
        elif line.startswith("# ") and " = " in line.split("#")[1]:
            name, value = tomllib.loads(line[2:].split("  #")[0]).popitem()
            commented[f"{section}.{name}"] = value
    unset = {f"{s}.{k}" for s, kv in EXPECTED_DEFAULTS.items() for k, v in kv.items() if v is None}
    assert set(commented) == unset
    for key, value in commented.items():
        Settings().set(key, value, source="example")  # a value the setting takes


def test_defaults_when_nothing_overrides(tmp_path):
    settings = load_settings(env=clean_env(tmp_path))
    assert settings.to_dict() == EXPECTED_DEFAULTS
    assert Settings().to_dict() == EXPECTED_DEFAULTS  # the dataclasses agree with the file
    assert set(settings.sources.values()) == {"default"}
    assert len(settings.sources) == sum(len(v) for v in EXPECTED_DEFAULTS.values())
    assert type(settings.generation.temperature) is float
    assert type(settings.model.max_context) is int


def test_the_codes_own_defaults_are_the_settings_defaults():
    # SamplingParams() answered at most 512 tokens where [generation] max_new_tokens says 1024, so
    # library use (a Session, ServeOptions) without settings stopped answers at half the default
    import dataclasses

    from internvl_chat.chat.sampling import SamplingParams, params_from_settings
    from internvl_chat.serve.options import ServeOptions

    assert SamplingParams() == params_from_settings(Settings())
    assert ServeOptions() == ServeOptions.from_settings(Settings())
    per_request = {"stop_ids", "logprobs"}  # set by a caller for one answer (the server's stop tokens, logprobs)
    assert {f.name for f in dataclasses.fields(SamplingParams)} - per_request <= set(EXPECTED_DEFAULTS["generation"])


# --- layering ----------------------------------------------------------------------------------


def test_file_then_env_then_flags(tmp_path):
    config = write(
        tmp_path / "my.toml",
        '[generation]\ntemperature = 0.3\ntop_k = 40\n[media]\nmax_tiles = 6\nframes = 16\n'
        '[system]\nmessage = "Be brief."\n',
    )
    env = clean_env(
        tmp_path,
        INTERNVL_CHAT_GENERATION_TEMPERATURE="0.7",
        INTERNVL_CHAT_MEDIA_FRAMES="4",
    )
    settings = load_settings(config_path=config, env=env, overrides={"frames": 2, "model.dtype": "bf16", "seed": None})

    assert settings.generation.temperature == 0.7
    assert settings.generation.top_k == 40
    assert settings.media.max_tiles == 6
    assert settings.media.frames == 2
    assert settings.model.dtype == "bfloat16"
    assert settings.generation.seed is None  # a None override is "flag not given"
    assert settings.system.message == "Be brief."

    assert settings.sources["generation.temperature"] == "env INTERNVL_CHAT_GENERATION_TEMPERATURE"
    assert settings.sources["generation.top_k"] == f"config {config}"
    assert settings.sources["media.max_tiles"] == f"config {config}"
    assert settings.sources["media.frames"] == "flag"
    assert settings.sources["model.dtype"] == "flag"
    assert settings.sources["generation.seed"] == "default"
    assert settings.sources["model.max_context"] == "default"


def test_user_file_found_in_xdg_config_home(tmp_path):
    write(tmp_path / "xdg" / "internvl-chat" / "config.toml", "[ui]\nstats = false\n")
    settings = load_settings(env=clean_env(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "xdg")))
    assert settings.ui.stats is False
    assert settings.sources["ui.stats"] == f"config {tmp_path / 'xdg' / 'internvl-chat' / 'config.toml'}"


def test_user_file_found_in_home_config(tmp_path):
    path = write(tmp_path / "home" / ".config" / "internvl-chat" / "config.toml", '[model]\ndevice = "cpu"\n')
    settings = load_settings(env=clean_env(tmp_path))
    assert settings.model.device == "cpu"
    assert settings.sources["model.device"] == f"config {path}"


@pytest.mark.parametrize("kind, words", [("broken link", "is a link to a file that does not exist"),
                                         ("folder", "is a folder"), ("fifo", "not a regular file")])  # fmt: skip
def test_a_user_file_that_is_no_file_is_refused_not_skipped(tmp_path, kind, words):
    """A config.toml linked from a dotfiles folder that is not there, or a folder by that name, was
    skipped without a word: the settings in it silently not applied."""
    path = tmp_path / "home" / ".config" / "internvl-chat" / "config.toml"
    path.parent.mkdir(parents=True)
    if kind == "broken link":
        path.symlink_to(tmp_path / "dotfiles" / "config.toml")
    elif kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(path)  # never opened for a blocking read
    with pytest.raises(UsageError) as err:
        load_settings(env=clean_env(tmp_path))
    assert str(path) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)
    assert load_settings("/dev/null", env=clean_env(tmp_path)).ui.stats is True  # --config /dev/null: no user file


def test_config_file_named_by_environment(tmp_path):
    path = write(tmp_path / "c.toml", "[media]\nauto_attach = false\n")
    settings = load_settings(env=clean_env(tmp_path, INTERNVL_CHAT_CONFIG=str(path)))
    assert settings.media.auto_attach is False


def test_a_config_file_named_by_the_environment_that_is_refused_names_the_variable(tmp_path):
    # "config file c.toml does not exist; check the path" at every start, with no --config typed:
    # nothing said where the path came from
    for value in (str(tmp_path / "gone.toml"), "https://example.com/c.toml", str(write(tmp_path / "bad.toml", "x ="))):
        with pytest.raises(UsageError) as err:
            load_settings(env=clean_env(tmp_path, INTERNVL_CHAT_CONFIG=value))
        assert str(err.value).endswith(" (the file $INTERNVL_CHAT_CONFIG names; fix it, or unset the variable)")
    with pytest.raises(UsageError) as err:  # typed with --config: no variable named
        load_settings(str(tmp_path / "gone.toml"), env=clean_env(tmp_path))
    assert "INTERNVL_CHAT_CONFIG" not in str(err.value)


def test_explicit_config_path_wins_over_the_default_location(tmp_path):
    write(tmp_path / "home" / ".config" / "internvl-chat" / "config.toml", "[media]\nframes = 3\n")
    explicit = write(tmp_path / "other.toml", "[media]\nmax_tiles = 2\n")
    settings = load_settings(config_path=explicit, env=clean_env(tmp_path))
    assert (settings.media.frames, settings.media.max_tiles) == (8, 2)


@pytest.mark.parametrize(
    "var, text, key, expected",
    [
        ("GENERATION_TOP_K", "40", "generation.top_k", 40),
        ("GENERATION_TEMPERATURE", "0.25", "generation.temperature", 0.25),
        ("GENERATION_TEMPERATURE", "1", "generation.temperature", 1.0),
        ("GENERATION_SEED", "7", "generation.seed", 7),
        ("GENERATION_SEED", "none", "generation.seed", None),
        ("GENERATION_MAX_NEW_TOKENS", " 2048 ", "generation.max_new_tokens", 2048),
        ("UI_STATS", "off", "ui.stats", False),
        ("UI_MARKDOWN", "YES", "ui.markdown", True),
        ("UI_PLAIN", "1", "ui.plain", True),
        ("MEDIA_AUTO_ATTACH", "0", "media.auto_attach", False),
        ("MODEL_DTYPE", "bf16", "model.dtype", "bfloat16"),
        ("MODEL_DTYPE", "FP32", "model.dtype", "float32"),
        ("MODEL_DTYPE", "fp16", "model.dtype", "float16"),
        ("MODEL_DEVICE", "CUDA:1", "model.device", "cuda:1"),
        ("MODEL_MAX_CONTEXT", "4096", "model.max_context", 4096),
        ("MODEL_INT4_BACKEND", "dequant", "model.int4_backend", "dequant"),
        ("MODEL_PATH", "/models/InternVL3-1B-AWQ", "model.path", "/models/InternVL3-1B-AWQ"),
        ("SYSTEM_MESSAGE", "Answer in one sentence.", "system.message", "Answer in one sentence."),
        ("UI_HISTORY_FILE", "/tmp/h", "ui.history_file", "/tmp/h"),
        ("UI_COLOR", "never", "ui.color", "never"),
    ],
)
def test_environment_values_are_parsed_by_type(tmp_path, var, text, key, expected):
    settings = load_settings(env=clean_env(tmp_path, **{f"INTERNVL_CHAT_{var}": text}))
    value = settings.get(key)
    assert value == expected
    assert type(value) is type(expected)
    assert settings.sources[key] == f"env INTERNVL_CHAT_{var}"


@pytest.mark.parametrize(
    "var, text",
    [
        ("GENERATION_TEMPERATURE", "hot"),
        ("GENERATION_TEMPERATURE", "-1"),
        ("GENERATION_TEMPERATURE", "nan"),
        ("GENERATION_TOP_P", "0"),
        ("GENERATION_TOP_P", "1.5"),
        ("GENERATION_TOP_K", "2.5"),
        ("GENERATION_TOP_K", "-1"),
        ("GENERATION_SEED", "-3"),
        ("UI_STATS", "sometimes"),
        ("MODEL_DTYPE", "int8"),
        ("MODEL_DEVICE", "gpu"),
        ("MODEL_MAX_CONTEXT", "lots"),
        ("GENERATION_MAX_NEW_TOKENS", "2_048"),  # int() reads it as 2048: not a number a user types
        ("MEDIA_MAX_TILES", "-1"),
        ("UI_COLOR", "blue"),
    ],
)
def test_bad_environment_values_name_the_variable(tmp_path, var, text):
    with pytest.raises(UsageError) as err:
        load_settings(env=clean_env(tmp_path, **{f"INTERNVL_CHAT_{var}": text}))
    assert f"INTERNVL_CHAT_{var}" in str(err.value)
    assert repr(text) in str(err.value)


def test_unknown_environment_variable_suggests_the_closest(tmp_path):
    with pytest.raises(UsageError) as err:
        load_settings(env=clean_env(tmp_path, INTERNVL_CHAT_GENERATION_TEMPRATURE="0.5"))
    message = str(err.value)
    assert "INTERNVL_CHAT_GENERATION_TEMPRATURE" in message
    assert "'INTERNVL_CHAT_GENERATION_TEMPERATURE'" in message


def test_every_unknown_environment_variable_is_named_at_once(tmp_path):
    # one run named only the first (in name order): each misspelt variable took a run of its own
    env = clean_env(tmp_path, INTERNVL_CHAT_GENERATION_TEMPRATURE="0.5", INTERNVL_CHAT_UI_COLOUR="never",
                    INTERNVL_CHAT_GENERATION_TEMPERATURE="0.7")  # fmt: skip
    with pytest.raises(UsageError) as err:
        load_settings(env=env)
    assert str(err.value) == (
        "unknown environment variables INTERNVL_CHAT_GENERATION_TEMPRATURE (did you mean "
        "'INTERNVL_CHAT_GENERATION_TEMPERATURE'?); INTERNVL_CHAT_UI_COLOUR (did you mean 'INTERNVL_CHAT_UI_COLOR'?); "
        "rename or unset them.")  # fmt: skip


def test_a_files_unknown_names_and_unknown_variables_are_named_in_one_line(tmp_path):
    # README: a file's stray names "and INTERNVL_CHAT_* variables that name none, are all listed in one
    # line"; the file's were said alone, and the variable only on the run after the file was fixed
    path = write(tmp_path / "c.toml", "[generation]\ntemprature = 0.5\n")
    env = clean_env(tmp_path, INTERNVL_CHAT_GENERATION_TOPP="0.5")
    with pytest.raises(UsageError) as err:
        load_settings(config_path=path, env=env)
    assert str(err.value) == (
        f"{path}: unknown setting 'generation.temprature' (did you mean 'generation.temperature'?); fix the file. "
        "Also unknown environment variable INTERNVL_CHAT_GENERATION_TOPP (did you mean "
        "'INTERNVL_CHAT_GENERATION_TOP_P'?); rename or unset it.")  # fmt: skip
    assert "\n" not in str(err.value)


def test_unknown_key_in_file_suggests_the_closest(tmp_path):
    path = write(tmp_path / "c.toml", "[generation]\ntemprature = 0.5\n")
    with pytest.raises(UsageError) as err:
        load_settings(config_path=path, env=clean_env(tmp_path))
    assert "generation.temprature" in str(err.value)
    assert "'generation.temperature'" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_section_in_file_suggests_the_closest(tmp_path):
    path = write(tmp_path / "c.toml", "[genration]\ntemperature = 0.5\n")
    with pytest.raises(UsageError, match=r"\[genration\].*'generation'"):
        load_settings(config_path=path, env=clean_env(tmp_path))


@pytest.mark.parametrize(
    "body",
    [
        "[generation]\ntemperature = true\n",
        "[generation]\ntemperature = \"hot\"\n",
        "[media]\nmax_tiles = 2.5\n",
        "[ui]\nstats = 1\n",
        "[model]\nmax_context = \"big\"\n",
        "generation = 3\n",
    ],
)
def test_wrong_types_in_file(tmp_path, body):
    path = write(tmp_path / "c.toml", body)
    with pytest.raises(UsageError):
        load_settings(config_path=path, env=clean_env(tmp_path))


def test_broken_or_missing_file(tmp_path):
    broken = write(tmp_path / "c.toml", "[generation\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_settings(config_path=broken, env=clean_env(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        load_settings(config_path=tmp_path / "missing.toml", env=clean_env(tmp_path))


@pytest.mark.parametrize("key", ["temperature", "remote.answer_timeout"])
def test_minus_zero_is_zero(tmp_path, key):
    # greedy all the same, but --print-config and /set showed the value back as "-0.0"
    for value in ("-0", "-0.0", -0.0):
        settings = load_settings(env=clean_env(tmp_path), overrides={key: value})
        assert str(settings.get(key)) == "0.0"
    settings.set(key, "-0")
    assert str(settings.get(key)) == "0.0"


def test_bad_flag_value(tmp_path):
    with pytest.raises(UsageError, match="top_p"):
        load_settings(env=clean_env(tmp_path), overrides={"top_p": 2.0})
    with pytest.raises(UsageError, match="'temperature'"):
        load_settings(env=clean_env(tmp_path), overrides={"temperatur": 0.5})


@pytest.mark.parametrize("key", ["s3cr\u20act", " padded", "line\nbreak"])
def test_a_serve_key_clients_cannot_send_is_refused_without_printing_it(tmp_path, key):
    """A non-ASCII key could never match (the server reads header bytes as Latin-1, and the
    openai package cannot send one); it was taken, then every request got 401."""
    with pytest.raises(UsageError, match="printable ASCII") as err:
        load_settings(env=clean_env(tmp_path), overrides={"serve.api_key": key})
    assert key.strip() not in str(err.value)
    assert load_settings(env=clean_env(tmp_path), overrides={"serve.api_key": "sk-OK_1.2~"}).serve.api_key == "sk-OK_1.2~"


# --- /set ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, text, dotted, expected",
    [
        ("temperature", "0.7", "generation.temperature", 0.7),
        ("top_p", "0.9", "generation.top_p", 0.9),
        ("top-p", "1", "generation.top_p", 1.0),
        ("top_k", "50", "generation.top_k", 50),
        ("repetition_penalty", "1.05", "generation.repetition_penalty", 1.05),
        ("max_new_tokens", "64", "generation.max_new_tokens", 64),
        ("seed", "1234", "generation.seed", 1234),
        ("seed", "none", "generation.seed", None),
        ("max_tiles", "4", "media.max_tiles", 4),
        ("frames", "16", "media.frames", 16),
        ("stats", "off", "ui.stats", False),
        ("markdown", "false", "ui.markdown", False),
        ("Temperature", "0", "generation.temperature", 0.0),
        ("model.dtype", "fp16", "model.dtype", "float16"),
        ("system.message", "Be brief.", "system.message", "Be brief."),
    ],
)
def test_set_parses_and_records(key, text, dotted, expected):
    settings = Settings()
    assert settings.set(key, text) == dotted
    assert settings.get(dotted) == expected
    assert type(settings.get(dotted)) is type(expected)
    assert settings.sources[dotted] == "/set"


@pytest.mark.parametrize(
    "key, text",
    [
        ("temperature", "-0.1"),
        ("temperature", "warm"),
        ("top_p", "0"),
        ("top_p", "1.01"),
        ("top_k", "x"),
        ("max_new_tokens", "0"),
        ("repetition_penalty", "0"),
        ("max_tiles", "65"),
        ("frames", "1000"),
        ("stats", "sometimes"),
        ("seed", "1.5"),
        ("seed", "1_0"),  # int() and float() read underscores between digits: `/set temperature 1_0.5` was 10.5
        ("temperature", "1_0.5"),
        ("temperature", "inf"),
        ("repetition_penalty", "0x10"),
    ],
)
def test_set_rejects_bad_values_and_keeps_the_old_one(key, text):
    settings = Settings()
    before = settings.to_dict()
    with pytest.raises(UsageError) as err:
        settings.set(key, text)
    assert key in str(err.value) and repr(text) in str(err.value)
    assert settings.to_dict() == before


EXPECT_TEMPERATURE = "must be 0 (greedy) or a number from 0.01 to 100, not 'hot'"


def test_a_bad_value_names_its_key_once_wherever_it_came_from(tmp_path):
    config = write(tmp_path / "c.toml", '[generation]\ntemperature = "hot"\n')
    variable = "INTERNVL_CHAT_GENERATION_TEMPERATURE"
    for load, message in [
        (lambda: load_settings(config, env=clean_env(tmp_path)),
         f"{config}: generation.temperature {EXPECT_TEMPERATURE}; fix the value."),
        (lambda: load_settings(env=clean_env(tmp_path, **{variable: "hot"})),
         f"environment variable {variable}: generation.temperature {EXPECT_TEMPERATURE}; fix the value."),
        (lambda: load_settings(env=clean_env(tmp_path), overrides={"temperature": "hot"}),
         f"flag temperature: generation.temperature {EXPECT_TEMPERATURE}; fix the value."),
        # cli.py's overrides are dotted keys: the key was named twice ("flag generation.temperature: generation.…")
        (lambda: load_settings(env=clean_env(tmp_path), overrides={"generation.temperature": "hot"}),
         f"flag generation.temperature: {EXPECT_TEMPERATURE}; fix the value."),
        (lambda: Settings().set("generation.temperature", "hot", source="session s.json"),
         f"session s.json generation.temperature: {EXPECT_TEMPERATURE}; fix the value."),
        (lambda: Settings().set("generation.temperature", "hot"), f"/set generation.temperature: {EXPECT_TEMPERATURE}"),
    ]:  # fmt: skip
        with pytest.raises(UsageError) as err:
            load()
        assert str(err.value) == message


def test_set_unknown_key_suggests():
    with pytest.raises(UsageError, match=r"unknown setting 'temprature' \(did you mean 'temperature'\?\)"):
        Settings().set("temprature", "0.5")


# --- --print-config ----------------------------------------------------------------------------


def test_format_settings_is_toml_with_sources(tmp_path):
    env = clean_env(tmp_path, INTERNVL_CHAT_GENERATION_TEMPERATURE="0.7", INTERNVL_CHAT_SYSTEM_MESSAGE='Say "hi" 你好')
    settings = load_settings(env=env, overrides={"max_tiles": 3})
    text = format_settings(settings)

    parsed = tomllib.loads(text)
    expected = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in settings.to_dict().items()}
    assert parsed == expected
    assert parsed["system"]["message"] == 'Say "hi" 你好'
    # DEL and C1 controls were printed as \x7f, \x85, which TOML does not read back
    settings.set("system.message", "a\x7fb\x85c\u202ed\x1be")
    assert tomllib.loads(format_settings(settings))["system"]["message"] == "a\x7fb\x85c\u202ed\x1be"

    lines = {line.split("=")[0].strip(" #"): line for line in text.splitlines() if "=" in line}
    assert lines["temperature"].startswith("temperature = 0.7")
    assert lines["temperature"].endswith("# from env INTERNVL_CHAT_GENERATION_TEMPERATURE")
    assert lines["max_tiles"].endswith("# from flag")
    assert lines["top_k"].endswith("# from default")
    assert lines["seed"].startswith("# seed = (not set)")


def test_max_tiles_unset_or_zero_means_the_checkpoints_limit(tmp_path):
    assert load_settings(env=clean_env(tmp_path)).media.max_tiles is None
    for text in ("0", "none"):
        settings = Settings()
        settings.set("max_tiles", text)
        assert settings.media.max_tiles is None
    assert load_settings(env=clean_env(tmp_path), overrides={"max_tiles": 0}).media.max_tiles is None
    assert load_settings(env=clean_env(tmp_path), overrides={"max_tiles": 6}).media.max_tiles == 6


# --- ranges and untrusted values ----------------------------------------------------------------


@pytest.mark.parametrize(
    "key, text, accepted",
    [
        ("seed", "0", True),
        ("seed", str(2**63 - 1), True),
        ("seed", str(2**63), False),  # torch would only fail at the next message
        ("seed", str(2**64), False),
        ("seed", "-1", False),
        ("temperature", "0", True),
        ("temperature", "0.01", True),
        ("temperature", "1e-300", False),  # divides the logits into inf
        ("temperature", "1000", False),
        ("repetition_penalty", "0.01", True),
        ("repetition_penalty", "1e-300", False),
        ("repetition_penalty", "1e300", False),
        ("max_new_tokens", str(1 << 20), True),
        ("max_new_tokens", str(10**30), False),
        ("model.max_context", str(1 << 40), False),
        ("top_k", str(2**70), False),
        ("generation.stream_interval", "0", False),
        ("remote.timeout", "86400", True),
        ("remote.timeout", "1e12", False),  # a socket refuses it: a traceback at the first request
        ("remote.timeout", "0.001", True),
        ("remote.timeout", "1e-320", False),  # a subnormal is > 0, but every request would time out at once
        ("remote.timeout", "0.0009", False),
        ("remote.answer_timeout", "0", True),  # no bound
        ("remote.answer_timeout", "0.001", True),
        ("remote.answer_timeout", "1e-320", False),  # every answer cut before its first token
    ],
)
def test_numeric_settings_are_range_checked_when_given(key, text, accepted):
    settings = Settings()
    if accepted:
        settings.set(key, text)
        return
    with pytest.raises(UsageError) as err:
        settings.set(key, text)
    assert "must be" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("key", "text", "bound"), [("top_k", str(2**70), "to 2**63-1"),
                                                  ("stream_interval", str(10**8), "to 1,048,576"),
                                                  ("serve.queue_depth", str(10**6), "to 100,000")])
def test_a_value_over_the_top_is_refused_naming_the_top(key, text, bound):
    # "must be an integer ≥ 1, not 100000000": the value met the rule as it was said
    with pytest.raises(UsageError) as err:
        Settings().set(key, text)
    assert bound in str(err.value) and "≥" not in str(err.value)


def test_text_settings_must_be_utf8_but_paths_may_hold_any_bytes(tmp_path):
    latin1 = b"caf\xe9".decode("utf-8", errors="surrogateescape")  # as Python decodes the environment
    with pytest.raises(UsageError, match=r"system\.message is not UTF-8 text \(byte 0xe9\)"):
        load_settings(env=clean_env(tmp_path, INTERNVL_CHAT_SYSTEM_MESSAGE=latin1))
    settings = load_settings(env=clean_env(tmp_path, INTERNVL_CHAT_MODEL_PATH=f"/models/{latin1}"))
    assert settings.model.path == f"/models/{latin1}"  # a real (non-UTF-8) folder name still works
    format_settings(settings).encode("utf-8")  # and --print-config can print it


def test_a_servers_password_is_neither_printed_nor_saved(tmp_path):
    settings = load_settings(env=clean_env(tmp_path), overrides={"remote.server": "http://alice:s3cret@gpu:8000/v1"})
    assert settings.remote.server == "http://alice:s3cret@gpu:8000/v1"  # the client still sends it
    assert 'server = "http://gpu:8000/v1"' in format_settings(settings) and "s3cret" not in format_settings(settings)
    assert settings.to_dict()["remote"]["server"] == "http://gpu:8000/v1"  # what a session file holds


def test_a_path_setting_holding_a_nul_is_refused_by_name(tmp_path):
    # TOML can spell a NUL ("\u0000"); the REPL's history file then failed to open with a ValueError traceback
    for section, key in (("ui", "history_file"), ("model", "path")):
        path = write(tmp_path / f"{key}.toml", f'[{section}]\n{key} = "/tmp/a\\u0000b"\n')
        with pytest.raises(UsageError, match=rf"{section}\.{key} must be .*, not '/tmp/a\\x00b'; fix the value"):
            load_settings(config_path=path, env=clean_env(tmp_path))


def test_config_files_are_read_as_untrusted_text(tmp_path):
    env = clean_env(tmp_path)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    cases = {
        fifo: "is not a regular file",
        Path("/dev/zero"): "is not a regular file",
        tmp_path: "is a folder",
        write(tmp_path / "latin1.toml", ""): "not UTF-8 text (byte 0xe9 on line 2)",
        write(tmp_path / "deep.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n"): "nested too deeply",
        write(tmp_path / "esc.toml", '["gen\\u001b[2Jeration"]\nx = 1\n'): "unknown section [gen\\e[2Jeration]",
        # tomllib hands a 5,000-digit integer to int(), which raises a plain ValueError
        write(tmp_path / "digits.toml", "[generation]\nseed = " + "1" * 5000 + "\n"): "holds a number too large",
    }
    (tmp_path / "latin1.toml").write_bytes(b"[system]\nmessage = \"caf\xe9\"\n")
    for path, expected in cases.items():
        with pytest.raises(UsageError) as err:
            load_settings(config_path=path, env=env)
        message = str(err.value)
        assert expected in message and "\n" not in message and "\x1b" not in message, message
    assert load_settings(config_path=os.devnull, env=env).model.max_context == 8192  # /dev/null: no user settings


def test_a_long_or_hostile_name_in_a_config_file_is_shown_cut_short_and_escaped_once(tmp_path):
    # a key or section 100,000 characters long was printed whole, and a key's escapes were doubled
    # ('model.dev\\e[2Jice': escaped, then repr'd)
    env = clean_env(tmp_path)
    cases = {
        write(tmp_path / "long_key.toml", '[model]\n"' + "k" * 100_000 + '" = 1\n'): "unknown setting 'model.kkk",
        write(tmp_path / "long_section.toml", '["' + "s" * 100_000 + '"]\nx = 1\n'): "unknown section [sss",
        write(tmp_path / "esc_key.toml", '[model]\n"dev\\u001b[2Jice" = 1\n'): "unknown setting 'model.dev\\e[2Jice'",
    }
    for path, expected in cases.items():
        with pytest.raises(UsageError) as err:
            load_settings(config_path=path, env=env)
        message = str(err.value)
        assert expected in message and len(message) < 400 and "\x1b" not in message, message


def test_a_json_file_given_as_the_config_says_what_goes_where(tmp_path):
    # `--config MODEL/config.json` (the model's config, taken for the app's) said "not valid TOML
    # (Invalid statement …); fix the file": advice to edit the checkpoint
    env = clean_env(tmp_path)
    model_config = write(tmp_path / "config.json", '{\n  "architectures": ["InternVLChatModel"]\n}\n')
    with pytest.raises(UsageError) as err:
        load_settings(config_path=model_config, env=env)
    assert str(err.value) == (f"config file {model_config} is JSON, not a TOML settings file (as --print-config shows); "
                              "a model folder goes to --model, a saved session to /load")  # fmt: skip
    with pytest.raises(UsageError, match=r"is not valid TOML \(.*\); fix the file"):  # JSON, but no object: plain bad TOML
        load_settings(config_path=write(tmp_path / "five.toml", "[5, 6]\n"), env=env)


def test_text_settings_typed_under_an_ascii_locale_are_read_as_utf8(tmp_path):
    # LC_ALL=C without UTF-8 mode: Python decodes argv and the environment as ASCII, each byte of a
    # UTF-8 "é" a surrogate; `serve --model-id café` was refused as "not UTF-8 text (byte 0xc3)"
    typed = "café 🐱".encode("utf-8").decode("ascii", errors="surrogateescape")
    settings = load_settings(env=clean_env(tmp_path, INTERNVL_CHAT_SYSTEM_MESSAGE=typed),
                             overrides={"serve.model_id": typed}, flags={"serve.model_id": "--model-id"})  # fmt: skip
    assert settings.serve.model_id == settings.system.message == "café 🐱"
    settings = load_settings(env=clean_env(tmp_path, INTERNVL_CHAT_MODEL_PATH=f"/models/{typed}"))
    assert settings.model.path == f"/models/{typed}"  # a path keeps the bytes the file system gave


def test_the_local_media_folder_typed_under_an_ascii_locale_keeps_its_bytes(tmp_path):
    # it was read as UTF-8 as a text is: "média" then named no file under the ASCII file-system
    # encoding, and `serve --allow-local-media /data/média` said the existing folder "is not a folder"
    typed = "média".encode("utf-8").decode("ascii", errors="surrogateescape")
    settings = load_settings(env=clean_env(tmp_path), overrides={"serve.allow_local_media": f"/data/{typed}"},
                             flags={"serve.allow_local_media": "--allow-local-media"})  # fmt: skip
    assert settings.serve.allow_local_media == f"/data/{typed}"


def test_a_bad_flag_value_names_the_flag_typed(tmp_path):
    # it said "flag model.dtype: must be …", a name the user never typed; env and config messages keep the key
    with pytest.raises(UsageError) as err:
        load_settings(env=clean_env(tmp_path), overrides={"model.dtype": "fp8"}, flags={"model.dtype": "--dtype"})
    assert str(err.value).startswith("--dtype: must be ") and str(err.value).endswith(", not 'fp8'; fix the value.")
    assert "model.dtype" not in str(err.value)
    with pytest.raises(UsageError) as err:
        load_settings(env=clean_env(tmp_path), overrides={"system.message": "a\udcffb"}, flags={"system.message": "--system"})
    assert str(err.value) == "--system: is not UTF-8 text (byte 0xff); fix the value."
    settings = load_settings(env=clean_env(tmp_path), overrides={"model.dtype": "float32"}, flags={"model.dtype": "--dtype"})
    assert settings.sources["model.dtype"] == "flag"  # --print-config still says where it came from



def test_print_config_json_gives_every_setting_its_value_and_source(tmp_path, monkeypatch, capsys):
    # --print-config --json printed TOML: --json was silently dropped
    from internvl_chat.cli import main

    for key in [k for k in os.environ if k.startswith("INTERNVL_CHAT_")] + ["XDG_CONFIG_HOME"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in clean_env(tmp_path, INTERNVL_CHAT_SYSTEM_MESSAGE="hi \x1b[31m 你好").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("INTERNVL_CHAT_REMOTE_API_KEY", "sk-secret-value-1234")
    assert main(["--print-config", "--json", "--max-tiles", "3"]) == 0
    out = capsys.readouterr().out
    assert out.isascii()  # escape sequences from the environment print inert
    shown = json.loads(out)
    settings = load_settings(env=clean_env(tmp_path), overrides={"max_tiles": 3})
    assert set(shown) == set(settings.to_dict())
    assert all(set(shown[s]) == set(keys) for s, keys in settings.to_dict().items())
    assert shown["media"]["max_tiles"] == {"value": 3, "from": "flag"}
    assert shown["system"]["message"] == {"value": "hi \x1b[31m 你好", "from": "env INTERNVL_CHAT_SYSTEM_MESSAGE"}
    assert shown["generation"]["top_k"]["from"] == "default"
    assert "sk-secret-value-1234" not in out  # masked as in the TOML form


@pytest.mark.parametrize(
    "key, text, shown",
    [
        ("temperature", "٠.٥", "'\\u0660.\\u0665'"),
        ("max_tiles", "٣", "'\\u0663'"),
        ("seed", "١_٠", "'\\u0661_\\u0660'"),
        ("max_new_tokens", "5１2", "'5\\uff112'"),
        ("model.device", "cuda:١", "'cuda:\\u0661'"),
    ],
)
def test_numbers_in_other_digits_are_refused_with_the_text_escaped(tmp_path, key, text, shown):
    # int() and float() read ٣ as 3 (and \d matched cuda:١): the value set was not the one shown
    with pytest.raises(UsageError) as err:
        Settings().set(key, text, source="/set")
    assert f"must be written with the digits 0-9, not {shown}" in str(err.value) and str(err.value).isascii()
    with pytest.raises(UsageError, match="digits 0-9"):  # an environment variable is read the same way
        load_settings(env=clean_env(tmp_path, INTERNVL_CHAT_MEDIA_FRAMES=text if key != "model.device" else "٨"))


def test_number_flags_refuse_underscores_int_and_float_read():
    from internvl_chat.cli import build_parser

    # float() reads `--temperature 1_0.5` as 10.5, int() `--frames 1_6` as 16
    for flag, text, kind in (("--temperature", "1_0.5", "float"), ("--frames", "1_6", "int"), ("--top-p", "nan", "float")):
        with pytest.raises(UsageError) as err:
            build_parser().parse_args([flag, text])
        assert str(err.value).startswith(f"argument {flag}: invalid {kind} value: {text!r}; ")


def test_flags_and_origin_ports_in_other_digits_are_refused_with_the_text_escaped():
    from internvl_chat.cli import build_parser
    from internvl_chat.settings import web_origin

    for flag, text in (("--temperature", "٠.٥"), ("--frames", "٨"), ("--max-context", "٤٠٩٦")):
        with pytest.raises(UsageError) as err:
            build_parser().parse_args([flag, text])
        assert str(err.value).startswith(f"argument {flag}: must be written with the digits 0-9, not {ascii(text)}; ")
    assert build_parser().parse_args(["--temperature", "0.5", "--frames", "8"]).frames == 8
    with pytest.raises(ValueError) as err:
        web_origin("http://localhost:٣٠٠٠")  # was read as port 3000
    assert "'http://localhost:\\u0663\\u0660\\u0660\\u0660' has no valid port: write it with the digits 0-9" in str(err.value)


def _config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(UsageError) as err:
        load_settings(config_path=write(tmp_path / "user.toml", text), env=clean_env(tmp_path))
    return str(err.value)


def test_a_setting_above_every_section_header_is_named_with_its_section(tmp_path):
    # `temperature = 0.5` first in the file was "unknown section [temperature]": no section was written
    message = _config_error(tmp_path, "temperature = 0.5\ntemprature = 1\nxyzzy = 2\n")
    assert message == (
        f"{tmp_path / 'user.toml'}: 'temperature' is above every [section] header (it goes under [generation]); "
        "'temprature' is above every [section] header (did you mean 'temperature'? it goes under [generation]); "
        "'xyzzy' is above every [section] header, where no setting goes; fix the file.")  # fmt: skip


def test_every_misspelt_name_in_a_config_file_is_named_at_once(tmp_path):
    # one run named only the first, so a file of five typos took five runs to fix
    message = _config_error(tmp_path, "[generaton]\nseed = 1\n[generation]\ntemprature = 0.5\ntop-p = 0.9\n"
                                      "[ui]\ncolour = 'never'\n[system]\nmesage = 'hi'\n")  # fmt: skip
    assert message == (
        f"{tmp_path / 'user.toml'}: unknown section [generaton] (did you mean 'generation'?); "
        "unknown setting 'generation.temprature' (did you mean 'generation.temperature'?); "
        "unknown setting 'generation.top-p' (did you mean 'generation.top_p'?); "
        "unknown setting 'ui.colour' (did you mean 'ui.color'?); "
        "unknown setting 'system.mesage' (did you mean 'system.message'?); "
        "valid sections are model, generation, media, ui, system, serve, remote.")  # fmt: skip
    many = _config_error(tmp_path, "[ui]\n" + "".join(f"typo{n} = 1\n" for n in range(300)))
    assert many.count("unknown setting") == NAME_PROBLEMS_SHOWN and many.endswith("; and 295 more; fix the file.")


def test_an_unknown_array_of_tables_is_named_as_a_section_not_as_a_name_above_the_headers(tmp_path):
    # `[[sampling]]` is a header: it was said to be "above every [section] header" with a setting guessed for it
    message = _config_error(tmp_path, "[[sampling]]\ntemperature = 0.5\n")
    assert message == (f"{tmp_path / 'user.toml'}: unknown section [sampling]; "
                       "valid sections are model, generation, media, ui, system, serve, remote.")  # fmt: skip


def test_print_config_on_an_ascii_stdout_reads_back_as_the_same_values(tmp_path):
    # PYTHONIOENCODING=ascii (LC_ALL=C without UTF-8 mode): the TOML printed to be pasted into a
    # config file wrote the system message's "…" and "’" as "..." and "'" (stdout's glyph handler),
    # and "é" as \xe9, which TOML refuses: read back, the value differed or the file did not load
    import subprocess
    import sys

    message = "Don\u2019t ramble\u2026 caf\u00e9 \u4f60\u597d \U0001f306 \u2192 x"
    env = {**clean_env(tmp_path, INTERNVL_CHAT_SYSTEM_MESSAGE=message), "PATH": os.environ.get("PATH", ""),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONIOENCODING": "ascii"}  # fmt: skip
    for encoding in ("ascii", "latin-1"):  # Latin-1: "é" was written as its byte, which no UTF-8 TOML file holds
        run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--print-config"], capture_output=True,
                             env={**env, "PYTHONIOENCODING": encoding}, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout.isascii()
        assert tomllib.loads(run.stdout.decode())["system"]["message"] == message
