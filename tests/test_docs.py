"""The front door stays true: README, docs/architecture.md, benchmarks/README.md, default.toml and
`--help` against the code.

Cheap, static checks (no model, no subprocess): every flag, slash command, environment variable,
make target and script command the docs name exists (and every flag the app's messages name);
README names every route serve has; the defaults and choices `--help`, README and default.toml
state are the settings' own; the limits README and docs/architecture.md quote are the code's, and
README's GPU table and exact ratios are benchmarks/RESULTS.md's; every dependency has its reason (and one only the test extra
installs says so); every module has a row in the module map, the repository files the docs name exist, the code names docs/architecture.md
gives exist, every unit of the package has a layer and imports follow the layers; a package's own
list of its modules is complete.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

from internvl_chat import cli, files
from internvl_chat.chat.remote_http import CONNECT_TIMEOUT_S
from internvl_chat.errors import UsageError
from internvl_chat.quantize import build_parser as quantize_parser, quantize_checkpoint
from internvl_chat.serve import main as serve_main
from internvl_chat.setting_flags import SettingFlags
from internvl_chat.settings import (COLORS, COMPILE_MODES, DTYPES, INT4_BACKENDS, OTHER_ENV_VARS, REMOTE_DIALECTS, Settings,
                                    all_keys, env_name, load_settings)
from internvl_chat.ui.session_commands import NOT_SESSION_SUFFIXES
from internvl_chat.ui.saved_sessions import RESTORED_SETTINGS
from internvl_chat.ui.set_keys import START_FLAGS, changeable_while_running, read_at_start, runtime_keys
from internvl_chat.ui.commands import COMMAND_BY_NAME, COMMANDS

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "internvl_chat"
README = (REPO / "README.md").read_text(encoding="utf-8")
ARCHITECTURE = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
BENCH_README = (REPO / "benchmarks" / "README.md").read_text(encoding="utf-8")
RESULTS = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
DEFAULT_TOML = (PACKAGE / "configs" / "default.toml").read_text(encoding="utf-8")

# Flags of other programs that README's server sections show (lmdeploy, vLLM, SGLang, llama.cpp, lm_eval).
OTHER_TOOLS_FLAGS = {
    "--api-keys", "--enable-prefix-caching", "--enable-prompt-tokens-details", "--limit-mm-per-prompt",
    "--max-model-len", "--mmproj", "--model-format", "--model-path", "--server-port", "--session-len",
    "--tensor-parallel-size", "--tp", "--trust-remote-code", "--model_args", "--tasks",
}  # fmt: skip
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def parsers() -> dict[str, argparse.ArgumentParser]:
    return {"internvl-chat": cli.build_parser(), "serve": serve_main.build_parser(), "quantize": quantize_parser()}


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def script_flags(path: Path) -> set[str]:
    """The `--flags` a script's argparse declares (read from its source: importing it may be slow)."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


# --- flags and help ----------------------------------------------------------------------------


def test_every_flag_has_help():
    for name, parser in parsers().items():
        for action in parser._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}"


def test_every_flag_the_readme_names_exists():
    ours = set().union(*(parser_flags(p) for p in parsers().values()))
    repl_options = {option.name for spec in COMMANDS for option in spec.options}
    scripts = set().union(*(script_flags(p) for p in (REPO / "scripts").glob("*.py")))
    unknown = set(FLAG.findall(README)) - ours - repl_options - scripts - OTHER_TOOLS_FLAGS
    assert not unknown, f"README names flags nothing defines: {sorted(unknown)}"


@pytest.mark.parametrize("mode", ["internvl-chat", "serve"])  # quantize's README points at its --help
def test_readme_names_every_flag(mode):
    other_tools = ("lmdeploy ", "vllm ", "python -m sglang", "llama-server ", "lm_eval ", "--limit-mm-per-prompt", "#")
    ours = "\n".join(line for line in README.splitlines() if not line.lstrip().startswith(other_tools))
    unnamed = [action.option_strings for action in parsers()[mode]._actions
               if action.option_strings and action.dest != "help"
               and not any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", ours) for flag in action.option_strings)]  # fmt: skip
    assert not unnamed, f"README does not name {mode}'s {unnamed}"


def test_every_flag_the_apps_messages_name_exists():
    ours = set().union(*(parser_flags(p) for p in parsers().values()))
    repl_options = {option.name for spec in COMMANDS for option in spec.options}
    named = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):  # f-string parts too
                for flag in set(FLAG.findall(node.value)) - ours - repl_options:
                    named.setdefault(flag, path.relative_to(PACKAGE).as_posix())
    assert not named, f"messages name flags nothing defines: {named}"


def setting_flags(mode: str) -> SettingFlags:
    return cli.chat_setting_flags() if mode == "internvl-chat" else serve_main.serve_setting_flags()


