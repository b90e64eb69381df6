"""The container images, unbuilt here (no Docker daemon): the Dockerfile parsed by Docker's
own parser (the `dockerfile` package wraps it) and checked: a `cuda` and an `ascend` target
from pinned base images, every Python install through install.sh (the script CI runs, which
pins torch), a non-root user, `birkhoff` as the entrypoint, `birkhoff doctor` as the health
check; install.sh still pins torch, the npu extra pins torch_npu to torch's minor version,
and the build context leaves history and run output out."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import dockerfile

ROOT = Path(__file__).parent.parent
EXTRAS = {"cuda": "cuda", "ascend": "npu"}


def stages() -> dict[str, list]:
    """The Dockerfile's commands per stage, keyed by the stage's name."""
    found: dict[str, list] = {}
    current = None
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd == "FROM":
            _image, as_, current = command.value
            assert as_.upper() == "AS"
            found[current] = [command]
        else:
            assert current is not None, f"{command.original}: before any FROM"
            found[current].append(command)
    return found


def test_both_targets_exist_from_pinned_images():
    built = stages()
    assert set(built) == set(EXTRAS)
    for commands in built.values():
        image = commands[0].value[0]
        tag = image.partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), image


def test_every_install_goes_through_install_sh_as_a_non_root_user():
    for name, commands in stages().items():
        runs = [c for c in commands if c.cmd == "RUN"]
        installs = [c for c in runs if "install.sh" in c.value[0]]
        assert [shlex.split(c.value[0]) for c in installs] == [["bash", "install.sh", EXTRAS[name]]]
        for run in runs:  # nothing else installs Python packages
            assert not re.search(r"\bpip3? install|python3? -m pip", run.value[0]), run.original
        users = [c for c in commands if c.cmd == "USER"]
        assert users and users[-1].value[0] not in ("root", "0")
        assert commands.index(users[-1]) < commands.index(installs[0])  # installs as the user


def test_entrypoint_is_birkhoff_and_the_health_check_is_doctor():
    for commands in stages().values():
        (entrypoint,) = [c for c in commands if c.cmd == "ENTRYPOINT"]
        assert entrypoint.json and entrypoint.value[-1] == "birkhoff"
        (health,) = [c for c in commands if c.cmd == "HEALTHCHECK"]
        assert health.json and health.value[0] == "CMD"
        assert health.value[-6:-4] == ("birkhoff", "doctor"), health.value
        for wrapper in entrypoint.value[:-1]:  # a wrapper it runs through is in the image
            assert wrapper.startswith("/opt/birkhoff/")
            script = ROOT / wrapper.removeprefix("/opt/birkhoff/")
            assert script.is_file() and script.stat().st_mode & 0o111
            subprocess.run(["bash", "-n", str(script)], check=True)


def test_pins_the_images_rely_on():
    install = (ROOT / "install.sh").read_text()
    assert '"torch==2.13.0"' in install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["npu"] == ["torch-npu>=2.13.0,<2.14"]
    assert any(dep.startswith("triton") for dep in extras["cuda"])


def test_the_build_context_leaves_history_and_run_output_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", "outputs", "multirun", "wandb", "**/__pycache__"} <= ignored
