"""The pages a newcomer reads stay true: the recipe reference is the schema, README's recipe is a valid recipe, its
links lead somewhere, and it stays short enough to read in minutes."""

from __future__ import annotations

import re
from pathlib import Path

from compiler.recipe import load_recipe_text
from compiler.recipe_docs import is_builtin_pass, recipe_markdown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250


def test_recipe_reference_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert committed == recipe_markdown(), (
        "docs/recipes.md differs from the schema; regenerate it: bertpress schema --markdown > docs/recipes.md")


def test_recipe_reference_documents_every_pass_option():
    page = recipe_markdown()
    from compiler.pass_registry import declared_passes

    for name, declared in declared_passes().items():
        if not is_builtin_pass(declared):
            continue  # a plugin registered by another test
        assert f"### `{name}`" in page
        for option in declared.Config.model_fields:
            if option != "on_fail":
                assert f"| `{option}` |" in page, f"{name}.{option} is missing from docs/recipes.md"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; the depth belongs in docs/"


def test_readme_recipe_is_a_valid_recipe():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md shows no recipe"
    for block in blocks:
        recipe = load_recipe_text(block, file="README.md", base_dir=ROOT)
        assert recipe.steps


def test_readme_links_lead_to_files():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if not t.startswith("http")]
    assert targets
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_docs_links_lead_to_files():
    missing = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not target.startswith("http") and not (page.parent / target).exists():
                missing.append(f"{page.name} -> {target}")
    assert not missing, f"links to files that do not exist: {missing}"