def _flag_keys(mode: str) -> dict[str, str]:
    """flag → the dotted setting it sets, for flags that take a value (switches set fixed values)."""
    return {flag: setting for setting, flag in setting_flags(mode).names().items()}


def stated_default(help_text: str) -> str | None:
    """The default a help text states: `(default 8)`, `(default auto: …)`, `0 is greedy (default)`,
    `auto (default, …)`; `the` for a described one (`(default: the checkpoint's)`)."""
    for pattern in (r"\(default:?\s+([^\s;,)]+)", r"(\S+) is [^(]*\(default\)", r"(\S+) \(default[,)]"):
        match = re.search(pattern, help_text)
        if match:
            return match.group(1).rstrip(":")
    return None


@pytest.mark.parametrize("mode", ["internvl-chat", "serve"])
def test_defaults_in_help_are_the_settings_defaults(mode):
    parser = parsers()[mode]
    defaults = Settings()
    checked = 0
    for flag, key in _flag_keys(mode).items():
        action = next(a for a in parser._actions if flag in a.option_strings)
        stated = stated_default(action.help)
        if stated is None:
            continue
        default = defaults.get(key)
        if stated == "the":  # "(default: the checkpoint's …)": the setting is unset
            assert default in (None, ""), f"{flag}: help describes an unset default, {key} is {default!r}"
        elif isinstance(default, (int, float)):
            assert float(stated) == default, f"{flag}: help says {stated}, {key} is {default!r}"
        else:
            assert stated == default, f"{flag}: help says {stated}, {key} is {default!r}"
        checked += 1
    assert checked >= (15 if mode == "internvl-chat" else 9)


@pytest.mark.parametrize("mode", ["internvl-chat", "serve"])
def test_the_flag_a_bad_value_names_is_the_one_that_set_it(mode):
    # through the mode's own path (parse → overrides → load_settings): a value no setting takes
    # (a dict: a list is what a repeatable flag, --allow-origin, gives) must be refused naming the
    # flag as typed, not the setting
    module = cli if mode == "internvl-chat" else serve_main
    parser = parsers()[mode]
    flags = _flag_keys(mode)
    assert len(flags) >= 15
    for flag in flags:
        args = parser.parse_args([])
        setattr(args, next(a.dest for a in parser._actions if flag in a.option_strings), {})
        with pytest.raises(UsageError) as caught:
            load_settings(os.devnull, {}, module._overrides(args), setting_flags(mode).names())
        assert str(caught.value).startswith(f"{flag}: "), (flag, str(caught.value))


@pytest.mark.parametrize("mode", ["internvl-chat", "serve"])
def test_a_switch_moves_its_setting_off_the_default(mode):
    # --no-stats sets ui.stats False, --plain ui.plain True: the switch's value is not the default
    module = cli if mode == "internvl-chat" else serve_main
    switches = [flag for flag in setting_flags(mode) if flag.is_switch]
    assert len(switches) >= (4 if mode == "internvl-chat" else 1)
    for switch in switches:
        settings = load_settings(os.devnull, {}, module._overrides(parsers()[mode].parse_args([switch.flag])))
        assert settings.get(switch.setting) != Settings().get(switch.setting), switch.flag
        assert settings.sources[switch.setting] == "flag", switch.flag


# flags that give no setting: each is used by the mode itself (a new flag for a setting must be
# declared with add_setting_flag, or the setting it was meant for stays unchanged)
NOT_SETTINGS = {
    "internvl-chat": {"--prompt", "--image", "--video", "--video-range", "--json", "--script", "--interactive",
                      "--config", "--print-config", "--version", "--help"},
    "serve": {"--config", "--log-level", "--help"},
}  # fmt: skip


@pytest.mark.parametrize("mode", ["internvl-chat", "serve"])
def test_every_flag_gives_a_setting_or_is_known_not_to(mode):
    given = {flag.flag for flag in setting_flags(mode)}
    others = {action.option_strings[-1] for action in parsers()[mode]._actions if action.option_strings} - given
    assert others == NOT_SETTINGS[mode]


def test_flags_the_chat_and_serve_share_say_the_same():
    # serve's --compile once still said "a compiled decode step" after the chat's named the C++ step
    differ = {"--model": "serve has no demo model", "--max-context": "per slot in serve"}
    chat, serve = parsers()["internvl-chat"], parsers()["serve"]
    chat_keys, serve_keys = _flag_keys("internvl-chat"), _flag_keys("serve")
    helps = {name: {flag: a.help for a in p._actions for flag in a.option_strings} for name, p in (("chat", chat), ("serve", serve))}
    shared = [flag for flag in chat_keys if serve_keys.get(flag) == chat_keys[flag] and flag not in differ]
    assert len(shared) >= 4, shared
    for flag in shared:
        assert helps["chat"][flag] == helps["serve"][flag], flag
    assert helps["chat"]["--config"] == helps["serve"]["--config"]


