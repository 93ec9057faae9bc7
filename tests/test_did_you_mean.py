"""A misspelt key or option: one line with the nearest allowed name within two edits
(runner/config/suggest.py), from Hydra's composition errors (messages.py), the engine's
schema (schema.py typed) and a ``_target_``'s signature (build.py)."""
from __future__ import annotations

import pytest

from conftest import compose
from runner.config.build import checked_kwargs
from runner.config.compose import compose_job
from runner.config.suggest import edit_distance, nearest
from runner.errors import UserError


def test_edit_distance_counts_insertions_deletions_and_substitutions():
    assert edit_distance("kitten", "sitting") == 3  # the textbook pair: k->s, e->i, +g
    assert edit_distance("batch_sz", "batch_size") == 2 and edit_distance("focall", "focal") == 1
    assert edit_distance("", "abc") == 3 and edit_distance("same", "same") == 0
    assert nearest("batch_sz", ["batch_size", "max_steps"]) == "batch_size"
    assert nearest("lerning_rate", ["lr", "momentum"]) is None  # three edits or more: no guess


def composition_error(*overrides: str) -> str:
    with pytest.raises(UserError) as error:
        compose_job(list(overrides))
    return str(error.value)


@pytest.mark.parametrize("overrides, needle", [
    (["loss=focall"], "unknown option loss=focall (did you mean 'focal'?); available options in 'loss': asl, bce,"),
    (["logger=[csv,tensorbord]"], "unknown option logger=tensorbord (did you mean 'tensorboard'?)"),
    (["hydra/launcher=fusd"], "unknown option hydra/launcher=fusd (did you mean 'fused'?)"),
    (["trainer.batch_sz=8"], "unknown key 'trainer.batch_sz' (did you mean 'batch_size'?); allowed keys of trainer: "
                             "accumulate_grad_batches, batch_size,"),
    (["device.indx=1"], "unknown key 'device.indx' (did you mean 'index'?); allowed keys of device: backend"),
    (["experiment=regression", "model.hiden=3"], "unknown key 'model.hiden' (did you mean 'hidden'?); allowed keys "
                                                 "of model: batchnorm, hidden"),
])
def test_composition_errors_are_one_line_with_the_nearest_name(overrides, needle):
    message = composition_error(*overrides)
    assert needle in message and "\n" not in message, message
    assert "To append" not in message and "+" not in message  # Hydra's +key hint: refused for these nodes


def test_a_target_taking_any_key_keeps_the_plus_hint_and_a_far_word_gets_no_guess():
    message = composition_error("model.dropout_rate=0.2")  # torchvision's builder takes **kwargs
    assert "unknown key 'model.dropout_rate'; allowed keys of model:" in message
    assert message.endswith("add one with +model.dropout_rate=0.2") and "did you mean" not in message
    assert "did you mean" not in composition_error("loss=xyzzy")


def test_an_appended_key_refused_by_the_schema_or_a_signature_names_the_nearest():
    from runner.config import typed

    with pytest.raises(UserError, match=r"unknown key 'trainer.batch_sz' \(did you mean 'batch_size'\?\); allowed"):
        typed(compose("experiment=regression", "+trainer.batch_sz=8"))
    node = compose("experiment=regression", "+model.hiden=3").model
    with pytest.raises(UserError, match=r"unknown key 'model.hiden' \(did you mean 'hidden'\?\); allowed keys of "
                                        r"model: batchnorm, dim, hidden"):
        checked_kwargs(node, "model")


def test_a_typo_on_the_command_line_exits_2_in_one_line_before_the_heavy_imports(record_property):
    """The command line's typo: exit 2, the one line with the nearest name. Composition happens
    before torch is imported, so this is quick; how quick is recorded (the test's report
    property and its output), never asserted."""
    import time

    from conftest import run_cli

    started = time.monotonic()
    result = run_cli("trainer.batch_sz=8")
    seconds = time.monotonic() - started
    record_property("typo_exit_seconds", round(seconds, 2))
    print(f"python -m runner trainer.batch_sz=8: exit {result.returncode} after {seconds:.2f} s")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: unknown key 'trainer.batch_sz' (did you mean 'batch_size'?)")
    assert result.stderr.count("\n") == 1
