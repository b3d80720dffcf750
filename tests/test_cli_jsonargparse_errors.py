"""The CLI's only reader of jsonargparse's error text, against the errors the installed jsonargparse raises.

jsonargparse has no structured errors: :mod:`accel_trainer.cli.jsonargparse_errors` reads the
key, value and class out of its English messages. These tests make the real parsers of
``accel-trainer`` fail in every way the CLI explains and check each field read, so a change of
wording in a jsonargparse release fails here, by name, rather than as a vaguer message to users.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from jsonargparse import ArgumentError, ArgumentParser

from accel_trainer.cli.jsonargparse_errors import ParseProblem, read_group_error, read_parse_error
from accel_trainer.cli.parser import build_parser

CLASSIFIER = "accel_trainer.examples.digits.DigitsClassifier"
BASE = ["--module", CLASSIFIER]


def jsonargparse_error(argv: list[str]) -> str:
    root, _ = build_parser()
    with warnings.catch_warnings(), pytest.raises(ArgumentError) as error:
        warnings.simplefilter("ignore")
        root.parse_args(["fit", *argv])
    return str(error.value)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--trainer.max_epoch", "3"], ParseProblem("unknown_key", "trainer.max_epoch", "3")),
        (["--foo=1"], ParseProblem("unknown_key", "foo", "1")),
        (["--trainer.max_epochs", "abc"], ParseProblem("bad_value", "trainer.max_epochs", "abc")),
        (["--module.init_args.lr=fast"], ParseProblem("bad_init_arg", "module", "fast", CLASSIFIER, "lr",
                                                      'Parser key "lr":')),
        (["--module.init_args.lrr=0.1"], ParseProblem("unknown_init_arg", "module", "0.1", CLASSIFIER, "lrr",
                                                      "Option 'lrr' is not accepted")),
        (["--optimizer=torch.optim.SGD", "--optimizer.init_args.lr=x"],  # a blank line inside the class's entry
         ParseProblem("bad_init_arg", "optimizer", "x", "torch.optim.SGD", "lr", 'Parser key "lr":')),
        (["--trainer.callbacks+=accel_trainer.callbacks.EarlyStopping", "--trainer.callbacks.patience=x"],
         ParseProblem("bad_init_arg", "trainer.callbacks", "x", "accel_trainer.callbacks.EarlyStopping", "patience",
                      'Parser key "patience":')),
        (["--module.class_path=accel_trainer.examples.digits.DigitsClasifier"],
         ParseProblem("bad_class", "module", class_path="accel_trainer.examples.digits.DigitsClasifier",
                      reason="module 'accel_trainer.examples.digits' has no attribute 'DigitsClasifier'")),
        (["--module=no_such_package.Model"],
         ParseProblem("bad_class", "module", class_path="no_such_package.Model",
                      reason="No module named 'no_such_package'")),
        (["--module=accel_trainer.examples.digits.DigitsDataModule"],
         ParseProblem("bad_class", "module", class_path="accel_trainer.examples.digits.DigitsDataModule",
                      reason="does not correspond to a subclass of TrainingModule")),
    ],
    ids=lambda v: "_".join(v)[:50] if isinstance(v, list) else None,
)
def test_command_line_errors_are_read_into_fields(argv, expected):
    assert read_parse_error(jsonargparse_error([*BASE, *argv])) == expected


def test_config_file_errors_are_read_into_fields(tmp_path):
    (tmp_path / "typo.yaml").write_text(f"module: {CLASSIFIER}\ntrainr:\n  max_epochs: 1\n")
    (tmp_path / "list.yaml").write_text(f"module: {CLASSIFIER}\ntrainer: {{limit_train_batches: [1]}}\n")
    (tmp_path / "nested.yaml").write_text(f"module:\n  class_path: {CLASSIFIER}\n  init_args: {{lrr: 0.1}}\n")
    read = {name: read_parse_error(jsonargparse_error([f"--config={tmp_path / name}"]))
            for name in ("typo.yaml", "list.yaml", "nested.yaml", "missing.yaml")}
    assert read["typo.yaml"] == ParseProblem("unknown_key", "trainr.max_epochs")
    assert read["list.yaml"] == ParseProblem("bad_value", "trainer.limit_train_batches", [1])
    assert read["nested.yaml"] == ParseProblem("unknown_init_arg", "module", 0.1, CLASSIFIER, "lrr",
                                               "Option 'lrr' is not accepted")
    missing = read["missing.yaml"]
    assert (missing.kind, missing.key) == ("config", "config") and "does not exist" in missing.reason


def test_class_group_errors_are_read_into_fields():
    """The lr_scheduler's init_args are checked by a class group: jsonargparse words those errors differently."""
    def group_error(init_args: dict) -> str:
        checker = ArgumentParser(exit_on_error=False)
        checker.add_class_arguments(torch.optim.lr_scheduler.StepLR, "lr_scheduler.init_args", skip={"optimizer"})
        with pytest.raises(ArgumentError) as error:
            checker.parse_object({"lr_scheduler": {"init_args": init_args}})
        return str(error.value)

    assert read_group_error(group_error({"step_sise": 3})) == ParseProblem("unknown_init_arg", name="step_sise")
    assert read_group_error(group_error({"step_size": "x"})) == ParseProblem("bad_init_arg", value="x", name="step_size")


def test_a_union_lists_the_class_entry_first_or_last():
    """Before jsonargparse 4.51 ``NoneType`` came first in ``Optional``'s error list: the entry is found either way."""
    message = (
        'Parser key "module":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [<class 'NoneType'>, <class 'accel_trainer.module.TrainingModule'>]\n  Errors:\n"
        "    - Expected a <class 'NoneType'>\n"
        f"    - Problem with given class_path '{CLASSIFIER}':\n"
        '        Parser key "lr":\n          Expected a <class \'float\'>. Got value: fast\n'
        "  Given value type: <class 'jsonargparse._util.NestedArg'>\n  Given value: NestedArg(key='lr', val='fast')"
    )
    assert read_parse_error(message) == ParseProblem("bad_init_arg", "module", "fast", CLASSIFIER, "lr",
                                                     'Parser key "lr":')


def test_a_message_of_another_shape_is_not_guessed_at():
    assert read_parse_error("the following arguments are required: fit.module") is None
    assert read_group_error("something new") is None