def test_defaults_the_readme_gives_for_flags_are_the_settings_defaults():
    # "`--slots`, default 2", "`--queue-depth` (8)", "`--header-timeout` (10 s)", "`--dialect` … (default `auto`"
    forms = (r"`(--[a-z][\w-]*)(?: [A-Z]+)?`(?:,| \()\s*(?:default\s+)?(\d+(?:\.\d+)?)(?=[\s,)])",
             r"`(--[a-z][\w-]*)(?: [A-Z]+)?` [^`()]*\(default `(\w+)`")  # fmt: skip
    keys = {**_flag_keys("internvl-chat"), **_flag_keys("serve")}
    defaults = Settings()
    stated = [match.groups() for form in forms for match in re.finditer(form, README)]
    assert len(stated) >= 8, stated
    for flag, value in stated:
        default = defaults.get(keys[flag])
        assert (float(value) == default) if value[0].isdigit() else (value == default), f"README: {flag} {value}, {keys[flag]} is {default!r}"


def test_readme_names_every_route_serve_has():
    source = (PACKAGE / "serve" / "app.py").read_text(encoding="utf-8")
    routes = re.findall(r'@app\.(get|post)\("([^"]+)"\)', source)
    # a route of several methods (/health: GET and HEAD) is named by its GET
    routes += [("get", path) for path in re.findall(r'@app\.api_route\("([^"]+)", methods=\[[^\]]*"GET"', source)]
    assert len(routes) >= 4
    for method, path in routes:
        shown = re.sub(r"\{\w+(?::\w+)?\}", "ID", path)  # /v1/models/{name:path} → /v1/models/ID
        assert f"`{method.upper()} {shown}`" in README, f"README does not name {method.upper()} {shown}"


def test_the_dialects_help_readme_and_config_list_are_the_ones_there_are():
    help_text = next(a.help for a in parsers()["internvl-chat"]._actions if "--dialect" in a.option_strings)
    listed = re.sub(r" \(default[^)]*\)", "", help_text.split(": ", 1)[1])  # "auto, lmdeploy, … or generic"
    assert re.split(r", | or ", listed) == list(REMOTE_DIALECTS)
    readme = README[README.index("`--dialect` forces") :].split(")")[0].split("`owned_by`:")[1]  # auto detects these
    assert ["auto", *re.findall(r"`([\w-]+)`", readme)] == list(REMOTE_DIALECTS)
    config = next(line for line in (PACKAGE / "configs" / "default.toml").read_text(encoding="utf-8").splitlines()
                  if line.startswith("dialect ="))  # fmt: skip
    assert config.split("#")[1].split() == " | ".join(REMOTE_DIALECTS).split()


@pytest.mark.parametrize("key, choices", [("model.dtype", DTYPES), ("model.int4_backend", INT4_BACKENDS),
                                          ("model.compile", COMPILE_MODES), ("ui.color", COLORS)])  # fmt: skip
def test_the_choices_help_and_config_list_are_the_ones_a_setting_takes(key, choices):
    section, name = key.split(".")
    toml = (PACKAGE / "configs" / "default.toml").read_text(encoding="utf-8")
    line = re.search(rf"^\[{section}\][\s\S]*?^{name} = .*#\s*(.*)$", toml, re.M).group(1)
    assert line.startswith(" | ".join(choices) + " "), line
    for mode, parser in (("internvl-chat", cli.build_parser()), ("serve", serve_main.build_parser())):
        flags = [flag for flag, k in _flag_keys(mode).items() if k == key]
        for action in (a for a in parser._actions if set(a.option_strings) & set(flags)):
            assert re.match(rf"{re.escape(' | '.join(choices))}[:( ]", action.help), action.help


def test_stated_default_forms():
    assert stated_default("frames sampled per video (default 8)") == "8"
    assert stated_default("auto | cpu (default auto: CUDA if present)") == "auto"
    assert stated_default("0 is greedy (default)") == "0"
    assert stated_default("auto (default, from its model list), lmdeploy") == "auto"
    assert stated_default("system message (default: the checkpoint's)") == "the"
    assert stated_default("make sampling reproducible") is None


def test_defaults_in_quantize_help_are_its_defaults():
    checked = 0
    # --samples and --seed have no parser default (given with --method rtn, they are refused): quantize_checkpoint's applies
    pipeline_defaults = {name: p.default for name, p in inspect.signature(quantize_checkpoint).parameters.items()}
    for action in quantize_parser()._actions:
        if action.dest in ("samples", "seed"):
            action.default = pipeline_defaults[action.dest]
        # a default of None is computed (--group-size) or built-in data (--calib): described, not stated
        if not action.option_strings or "default" not in (action.help or "") or action.default is None:
            continue
        if action.choices:  # "awq: … (default); rtn: …"
            described = re.search(r"(\w+): [^;]*\(default\)", action.help)
            assert described and described.group(1) == action.default, action.help
        else:
            assert stated_default(action.help) == str(action.default), f"{action.option_strings}: {action.help}"
        checked += 1
    assert checked >= 4


