"""The README is the user documentation: its install block and its reference tables are checked here."""

from __future__ import annotations

import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "docs"))

import api_reference  # noqa: E402


def _readme() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def test_the_reference_tables_are_what_the_code_generates():
    readme = _readme()
    assert api_reference.render(readme) == readme, (
        "README.md's TrainingModule/DataModule reference differs from the code: run `python docs/api_reference.py --write`"
    )


def test_every_public_hook_and_attribute_is_in_the_reference():
    from accel_trainer import DataModule, TrainingModule

    module = TrainingModule()
    readme = _readme()
    for cls, names in ((TrainingModule, list(vars(TrainingModule))), (DataModule, list(vars(DataModule)))):
        for name in names:
            public = not name.startswith("_")
            if public and (callable(getattr(cls, name, None)) or isinstance(vars(cls).get(name), property)):
                assert f"`{name}(" in readme or f"`self.{name}`" in readme, f"{cls.__name__}.{name} missing from README"
    for name in api_reference.INSTANCE_ATTRIBUTES["TrainingModule"]:
        assert hasattr(module, name), f"README documents TrainingModule().{name}, which does not exist"


def test_the_first_install_block_works_with_and_without_a_gpu():
    first = re.search(r"```bash\n(.*?)```", _readme(), re.S).group(1)
    lines = [line for line in first.splitlines() if line.strip()]
    # torch first (the CPU build, without any external index: only package registries are reachable),
    # then the project, then the headline run; each line says when it applies
    assert lines[0].startswith("pip install torch==") and "--index-url" not in first
    assert "WITHOUT a GPU" in lines[0] and "skip" in lines[1] and "WITH a GPU" in lines[1]
    assert lines[1].startswith("pip install -e .")
    assert lines[2] == "accel-trainer fit --config configs/digits_gan.yaml"


def test_the_layout_table_lists_every_module_once():
    """A newcomer finds every module of the package, with its one job, in the README's Layout table."""
    text = _readme()
    layout = text[text.index("## Layout") :]
    listed = re.findall(r"^\| `accel_trainer/([^`]+)` \|", layout, re.M)
    assert len(listed) == len(set(listed)), "a module is listed twice"
    package = os.path.join(REPO, "accel_trainer")
    names = os.listdir(package)
    expected = {n for n in names if n.endswith(".py")} | {
        n + "/" for n in names if os.path.isfile(os.path.join(package, n, "__init__.py"))
    }
    assert set(listed) == expected, (sorted(expected - set(listed)), sorted(set(listed) - expected))
