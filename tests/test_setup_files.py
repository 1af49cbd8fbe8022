"""The two ways to set up (make + pyproject.toml, conda + environment.yml) install the same packages."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_every_package_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    listed = {_name(line.strip()[2:]) for line in (ROOT / "environment.yml").read_text().splitlines()
              if line.strip().startswith("- ") and not line.strip().startswith("- -e")}
    assert wanted - {"torch"} <= listed, f"missing from environment.yml: {sorted(wanted - listed)}"
    assert "torch" in listed


def test_torch_is_pinned_to_the_same_version_in_make_and_conda():
    make = re.search(r'"torch==([\d.]+)"', (ROOT / "Makefile").read_text()).group(1)
    conda = re.search(r"torch==([\d.]+)", (ROOT / "environment.yml").read_text()).group(1)
    assert make == conda