def test_readme_names_the_flags_server_refuses():
    sentence = README[: README.index("are refused with `--server`")].rsplit("\n", 1)[1]
    local = [flag.flag for flag in cli.chat_setting_flags() if flag.setting.startswith("model.")]
    assert re.findall(r"`(--[\w-]+)`", sentence) == local


def test_readme_names_every_answer_form_control_serve_refuses():
    from internvl_chat.serve.protocol import _GUIDED_FIELDS

    listed = _flat(README[README.index("Controls it does not have") :].split("are refused with 400 unless neutral")[0])
    assert [name for name in _GUIDED_FIELDS if f"`{name}`" not in listed] == []


# --- REPL commands and settings ----------------------------------------------------------------


def test_readme_lists_every_repl_command_and_no_other():
    named = set(re.findall(r"`/([a-z]+)(?=[\s`\]])", README))
    assert named <= set(COMMAND_BY_NAME), f"README names unknown commands: {sorted(named - set(COMMAND_BY_NAME))}"
    for spec in COMMANDS:
        assert f"`{spec.usage}`" in README, spec.usage
        for alias in spec.aliases:
            assert f"`/{alias}`" in README, alias


def test_readme_says_which_settings_set_can_change():
    sections = ("generation.", "media.", "system.")
    others = [key for key in runtime_keys() if not key.startswith(sections)]
    sentence = README[README.index("`/set` changes") :].split(";")[0]
    assert all(f"`{section[:-1]}`" in sentence for section in sections)
    assert sorted(re.findall(r"`(\w+\.\w+)`", sentence)) == sorted(others)
    assert all(key.startswith(sections) or key in others for key in runtime_keys())


def test_readme_says_which_settings_load_brings_back():
    sampling = {"generation.temperature", "generation.top_p", "generation.top_k", "generation.repetition_penalty",
                "generation.seed"}  # fmt: skip
    sentence = README[README.index("It brings back the sampling settings") :].split(".")[0]
    named = {key for key in all_keys() if f"`{key.split('.')[1]}`" in sentence}
    assert sampling | named == set(RESTORED_SETTINGS), sentence


def test_readme_names_the_files_save_refuses():
    sentence = re.split(r"is\s+refused", README[README.index("A session file is JSON, so") :])[0]
    assert tuple(re.findall(r"`[^`]*?(\.\w+)`", sentence)) == NOT_SESSION_SUFFIXES


def test_the_flags_set_names_for_settings_read_at_start_set_them():
    parser = cli.build_parser()
    help_text = parser.format_help()
    for key, hint in START_FLAGS.items():
        assert not changeable_while_running(key), key
        flag, _, metavar = hint.partition(" ")
        shown = re.escape(flag) + (rf" \[?{re.escape(metavar)}\]?" if metavar else "")  # --server [URL]: optional
        assert re.search(rf"(?<![\w-]){shown}(?![\w-])", help_text), hint  # as --help shows it
        action = next(a for a in parser._actions if flag in a.option_strings)
        value = "7" if action.type in (int, float) else metavar  # "--dtype T" gives model.dtype "T"
        args = parser.parse_args([flag, value] if metavar else [flag])  # a switch alone
        assert cli._overrides(args)[key] not in (None, Settings().get(key)), hint
        assert f"restart with {hint}" in read_at_start(key)
    # every setting read at start that a chat flag gives is named
    said = {flag.setting for flag in cli.chat_setting_flags() if not changeable_while_running(flag.setting)}
    assert said == set(START_FLAGS) and len(said) >= 10, sorted(said ^ set(START_FLAGS))


def test_environment_variables_named_in_docs_and_help_exist():
    valid = {env_name(key) for key in all_keys()} | set(OTHER_ENV_VARS)
    texts = [README, ARCHITECTURE, (PACKAGE / "configs" / "default.toml").read_text(encoding="utf-8")]
    texts += [action.help or "" for parser in parsers().values() for action in parser._actions]
    named = {name for text in texts for name in re.findall(r"INTERNVL_CHAT_[A-Z0-9_]*[A-Z0-9]", text)}
    assert named and named <= valid, sorted(named - valid)


# --- commands the docs show ----------------------------------------------------------------------


def test_make_targets_the_docs_name_exist():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())
    named = set(re.findall(r"(?:^|`)make ([a-z]+)", README + BENCH_README, re.M))
    assert {"demo", "test"} <= named <= phony


