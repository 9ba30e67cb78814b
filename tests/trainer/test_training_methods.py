"""Validation and defaults of fine-tune methods (torch-free: the gateway imports it)."""

import subprocess
import sys

import pytest

from adapters_store.training_methods import validate_method


def test_defaults_are_filled_in():
    lora = validate_method({"type": "lora"})
    assert lora["rank"] == 8 and lora["alpha"] == 16.0 and lora["targets"] == ["q_proj", "v_proj"]
    assert lora["epochs"] == 1 and lora["batch_size"] > 0 and lora["lr"] > 0 and lora["max_seq_len"] > 0
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
])
def test_bad_methods_are_refused_with_the_field_named(method, message):
    with pytest.raises(ValueError, match=message):
        validate_method(method)


def test_imports_no_torch():
    code = "import sys, adapters_store.training_methods; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
