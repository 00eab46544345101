"""Flags that give settings, each declared once, on its parser, with the setting it gives.

`add_setting_flag` and `add_setting_switch` are `add_argument` that also mark the action with its
dotted setting; `SettingFlags` reads them back, so the overrides a parse gives (load_settings's
`overrides`), the flag a bad value's message names (its `flags`) and the flag `/set` tells the user
to restart with all come from the parser: a new flag is one call, not one line in three tables.
Only argparse is imported here: the chat app and `serve` build their parsers at every start.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any


def add_setting_flag(p: argparse.ArgumentParser, *names: str, setting: str, **kwargs: Any) -> argparse.Action:
    """`p.add_argument` for a flag whose value is the setting's (`--dtype T` gives model.dtype)."""
    action = p.add_argument(*names, **kwargs)
    action.setting = setting  # type: ignore[attr-defined]
    return action


def add_setting_switch(p: argparse.ArgumentParser, name: str, *, setting: str, value: bool, **kwargs: Any) -> argparse.Action:
    """A switch that, given, sets the setting to `value` (`--no-stats`: ui.stats False); not given, leaves it."""
    action = add_setting_flag(p, name, setting=setting, action="store_true", **kwargs)
    action.switch_value = value  # type: ignore[attr-defined]
    return action


def add_engine_flags(p: argparse.ArgumentParser, max_context_help: str) -> None:
    """The flags that choose how the model runs, alike in the chat app and `serve`."""
    add_setting_flag(p, "--device", setting="model.device", metavar="DEV",
                     help="auto | cpu | cuda | cuda:N (default auto: CUDA if present)")
    add_setting_flag(p, "--dtype", setting="model.dtype", metavar="T",
                     help="auto | float32 | bfloat16 | float16 (default auto: bf16 on CUDA; on a CPU, bf16 for decoders "
                     "of 256 MiB or more where the CPU has native bf16 or AVX2 and FMA, else fp32)")
    add_setting_flag(p, "--max-context", setting="model.max_context", type=int, metavar="N",
                     help=f"{max_context_help} (default 8192)")
    add_setting_flag(p, "--int4-backend", setting="model.int4_backend", metavar="B",
                     help="auto | torch | dequant | triton | gemlite: kernels for 4-bit weights (default auto: torch "
                     "where it runs, else dequant)")
    add_setting_flag(p, "--compile", setting="model.compile", metavar="MODE",
                     help="auto | on | off: a fast decode step (our C++ on CPUs with AVX2 and FMA, else torch.compile), "
                     "built on first use, then cached (default auto: decoders of 256 MiB or more on a CPU)")


@dataclass(frozen=True)
class SettingFlag:
    setting: str  # the dotted key: model.dtype
    flag: str  # as the user types it: --dtype
    dest: str  # its attribute on the parsed namespace
    metavar: str | None  # None for a switch
    switch_value: Any = None  # what a switch, given, sets the setting to

    @property
    def is_switch(self) -> bool:
        return self.metavar is None

    def value(self, args: argparse.Namespace) -> Any:
        """The setting's value from this flag, None when it was not given."""
        given = getattr(args, self.dest)
        if self.is_switch:
            return self.switch_value if given else None
        return given

    @property
    def usage(self) -> str:
        """How it is typed: `--dtype T`, or a switch alone (`--no-history`)."""
        return self.flag if self.is_switch else f"{self.flag} {self.metavar}"


class SettingFlags:
    """A parser's flags that give settings, in --help order."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.flags = tuple(_setting_flag(action) for action in parser._actions if hasattr(action, "setting"))

    def __iter__(self):
        return iter(self.flags)

    def overrides(self, args: argparse.Namespace) -> dict[str, Any]:
        """setting → the value its flag gave (None: not given), load_settings's `overrides`."""
        return {flag.setting: flag.value(args) for flag in self.flags}

    def names(self) -> dict[str, str]:
        """setting → the flag that gives it, for flags that take a value: a bad one's message names the
        flag as typed ("--dtype: must be …", not "model.dtype"); a switch's value cannot be wrong."""
        return {flag.setting: flag.flag for flag in self.flags if not flag.is_switch}

    def given(self, args: argparse.Namespace, section: str) -> list[str]:
        """The flags typed for settings in `section` ("model."), in --help order."""
        return [flag.flag for flag in self.flags if flag.setting.startswith(section) and flag.value(args) is not None]


def _setting_flag(action: argparse.Action) -> SettingFlag:
    switch = action.nargs == 0
    metavar = None if switch else action.metavar or action.dest.upper()  # argparse's own default for --help
    return SettingFlag(action.setting, action.option_strings[-1], action.dest, metavar,  # type: ignore[attr-defined]
                       getattr(action, "switch_value", None))