def test_script_commands_in_the_docs_use_their_scripts_flags():
    commands = re.findall(r"^(?:\S+=\S+ )*(?:python|bash) (scripts/\S+)(.*)$", README + BENCH_README + ARCHITECTURE, re.M)
    assert len(commands) >= 8
    for script, rest in commands:
        path = REPO / script
        assert path.is_file(), script
        if path.suffix == ".py":
            unknown = set(FLAG.findall(rest.split("#")[0])) - script_flags(path)
            assert not unknown, f"{script}: {sorted(unknown)}"


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group().lower() for r in requirements}


def test_readme_explains_every_dependency_and_only_those():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = _requirement_names(project["dependencies"])
    tests = _requirement_names(project["optional-dependencies"]["test"])
    section = README[README.index("## Dependencies") :].split("\n## ")[0]
    rows = set()
    for cells in re.findall(r"^\| ([^|]+) \|", section, re.M):
        rows |= {re.sub(r" \(.*\)", "", name).strip().lower() for name in cells.split(",")}
    rows -= {"package", "---"}
    assert required <= rows, sorted(required - rows)
    assert rows <= required | tests, sorted(rows - required - tests)  # triton, gemlite: test extras, optional
    extras = section[section.index("Test extras:") :]
    assert all(re.search(rf"\b{re.escape(name)}\b", extras) for name in tests), sorted(tests)


def test_readme_says_which_packages_only_the_test_extra_installs():
    # gemlite's row said "not installed by default" after it joined the test extra, which `make` installs
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extra_only = _requirement_names(project["optional-dependencies"]["test"]) - _requirement_names(project["dependencies"])
    section = README[README.index("## Dependencies") :].split("\n## ")[0]
    rows = {re.sub(r" \(.*\)", "", cells).strip().lower(): why for cells, why in re.findall(r"^\| ([^|]+) \| (.*) \|$", section, re.M)}
    named = extra_only & set(rows)
    assert named, sorted(rows)
    for name in named:
        assert "test extra" in rows[name] and "not installed" not in rows[name], f"README's {name} row: {rows[name]}"


