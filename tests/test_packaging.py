"""Packaging and container: what can be checked without a Docker engine.

The Dockerfile is kept buildable by construction: the pins it installs are the tested ones and satisfy
pyproject's bounds, every file it copies exists, its entrypoint is the console script, it runs as a
non-root user and has two stages.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _requirements() -> dict[str, Requirement]:
    deps = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        deps += extra
    return {Requirement(d).name.lower().replace("_", "-"): Requirement(d) for d in deps}


def test_constraints_satisfy_pyproject_bounds():
    reqs, pins = _requirements(), _pins()
    shared = set(reqs) & set(pins)
    assert {"transformers", "peft", "trl", "bitsandbytes", "datasets", "typer", "pydantic"} <= shared
    for name in shared:
        assert Version(pins[name]) in reqs[name].specifier, f"{name}=={pins[name]} outside {reqs[name].specifier}"


def test_installed_versions_are_the_pinned_ones():
    from importlib.metadata import PackageNotFoundError, version

    checked = 0
    for name, pinned in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:  # an extra this environment did not install (e.g. fast on CPU)
            continue
        assert installed == pinned, f"tests ran with {name} {installed}, constraints.txt pins {pinned}"
        checked += 1
    assert checked >= 12


def test_torch_pin_is_the_same_everywhere():
    makefile = (ROOT / "Makefile").read_text()
    make_pin = re.search(r"TORCH\s*\?=\s*torch==([\d.]+)", makefile).group(1)
    docker_pin = re.search(r"ARG TORCH_VERSION=([\d.]+)", DOCKERFILE).group(1)
    assert make_pin == docker_pin
    assert Version(docker_pin) in Requirement(next(d for d in PYPROJECT["project"]["dependencies"]
                                                   if d.startswith("torch"))).specifier


def test_dockerfile_copies_existing_files_and_runs_the_console_script():
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            *sources, _dest = line.split()[1:]
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert 'ENTRYPOINT ["lorakit"]' in DOCKERFILE
    assert PYPROJECT["project"]["scripts"]["lorakit"] == "lorakit.cli:main"
    assert len(re.findall(r"^FROM ", DOCKERFILE, re.M)) == 2, "multi-stage build"
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "VOLUME" in DOCKERFILE and "HF_HOME=/cache" in DOCKERFILE
    assert "-c constraints.txt" in DOCKERFILE


def test_image_can_launch_on_several_gpus():
    """`lorakit train --gpus N` runs `python -m accelerate.commands.launch`: accelerate is pinned and
    installed with the package, and the launcher configs are in the image next to the environment."""
    from lorakit.runtime.launch import launch_command

    assert "accelerate" in _pins()
    assert any(Requirement(d).name == "accelerate" for d in PYPROJECT["project"]["dependencies"])
    assert launch_command(2, ["train", "r.yaml"])[1:3] == ["-m", "accelerate.commands.launch"]
    assert "COPY configs /opt/lorakit/configs" in DOCKERFILE
    for ref in re.findall(r"/opt/lorakit/(configs/[\w.-]+\.yaml)", DOCKERFILE):
        assert (ROOT / ref).is_file(), ref
    assert "CI=true" in DOCKERFILE  # plain log lines in containers


def test_wheel_ships_the_recipes():
    force = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force == {"recipes": "lorakit/_recipes"}
    assert any((ROOT / "recipes").glob("*.yaml"))


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci
    assert "make quickstart" in readme
