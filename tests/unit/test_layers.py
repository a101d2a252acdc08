"""Every module of the package sits in a layer of the import contract (pyproject.toml,
checked by `lint-imports` in scripts/test): a new module cannot escape the layering."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_top_level_module_is_in_a_layer() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    named = {name.strip().removeprefix("fabricai_trio.")
             for layer in layers for name in layer.split("|")}
    package = ROOT / "fabricai_trio"
    modules = {p.stem for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    packages = {p.name for p in package.iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    assert modules | packages <= named, sorted((modules | packages) - named)
