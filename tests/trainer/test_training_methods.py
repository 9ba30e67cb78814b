"""Validation and defaults of fine-tune methods (torch-free: the gateway imports it)."""

import subprocess
import sys

import pytest

from adapters_store.auto_hyperparameters import auto_batch_size, auto_epochs
from adapters_store.training_methods import LORA_TARGETS, validate_method


def test_defaults_are_filled_in():
    lora = validate_method({"type": "lora"})
    assert lora["rank"] == 8 and lora["alpha"] == 16.0 and lora["targets"] == list(LORA_TARGETS)
    assert lora["epochs"] == lora["batch_size"] == lora["lr"] == lora["learning_rate_multiplier"] == "auto"
    assert lora["max_seq_len"] > 0
    s2ft = validate_method({"type": "s2ft", "head_ratio": 0.25})
    assert s2ft["head_ratio"] == 0.25 and 0 < s2ft["channel_ratio"] < 0.5
    assert s2ft["modules"] == ["o_proj", "down_proj"]
    medusa = validate_method({"type": "medusa", "num_heads": 4, "adapter": "my-lora"})
    assert medusa["num_heads"] == 4 and medusa["num_layers"] == 1 and medusa["max_new_tokens"] > 0
    assert medusa["adapter"] == "my-lora" and validate_method({"type": "medusa"})["adapter"] is None
    assert isinstance(validate_method({"type": "lora", "lr": 1})["lr"], float)


@pytest.mark.parametrize("method, message", [
    ({"type": "dora"}, "method.type"),
    ({}, "method.type"),
    ("lora", "object"),
    ({"type": "lora", "rank": 0}, "method.rank"),
    ({"type": "lora", "rank": 4.0}, "method.rank"),
    ({"type": "lora", "rank": True}, "method.rank"),
    ({"type": "lora", "targets": ["q_proj", "lm_head"]}, "method.targets"),
    ({"type": "lora", "targets": []}, "method.targets"),
    ({"type": "lora", "lr": -1}, "method.lr"),
    ({"type": "lora", "lr": float("nan")}, "method.lr"),
    ({"type": "lora", "epochs": 0}, "method.epochs"),
    ({"type": "lora", "head_ratio": 0.1}, "unknown hyperparameters"),
    ({"type": "s2ft", "channel_ratio": 1.5}, "method.channel_ratio"),
    ({"type": "s2ft", "modules": ["q_proj"]}, "method.modules"),
    ({"type": "s2ft", "head_ratio": 0, "channel_ratio": 0}, "nothing would be trained"),
    ({"type": "medusa", "num_heads": 9}, "method.num_heads"),
    ({"type": "medusa", "adapter": 3}, "method.adapter"),
    ({"type": "lora", "epochs": "many"}, "method.epochs"),
    ({"type": "lora", "learning_rate_multiplier": 0}, "method.learning_rate_multiplier"),
    ({"type": "lora", "lr": 1e-3, "learning_rate_multiplier": 2}, "give one"),
])
def test_bad_methods_are_refused_with_the_field_named(method, message):
    with pytest.raises(ValueError, match=message):
        validate_method(method)


@pytest.mark.parametrize("examples", [1, 8, 32, 100, 500, 2_000, 5_000, 20_000, 200_000])
def test_the_auto_rule_gives_small_files_enough_steps_and_large_ones_few_epochs(examples):
    m = validate_method({"type": "lora"}, examples=examples)
    steps = m["epochs"] * -(-examples // m["batch_size"])
    assert 4 <= m["batch_size"] <= 32 and 1 <= m["epochs"] <= 100
    if examples <= 100:
        assert steps >= (150 if examples >= 8 else 100), m  # a few dozen examples: well over ~100 steps
    if examples >= 2_000:
        assert m["epochs"] <= 3, m
    assert m["lr"] == pytest.approx(2e-4 * m["learning_rate_multiplier"])
    assert m["batch_size"] == auto_batch_size(examples) and m["epochs"] == auto_epochs(examples, m["batch_size"])


def test_explicit_values_win_over_auto():
    m = validate_method({"type": "lora", "epochs": 2, "batch_size": 3, "learning_rate_multiplier": 0.5}, examples=32)
    assert (m["epochs"], m["batch_size"], m["lr"], m["learning_rate_multiplier"]) == (2, 3, 1e-4, 0.5)
    m = validate_method({"type": "s2ft", "lr": 1e-3}, examples=10_000)
    assert m["lr"] == 1e-3 and m["learning_rate_multiplier"] == pytest.approx(5.0) and m["epochs"] <= 3


def test_imports_no_torch():
    code = "import sys, adapters_store.training_methods; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