def test_the_python_version_the_docs_state_is_the_one_the_code_needs():
    requires = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    minimum = tuple(int(n) for n in re.fullmatch(r">=(\d+)\.(\d+)", requires).groups())
    assert f"Python {minimum[0]}.{minimum[1]}+" in README
    assert f"{minimum!r}" in (REPO / "Makefile").read_text(encoding="utf-8")  # make's own check
    if any("import tomllib" in p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")):
        assert minimum >= (3, 11), "tomllib is new in Python 3.11"
    assert sys.version_info >= minimum


# --- numbers the docs quote ----------------------------------------------------------------------


def test_limits_the_docs_quote_are_the_codes():
    assert f"regular UTF-8 files under {files.TEXT_LIMIT // files.MiB} MiB" in README
    graceful = inspect.signature(serve_main.uvicorn_config).parameters["graceful_s"].default
    assert f"running requests get {graceful} s to finish" in README
    assert f"(to connect: at most {CONNECT_TIMEOUT_S:g})" in DEFAULT_TOML


def _flat(text: str) -> str:
    return " ".join(text.split())  # a quoted phrase may be wrapped across lines


def test_more_limits_the_docs_quote_are_the_codes():
    # each was checked by hand once; these keep a changed constant from leaving its number behind
    from internvl_chat.chat import answer_bounds, remote_http
    from internvl_chat.chat.sampling import GREEDY_BELOW, LOGPROBS_MAX
    from internvl_chat.engine import tensor_reader
    from internvl_chat.media import image, video_cost, video_header
    from internvl_chat.quant.int4_linear import Int4Linear
    from internvl_chat.serve import answers, connections, namespaces, protocol, text_completions, tokenizer_api
    from internvl_chat.serve import engine as serve_engine, media as serve_media
    from internvl_chat.serve.logprobs import LOGPROB_FLOOR
    from internvl_chat.settings import REMOTE_TIMEOUT_MAX
    from internvl_chat.ui import media_paths, render

    readme, architecture = _flat(README), _flat(ARCHITECTURE)
    quoted = [
        f"in name order, at most {media_paths.MAX_PATTERN_MATCHES}, when",
        f"over {round(image.MAX_PIXELS / 1e6)} M pixels, a side over {image.MAX_SIDE:,}",
        f"a JPEG of over {image.MAX_JPEG_SCANS} scans",
        f"`stop` (up to {protocol.MAX_STOP_STRINGS} strings of up to {protocol.MAX_STOP_STRING_CHARS:,} characters each)",
        f"of more than {protocol.MAX_JSON_ITEMS:,} JSON items, counted as its `{{`, `[` and `,` bytes",
        f"each counted as at least {video_cost.MIN_FRAME_SIDE}×{video_cost.MIN_FRAME_SIDE}",
        f"`--max-video-decode-megapixels` in all ({Settings().serve.max_video_decode_megapixels}:",
        f"(+{answer_bounds.PIECE_SLACK};", f"more than {answer_bounds.CHARS_PER_TOKEN} characters a token",
        f"(default {Settings().remote.answer_timeout:g}, at most {REMOTE_TIMEOUT_MAX:g}; 0: no bound)",
        f"(the usage, `data: [DONE]`) is waited for {answer_bounds.FINISHED_GRACE_S:g} s at most",
        f"at most {remote_http.MAX_COOKIES} of them, each at most {remote_http.COOKIE_CHARS:,} characters",
        f"on CUDA above {Int4Linear.dense_threshold} rows a dense matmul",
        f"kernel for up to {Int4Linear.gemv_max_rows} rows, a tensor-core GEMM that dequantizes in registers up to "
        f"{Int4Linear.gemm_max_rows},",
        f"GemLite's Triton GEMV for up to {Int4Linear.gemlite_max_rows} rows",
        f"over {video_header.MAX_FRAMES:,} frames, or {video_header.MAX_DURATION_S:,.0f} s at the header's rate",
        f"`n` (1 to {protocol.MAX_CHOICES}; any other is a 400", f"`top_logprobs` alternatives, 0 to {LOGPROBS_MAX},",
        f"one too unlikely to say is {LOGPROB_FLOOR}, as OpenAI writes it",
        f"(up to {text_completions.MAX_PROMPTS} prompts, and prompts × `n` up to {text_completions.MAX_PROMPTS};",
        f"`max_tokens` defaults to {text_completions.DEFAULT_MAX_TOKENS} (OpenAI's",
        f"`logprobs` is the legacy integer, 0 to {text_completions.LEGACY_LOGPROBS_MAX}:",
        f"up to {tokenizer_api.MAX_TOKENIZE_TOKENS:,} tokens), `POST /detokenize`",
        f"a non-empty string of up to {namespaces.MAX_CACHE_SALT_CHARS:,} printable characters",
    ]  # fmt: skip
    assert [q for q in quoted if q not in readme] == []
    # serve's Retry-After estimate and its bounds on what a connection may hold
    quoted_serve = [
        f"an estimate from the last {serve_engine.JOB_HISTORY} requests' durations",
        f"in whole seconds from 1 to {serve_engine.RETRY_AFTER_MAX_S},",
        f"once about {connections.UNSENT_BYTES >> 20} MiB of it wait unsent",
        f"if more than {connections.UNSENT_BYTES >> 20} MiB of it still wait unsent `--write-timeout`",
        f"so an answer over {connections.UNSENT_BYTES >> 20} MiB",
        f"are read up to {connections.PIPELINED_BYTES >> 10} KiB;",
        f"{serve_media.REMOTE_TIMEOUT_S:g} s for each fetch in all, however its host trickles it, and "
        f"{serve_media.REQUEST_REMOTE_TIMEOUT_S:g} s for all the fetches of a request together",
    ]
    assert [q for q in quoted_serve if q not in readme] == []
    write_help = next(a.help for a in parsers()["serve"]._actions if "--write-timeout" in a.option_strings)
    assert f"more than {connections.UNSENT_BYTES >> 20} MiB of it wait unsent (a stream's at any moment" in write_help
    assert answer_bounds.PIECES_PER_TOKEN == 2 and "more text pieces than twice `max_new_tokens`" in readme
    greedy = re.search(r"a `temperature` below (\S+) is greedy", readme)
    assert greedy and float(greedy.group(1)) == GREEDY_BELOW
    capacity = inspect.signature(answers.AnswerMemory).parameters["capacity"].default
    in_architecture = [
        f"(at most {capacity:,} answers and {answers.MAX_TOKENS >> 20}M packed ids)",
        f"({render.LIVE_TAIL_CHARS:,} characters, two screens of lines)",
        f"over {round(image.MAX_PIXELS / 1e6)} M pixels, a side over 2^{image.MAX_SIDE.bit_length() - 1}",
        f"JPEGs of over {image.MAX_JPEG_SCANS} scans",
        f"safetensors headers (at most {tensor_reader.MAX_HEADER_BYTES >> 20} MiB,",
    ]
    assert [q for q in in_architecture if q not in architecture] == []


def test_the_folders_and_modes_the_readme_gives_are_the_codes():
    from internvl_chat.settings import default_config_path
    from internvl_chat.ui.saved_sessions import default_sessions_dir

    readme, home = _flat(README), Path("/home/u")
    sessions = default_sessions_dir({"HOME": str(home)}).relative_to(home).as_posix()
    assert f"`/save` with no FILE writes to `~/{sessions}/` (under `$XDG_STATE_HOME`" in readme
    assert default_sessions_dir({"HOME": str(home), "XDG_STATE_HOME": "/s"}) == Path("/s/internvl-chat/sessions")
    config = default_config_path({"HOME": str(home)}).relative_to(home).as_posix()
    assert f"`~/{config}` (under `$XDG_CONFIG_HOME`" in readme
    assert default_config_path({"HOME": str(home), "XDG_CONFIG_HOME": "/c"}) == Path("/c/internvl-chat/config.toml")
    assert f"are private (mode {files.PRIVATE_FILE_MODE:04o}, new folders 0700)" in readme


def _performance_section() -> str:
    return README[README.index("## Performance") :].split("\n## ")[0]


def test_the_readmes_gpu_table_is_the_results_table():
    results = {}  # ("InternVL3-1B", "bf16") -> the row's cells
    for line in RESULTS[RESULTS.index("## CUDA") :].split("\n## ")[0].splitlines():  # the latest card's
        match = re.match(r"\| (InternVL3-\w+) (bf16|W4) \|(.*)\|$", line)
        if match:
            results[match.group(1), match.group(2)] = [cell.strip() for cell in match.group(3).split("|")]
    rows = re.findall(r"^\| (InternVL3-\w+) \| (\S+) tok/s \| (\S+) tok/s \| (\S+) vs (\S+) GiB \|$", _performance_section(), re.M)
    assert len(rows) >= 3
    for model, bf16, w4, w4_peak, bf16_peak in rows:  # engine (graphs) tok/s is the 2nd column, peak GiB the last
        assert (bf16, bf16_peak) == (results[model, "bf16"][1], results[model, "bf16"][-1]), model
        assert (w4, w4_peak) == (results[model, "W4"][1], results[model, "W4"][-1]), model


def test_every_exact_ratio_the_readmes_performance_section_quotes_is_in_results():
    # rounded figures are read by eye; two-decimal ones are copied, and RESULTS.md has each as a
    # ratio: `×1.22`, `**1.40**` or a table cell `| 0.55 |`
    quoted = set(re.findall(r"(?<![\d.])\d+\.\d\d(?![\d])", _performance_section()))
    assert len(quoted) >= 6, quoted
    missing = {n for n in quoted if not re.search(rf"(?:×|\*\*){re.escape(n)}(?![\d])|\| {re.escape(n)} \|", RESULTS)}
    assert not missing, f"README quotes numbers benchmarks/RESULTS.md does not have: {sorted(missing)}"


# --- docs/architecture.md ----------------------------------------------------------------------

# Layers, top to bottom (docs/architecture.md): a module may import only from its own unit or lower.
LAYERS = (("__main__",), ("cli",), ("ui", "serve", "quantize"), ("chat",), ("engine",), ("quant", "media", "settings", "setting_flags", "demo"),
          ("files", "threads", "native_stderr", "proxy_env"), ("errors",), ("numbers",))  # fmt: skip


def modules() -> list[Path]:
    """Python modules and the C++ sources built from the package (engine/csrc)."""
    sources = [p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".cpp", ".h")]
    return sorted(p for p in sources if p.name != "__init__.py")


