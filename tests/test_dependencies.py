"""pyproject.toml states ranges (an install keeps a torch already in the environment, a CUDA build say);
constraints.txt pins the exact versions make and CI install, each inside its range."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [item for group in project["optional-dependencies"].values() for item in group]
    return [Requirement(item) for item in project["dependencies"] + extras]


def pinned() -> dict[str, Version]:
    lines = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pairs = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(name): Version(version) for name, version in pairs}


def test_dependencies_are_ranges_and_the_pinned_versions_lie_inside_them():
    pins = pinned()
    for requirement in requirements():
        assert not any(spec.operator in ("==", "===") for spec in requirement.specifier), requirement
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} has no exact version in constraints.txt"
        assert pins[name] in requirement.specifier, f"constraints.txt pins {name}=={pins[name]} outside {requirement}"


def test_the_torch_range_keeps_any_torch_since_muon():
    torch = next(r for r in requirements() if r.name == "torch")
    assert all(Version(v) in torch.specifier for v in ("2.9.0", "2.10.1", "2.12.0", "2.13.0"))
    assert Version("2.8.0") not in torch.specifier  # no torch.optim.Muon
