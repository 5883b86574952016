"""Every shipped recipe parses: `sinkfree fit --config RECIPE --print_config` resolves it (classes, options, types)
without instantiating anything, so a GPU recipe is checked on the CPU too."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sinkfree.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_found():
    assert len(RECIPES) >= 10


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_resolves(recipe: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(recipe.read_text())
    # the recipe's own model options come through unchanged
    for key, value in source["model"]["init_args"].items():
        if key != "arch":
            assert resolved["model"]["init_args"][key] == value, key
    for key, value in source["model"]["init_args"].get("arch", {}).items():
        got = resolved["model"]["init_args"]["arch"][key]
        assert got == value or (isinstance(value, list) and list(got) == value), key