def test_every_module_has_a_row_in_the_module_map_and_every_row_a_module():
    section = ARCHITECTURE[ARCHITECTURE.index("## Module map") :]
    rows = [re.fullmatch(r"\| (.+?) \| (.+) \|", line).groups() for line in section.splitlines() if line.startswith("| `")]
    # a module is named in the first column of one row (a mention in another row's job is not its row)
    named = [rel for modules_cell, _ in rows for rel in re.findall(r"`([\w/]+\.(?:py|cpp|h))`", modules_cell)]
    assert len(named) == len(set(named)), f"docs/architecture.md has two rows for {sorted({n for n in named if named.count(n) > 1})}"
    assert all(job.strip() for _, job in rows)
    for path in modules():
        rel = path.relative_to(PACKAGE).as_posix()
        assert rel in named, f"docs/architecture.md has no row for {rel}"
    for rel in named:
        assert (PACKAGE / rel).is_file(), f"docs/architecture.md has a row for {rel}, which does not exist"
    scripts = section[section.index("Scripts:") :].split("\n\n")[0]
    named = set(re.findall(r"`([\w.]+\.(?:py|sh))`", scripts))
    assert named == {p.name for p in (REPO / "scripts").iterdir() if p.suffix in (".py", ".sh")}


def test_every_unit_of_the_package_has_a_layer():
    # threads.py came after the layers were written down: it had none, so no import of it was checked
    units = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    layered = {unit for units in LAYERS for unit in units}
    assert units == layered, f"without a layer: {sorted(units - layered)}; no longer there: {sorted(layered - units)}"


