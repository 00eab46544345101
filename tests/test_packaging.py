"""The package as `pip install .` ships it: the wheel built from the tracked files, installed away
from the checkout, runs the app without anything from the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import warnings
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


def _tracked_files() -> list[str]:
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60)
    if listed.returncode != 0:  # e.g. a clone owned by another user: "detected dubious ownership"
        pytest.skip(f"git cannot list this checkout's files: {listed.stderr.decode(errors='replace').strip()[:200]}")
    return [name for name in listed.stdout.decode().split("\0") if name and (REPO / name).is_file()]


def _needs_build_backend() -> None:
    """Skip where this environment lacks what pyproject's build-system requires: the offline build
    (and the configuration check) can only use the environment's own setuptools, which `pip install .`
    would fetch new. A venv on Python 3.11 has ensurepip's setuptools 65.5 unless a dependency pulls in
    a newer one (torch 2.13 does; an older torch, kept by `make TORCH_SPEC=...`, need not)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    for requirement in map(Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]):
        try:
            have = version(requirement.name)
        except PackageNotFoundError:
            pytest.skip(f"{requirement.name} is not installed here (the build needs {requirement})")
        if not requirement.specifier.contains(have, prereleases=True):
            pytest.skip(f"{requirement.name} {have} is installed here; the build needs {requirement}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the tracked files (offline: this environment's setuptools;
    the copy keeps build/ and *.egg-info out of the checkout)."""
    _needs_build_backend()
    src = tmp_path_factory.mktemp("src")
    for name in _tracked_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                           capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (built,) = out.glob("internvl_chat-*.whl")
    return built


def test_pyproject_uses_no_setuptools_configuration_that_is_deprecated():
    # `license = { text = "MIT" }` warned on every build that setuptools stops taking it on 2027-02-18;
    # `pip install .` builds with the newest setuptools, so from then on the install would fail
    _needs_build_backend()
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    from setuptools.warnings import SetuptoolsDeprecationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), REPO / "pyproject.toml")
    deprecated = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, SetuptoolsDeprecationWarning)]
    assert not deprecated, deprecated


def test_the_wheel_holds_every_tracked_file_of_the_package(wheel):
    # the demo model, default.toml and the C++ sources are read from the package's own folder at run time
    with zipfile.ZipFile(wheel) as whl:
        shipped = set(whl.namelist())
    package = {name for name in _tracked_files() if name.startswith("internvl_chat/")}
    assert package - shipped == set()
    for needed in ("internvl_chat/demo_model/config.json", "internvl_chat/demo_model/model.safetensors",
                   "internvl_chat/demo_model/tokenizer.json", "internvl_chat/configs/default.toml",
                   "internvl_chat/engine/csrc/decode_step.cpp", "internvl_chat/engine/csrc/gemv_avx2.h"):  # fmt: skip
        assert needed in shipped, needed
    assert {n.split("/")[0] for n in shipped} == {"internvl_chat", wheel.name.split("-py3")[0] + ".dist-info"}


def test_the_installed_wheel_answers_from_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                              "--disable-pip-version-check", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    package = target / "internvl_chat"
    before = {p for p in package.rglob("*") if "__pycache__" not in p.parts}

    work = tmp_path / "work"
    work.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 40, 40)).save(work / "red.png")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "INTERNVL_CHAT_CONFIG": os.devnull, "TERM": "dumb",
           # the dependencies from this interpreter's site-packages; the install comes first on sys.path
           # (ahead of an editable install's finder, which site-packages' .pth appends to sys.meta_path)
           "PYTHONPATH": str(target)}  # fmt: skip
    where = subprocess.run([sys.executable, "-c", "import internvl_chat; print(internvl_chat.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert Path(where.stdout.strip()).parent == package, where.stdout + where.stderr

    run = subprocess.run([sys.executable, "-m", "internvl_chat", "--image", "red.png", "-p", "What colour is the shape?",
                          "--max-new-tokens", "4", "--compile", "off"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), run.stderr
    after = {p for p in package.rglob("*") if "__pycache__" not in p.parts}
    assert after == before  # nothing written into the package's folder (read-only when installed system-wide)


def test_an_environment_whose_setuptools_cannot_build_it_skips_rather_than_fails(tmp_path):
    # `python -m venv` on Python 3.11 installs ensurepip's setuptools 65.5, which cannot read
    # `license = "MIT"`; `make install` replaces it only because torch 2.13 requires setuptools>=77
    # (an older torch kept by TORCH_SPEC does not). `pip install .` fetches the build's own
    # setuptools; the offline build here can only use the environment's, so there it has nothing to test.
    import sysconfig

    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=TIMEOUT_S)
    if made.returncode != 0:
        pytest.skip(f"no venv with ensurepip here: {made.stderr.strip()[-200:]}")
    python = str(venv / "bin" / "python")
    ask = "import sysconfig, importlib.metadata as m; print(sysconfig.get_paths()['purelib']); print(m.version('setuptools'))"
    inner = subprocess.run([python, "-c", ask], capture_output=True, text=True, timeout=TIMEOUT_S)
    if inner.returncode != 0 or int(inner.stdout.split()[1].split(".")[0]) >= 77:
        pytest.skip("this Python's venv has no setuptools older than the build needs")
    # this environment's packages (pytest, torch, ...) after the venv's own
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(inner.stdout.split()[0]) / "zz_outer.pth").write_text("".join(f"{p}\n" for p in outer))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_packaging.py",
                          "-k", "not cannot_build"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "3 skipped" in run.stdout, run.stdout[-3000:]


def test_a_checkout_git_cannot_read_skips_rather_than_fails(tmp_path, monkeypatch):
    # CI that runs the suite as another user than the clone's owner: git refuses the repository
    # ("detected dubious ownership", exit 128), as it refuses a .git that is no repository
    (tmp_path / ".git").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    if shutil.which("git") is None:
        pytest.skip("no git")
    with pytest.raises(pytest.skip.Exception, match="git cannot list"):
        _tracked_files()
