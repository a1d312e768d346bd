"""deploy/docker/Dockerfile, checked statically (no Docker engine here): parsed with Docker's own
parser (the `dockerfile` package wraps BuildKit's), then checked against pyproject.toml and the
Makefile: the Ray/Python base it pins, torch before pdserve, every copied path, the command."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib

import dockerfile
import pytest

from manifests import DOCKERFILE, REPO

IGNORE_FILE = DOCKERFILE.with_name("Dockerfile.dockerignore")


@pytest.fixture(scope="module")
def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for ins in instructions:
        if ins.cmd == "ARG" and "=" in ins.value[0]:
            name, value = ins.value[0].split("=", 1)
            defaults[name] = value
    return defaults


def expand(text: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), text)


def runs(instructions) -> list[tuple[int, str]]:
    return [(i, ins.value[0]) for i, ins in enumerate(instructions) if ins.cmd == "RUN"]


def test_base_is_the_ray_image_pyproject_pins(instructions, pyproject):
    first = next(ins for ins in instructions if ins.cmd != "ARG")
    assert first.cmd == "FROM"
    assert sum(ins.cmd == "FROM" for ins in instructions) == 1
    image = expand(first.value[0], arg_defaults(instructions))
    repository, tag = image.split(":")
    ray_pin = next(re.search(r"==([\d.]+)", d).group(1) for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    assert repository == "rayproject/ray"
    assert tag.startswith(f"{ray_pin}-py311")
    assert pyproject["project"]["requires-python"] == ">=3.11"


def test_torch_is_installed_pinned_before_pdserve(instructions):
    defaults = arg_defaults(instructions)
    run_steps = [(i, expand(text, defaults)) for i, text in runs(instructions)]
    torch_at = [i for i, text in run_steps if re.search(r"pip install .*torch==[\d.]+", text)]
    pdserve_at = [i for i, text in run_steps if re.search(r"pip install (--\S+ )*\.( |$)", text)]
    assert len(torch_at) == 1 and len(pdserve_at) == 1
    assert torch_at[0] < pdserve_at[0]
    makefile_pin = re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    assert f"torch=={makefile_pin}" in dict(run_steps)[torch_at[0]]


def test_copies_exist_and_cover_the_package(instructions, pyproject):
    copied = []
    for ins in instructions:
        if ins.cmd == "COPY":
            assert not any(f.startswith("--from") for f in ins.flags), "no multi-stage copies expected"
            copied += list(ins.value[:-1])
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= set(copied)
    # The install step runs where pyproject.toml was copied: COPY into ./ after a WORKDIR, and no
    # WORKDIR between that COPY and `pip install .`.
    copy_at = next(i for i, ins in enumerate(instructions) if ins.cmd == "COPY" and "pyproject.toml" in ins.value)
    install_at = next(i for i, text in runs(instructions) if re.search(r"pip install (--\S+ )*\.( |$)", text))
    assert any(ins.cmd == "WORKDIR" for ins in instructions[:copy_at])
    assert instructions[copy_at].value[-1] == "./"
    assert not any(ins.cmd == "WORKDIR" for ins in instructions[copy_at:install_at])


def test_ignore_file_keeps_every_copied_path(instructions):
    patterns = [line.strip() for line in IGNORE_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for ins in instructions:
        if ins.cmd != "COPY":
            continue
        for source in ins.value[:-1]:
            for pattern in patterns:
                assert not fnmatch.fnmatch(source, pattern.removeprefix("**/")), f"{pattern} ignores COPY {source}"
    assert ".venv" in " ".join(patterns) and ".git" in " ".join(patterns)


def test_command_is_the_pdserve_entry_point(instructions, pyproject):
    cmds = [ins for ins in instructions if ins.cmd in ("CMD", "ENTRYPOINT")]
    assert [c.cmd for c in cmds] == ["CMD"]
    (cmd,) = cmds
    assert cmd.json, "exec form, so signals reach pdserve"
    assert cmd.value[0] in pyproject["project"]["scripts"]
    assert list(cmd.value[1:3]) == ["up", "--host"]


def test_exposes_the_default_ports(instructions):
    from cluster.config import ServerConfig

    exposed = {int(p) for ins in instructions if ins.cmd == "EXPOSE" for p in ins.value}
    server = ServerConfig()
    assert {server.port, server.admin_port, 6379} <= exposed


def test_etcd_server_is_optional_and_from_the_distribution(instructions):
    defaults = arg_defaults(instructions)
    assert defaults.get("INSTALL_ETCD") in ("true", "false")
    (etcd_step,) = [text for _, text in runs(instructions) if "etcd" in text]
    assert '[ "$INSTALL_ETCD" = "true" ]' in etcd_step
    assert "etcd-server" in shlex.split(etcd_step.replace(";", " ").replace("&&", " "))


def test_compile_caches_live_in_one_folder_a_volume_can_keep(instructions):
    """Both caches under one folder the build makes (as the image's user, so a named volume mounted
    there starts with that owner), named in README's docker run line."""
    env = {}
    for ins in instructions:
        if ins.cmd == "ENV":
            env.update(zip(ins.value[::2], ins.value[1::2]))
    triton, inductor = env["TRITON_CACHE_DIR"], env["TORCHINDUCTOR_CACHE_DIR"]
    folder = triton.rsplit("/", 1)[0]
    assert inductor.rsplit("/", 1)[0] == folder and triton != inductor
    made = " ".join(text for _, text in runs(instructions) if "mkdir" in text)
    assert triton in made and inductor in made
    assert f"-v pdserve-cache:{folder}" in (REPO / "README.md").read_text()