def test_a_package_docstring_that_lists_its_modules_lists_each_once():
    # serve's listed every module but connections.py, added after the list was written
    checked = 0
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        if "Modules:" not in doc:
            continue
        listed = re.findall(r"`(\w+)`", doc[doc.index("Modules:") :])
        there = sorted(p.stem for p in init.parent.glob("*.py") if p.name != "__init__.py")
        assert sorted(listed) == there, f"{init.relative_to(REPO)}: lists {sorted(listed)}, holds {there}"
        checked += 1
    assert checked


def _unit(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_imports_follow_the_documented_layers():
    rank = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    layers_line = ARCHITECTURE[ARCHITECTURE.index("Layers, top to bottom") :].split("\n\n")[0]
    assert re.findall(r"`(\w+)`", layers_line) == [u for units in LAYERS for u in units]
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        unit = rel.parts[0]
        package = ["internvl_chat", *rel.parts[:-1]]  # what a relative import starts from
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                targets = [".".join(base + [node.module])] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                other = _unit(target) if target.startswith("internvl_chat.") else None
                if other and other != unit and other in rank and unit in rank and rank[other] <= rank[unit]:
                    wrong.append(f"{rel.as_posix()} imports {target}")
    assert not wrong, wrong


def _defined_names(path: Path) -> dict[str, set[str]]:
    """A module's top-level names → for a class, its attributes (methods, class fields, `self.x = …`)."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            attrs = set()
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    attrs.add(sub.name)
                elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                    attrs.add(sub.target.id)
                elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    attrs.add(sub.attr)
                elif isinstance(sub, ast.Assign):
                    attrs |= {target.id for target in sub.targets if isinstance(target, ast.Name)}
            names[node.name] = attrs
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update({target.id: set() for target in targets if isinstance(target, ast.Name)})
    return names


def test_the_code_names_architecture_md_gives_exist():
    """`chat.session.Session.ask`, `engine.cpu_step`, `Session.continue_with`: each module, name and attribute."""
    defined = {path: _defined_names(path) for path in PACKAGE.rglob("*.py")}
    classes: dict[str, set[str]] = {}
    for names in defined.values():
        for name, attrs in names.items():
            classes.setdefault(name, set()).update(attrs)
    units = "|".join({p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in defined})
    wrong, checked = [], 0
    for ref in re.findall(rf"(?<![\w./])(?:{units})(?:\.\w+)+", ARCHITECTURE):
        parts = ref.split(".")
        if parts[-1] in ("py", "cpp", "h", "md", "toml"):  # a file name (`cli.py`): the module map test checks those
            continue
        for cut in range(len(parts), 0, -1):  # the longest prefix that is a module or package
            base = PACKAGE.joinpath(*parts[:cut])
            module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
            if module.is_file():
                break
        else:
            wrong.append(ref)
            continue
        rest = parts[cut:]
        if rest and (rest[0] not in defined[module] or (len(rest) > 1 and rest[1] not in defined[module][rest[0]])):
            wrong.append(ref)
        checked += 1
    for cls, attr in re.findall(r"(?<![\w.])([A-Z]\w*[a-z]\w*)\.([a-z_]\w*)", ARCHITECTURE):
        if cls in classes and attr not in ("py", "md"):
            if attr not in classes[cls]:
                wrong.append(f"{cls}.{attr}")
            checked += 1
    assert checked >= 20
    assert not wrong, f"docs/architecture.md names code that does not exist: {wrong}"


def test_the_repository_files_the_docs_name_exist():
    # the module map test covers internvl_chat's modules; README and the architecture also name tests,
    # scripts, benchmarks and configs, which a rename or removal would leave behind
    checked = 0
    for name, text in (("README.md", README), ("docs/architecture.md", ARCHITECTURE), ("benchmarks/README.md", BENCH_README)):
        paths = set(re.findall(r"(?<![\w./~-])((?:tests|scripts|benchmarks|examples|docs|configs|internvl_chat)/[\w./-]*[\w/])", text))
        tests = set(re.findall(r"(?<![\w/])(test_\w+\.py)", text))
        missing = [p for p in paths if not (REPO / p).exists()] + [t for t in tests if not (REPO / "tests" / t).is_file()]
        assert not missing, f"{name} names files that do not exist: {sorted(missing)}"
        checked += len(paths) + len(tests)
    assert checked >= 20


def test_the_exit_statuses_help_gives_include_each_signal_that_ends_the_repl():
    # --help's epilog listed 143/129 but not 131, SIGQUIT's, which README gives for the REPL
    from internvl_chat.ui.repl import EXIT_SIGNALS

    epilog = " ".join(cli.build_parser().epilog.split())
    for signum in EXIT_SIGNALS:
        status = 128 + int(signum)
        assert re.search(rf"(?<!\d){status}(?!\d)", epilog), f"--help gives no exit status {status} ({signum.name})"
        assert re.search(rf"(?<!\d){status}(?!\d)", README), f"README gives no exit status {status} ({signum.name})"
