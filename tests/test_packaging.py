import tomllib
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        "birkhoff"
        + (
            "." + ".".join(p.parent.relative_to(ROOT / "src/birkhoff").parts)
            if p.parent != ROOT / "src/birkhoff"
            else ""
        )
        for p in (ROOT / "src/birkhoff").rglob("__init__.py")
    }
    assert on_disk | {"birkhoff.recipes"} == listed


def test_recipes_ship_inside_the_package():
    recipes = files("birkhoff.recipes")
    assert (recipes / "config.yaml").is_file()
    for group in ("model", "data", "optim", "train", "parallel", "backend", "logging"):
        assert any(entry.name.endswith(".yaml") for entry in (recipes / group).iterdir()), group


def test_dependencies_have_lower_bounds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    assert all(">=" in requirement for requirement in requirements), requirements
    assert {"cuda", "npu", "dev"} <= set(project["optional-dependencies"])
