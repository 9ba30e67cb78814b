"""Many LoRA adapters in one batch against peft (the oracle), kernels against each other, validation."""

import json
import shutil

import pytest
import torch
from tiny_models import make_lora, make_tiny_model

from workers.adapters.layers import KERNELS
from workers.adapters.lora_kernels import CANDIDATES
from workers.adapters.ops import build_adapter_batch, lora_add_reference
from workers.adapters.residency import BASE_PLACEMENT
from workers.engine.runner import DecodeRow, PromptChunk
from workers.engine.types import GenerationRequest, SamplingParams
from workers.errors import AdapterNotFoundError, AdapterValidationError
from workers.model.int4 import dequantize_groups, quantize_groups
from workers.model.quantized import quantize_rows

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECS = {  # mixed ranks, targets, alphas and rsLoRA
    "a": dict(r=2, targets=ALL),
    "b": dict(r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora=True),
    "c": dict(r=4, targets=("gate_proj", "up_proj", "down_proj"), alpha=3.0),
    "d": dict(r=8, targets=ALL, seed=5),
}


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    folder, _ = make_tiny_model(root / "base", "llama")
    adapters = {name: make_lora(folder, root / name, **{"seed": i, **spec})
                for i, (name, spec) in enumerate(SPECS.items())}
    return folder, adapters


@pytest.fixture(scope="module")
def peft_model(model_and_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, adapters = model_and_adapters
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapters["a"], adapter_name="a")
    for name in "bcd":
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def peft_logits(model, prompt, adapter):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                return model(ids).logits[0, -1]
        model.set_adapter(adapter)
        return model(ids).logits[0, -1]


def peft_greedy(model, prompt, adapter, n):
    ids = torch.tensor([prompt])
    model.generation_config.eos_token_id = None
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                return model.generate(input_ids=ids, **kwargs)[0, len(prompt):].tolist()
        model.set_adapter(adapter)
        return model.generate(input_ids=ids, **kwargs)[0, len(prompt):].tolist()


ROWS = ["a", None, "b", "c", "d", None, "a"]  # 4 adapters + base rows, one repeated


@pytest.mark.parametrize("kernel", [*KERNELS, "auto"])
def test_mixed_batch_logits_equal_peft_per_adapter(model_and_adapters, peft_model, make_core, kernel):
    folder, adapters = model_and_adapters
    core = make_core(folder, max_batch=8, max_loras=4, max_rank=8, lora_kernel=kernel)
    for name, path in adapters.items():
        core.load_adapter(name, path)
    prompts = [[(7 * i + j) % 250 + 3 for j in range(5 + i)] for i in range(len(ROWS))]
    slots = [core.adapters.acquire(a) if a else BASE_PLACEMENT for a in ROWS]
    # prefill every row as its own chunk, then one decode step for every row together
    chunks = [PromptChunk(i, 0, p[:-1], True, s) for i, (p, s) in enumerate(zip(prompts, slots))]
    logits = core.runner.forward([], chunks)
    for i, adapter in enumerate(ROWS):
        ref = peft_logits(peft_model, prompts[i][:-1], adapter)
        assert (logits[i] - ref).abs().max() <= 1e-4 * max(1, ref.abs().max()), (i, adapter)
    decode = [DecodeRow(i, len(p) - 1, p[-1], s) for i, (p, s) in enumerate(zip(prompts, slots))]
    logits = core.runner.forward(decode, [])
    for i, adapter in enumerate(ROWS):
        ref = peft_logits(peft_model, prompts[i], adapter)
        assert (logits[i] - ref).abs().max() <= 1e-4 * max(1, ref.abs().max()), (i, adapter)


def test_mixed_batch_greedy_generation_equals_peft(model_and_adapters, peft_model, make_core):
    folder, adapters = model_and_adapters
    core = make_core(folder, max_batch=8, max_loras=2, max_rank=8)  # room for 2 rank-8 adapters: rows wait
    for name, path in adapters.items():
        core.load_adapter(name, path)
    prompts = [[(11 * i + j) % 250 + 3 for j in range(4 + i)] for i in range(len(ROWS))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = core.generate([GenerationRequest(tuple(p), params, adapter=a) for p, a in zip(prompts, ROWS)])
    for p, a, events in zip(prompts, ROWS, outs, strict=True):
        assert [e.token_id for e in events] == peft_greedy(peft_model, p, a, 8), a
    assert not core.adapters.refs and not core.adapters.pins and core.runner.kv.free_slots == 8


@pytest.mark.parametrize("kernel", list(CANDIDATES))
def test_fast_kernels_equal_reference_on_random_banks(kernel, device):
    if kernel == "packed" and device.type != "cpu":
        pytest.skip("oneDNN's packed GEMM is a CPU kernel (on other devices the chooser leaves it out)")
    torch.manual_seed(0)
    rows, d_in, d_out = 30, 32, 48
    a, bt = torch.randn(rows, d_in, device=device), torch.randn(rows, d_out, device=device)
    base, r1, r2, r3 = (), ((1, 5),), ((5, 13),), ((20, 22),)  # mixed ranks 4, 8, 2; rows 13..20 unused
    both = ((5, 13), (20, 22))  # a row adding two ranges (its adapter and a fused adapter's correction)
    decode_rows = [base, r2, r1, r2, r3, base, r1, both]
    chunks = [(8, 13, r1), (13, 16, base), (16, 25, r3), (25, 27, both)]
    batch = build_adapter_batch(decode_rows, chunks, torch.float32, device)
    x = torch.randn(27, d_in, device=device)
    y_fast, y_ref = torch.zeros(27, d_out, device=device), torch.zeros(27, d_out, device=device)
    if kernel == "native_bgmv" and device.type != "cpu":  # a CPU kernel: refused, so the chooser leaves it out
        with pytest.raises(NotImplementedError):
            KERNELS[kernel](y_fast, x, a, bt, batch)
        return
    KERNELS[kernel](y_fast, x, a, bt, batch)
    lora_add_reference(y_ref, x, a, bt, batch)
    assert ((y_fast - y_ref).abs().max() / y_ref.abs().max()).item() <= 1e-5
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    assert y_ref[0].abs().sum() == 0 and y_ref[13:16].abs().sum() == 0  # base rows untouched
    for token in (7, 25):  # two ranges add up
        one = (a[5:13] @ x[token]) @ bt[5:13] + (a[20:22] @ x[token]) @ bt[20:22]
        torch.testing.assert_close(y_ref[token], one, rtol=1e-5, atol=1e-5)


def _broken(tmp_path, source, mutate):
    target = tmp_path / mutate.__name__
    shutil.copytree(source, target)
    mutate(target)
    return target


def pickle_file(d):
    (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")


def bad_json(d):
    (d / "adapter_config.json").write_text("{not json")


def truncated(d):
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def no_weights(d):
    (d / "adapter_model.safetensors").unlink()


def not_lora(d):
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))


def dora(d):
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))


@pytest.mark.parametrize("mutate", [pickle_file, bad_json, truncated, no_weights, not_lora, dora])
def test_broken_adapter_files_are_refused_and_change_nothing(tmp_path, model_and_adapters, make_core, mutate):
    folder, adapters = model_and_adapters
    core = make_core(folder, max_rank=8)
    core.load_adapter("good", adapters["a"])
    with pytest.raises(AdapterValidationError):
        core.load_adapter("bad", _broken(tmp_path, adapters["a"], mutate))
    with pytest.raises(AdapterValidationError):
        core.load_adapter("good", _broken(tmp_path / "again", adapters["b"], mutate))
    assert core.adapters.resident() == ["good"]
    assert core.adapters.host["good"].rank == 2 and core.adapters.counters["host_loads"] == 1


def test_adapter_that_does_not_fit_the_base_is_refused(tmp_path, model_and_adapters, make_core):
    folder, adapters = model_and_adapters
    other, _ = make_tiny_model(tmp_path / "wide", "llama", hidden_size=96)
    wrong_shapes = make_lora(other, tmp_path / "wrong", r=2)
    core = make_core(folder, max_rank=4)
    with pytest.raises(AdapterValidationError, match="do not fit"):
        core.load_adapter("x", wrong_shapes)
    with pytest.raises(AdapterValidationError, match="max_rank"):
        core.load_adapter("x", adapters["d"])  # r=8 > 4
    with pytest.raises(AdapterValidationError, match="does not exist"):
        core.load_adapter("x", tmp_path / "nowhere")
    assert core.adapters.resident() == []
    with pytest.raises(AdapterNotFoundError):
        core.add_request(GenerationRequest((1, 2, 3), SamplingParams(), adapter="x"))
    assert not core.has_work()


def _adapter_minus_base(core, adapter_path, prompt):
    """Logits of one prompt with the adapter minus without it, both rows of one step: [vocab]."""
    core.load_adapter("a", adapter_path)
    chunks = [PromptChunk(0, 0, prompt, True, core.adapters.acquire("a")),
              PromptChunk(1, 0, prompt, True, BASE_PLACEMENT)]
    logits = core.runner.forward([], chunks)
    return logits[0] - logits[1], logits[0]


@pytest.mark.parametrize("mode", ["int8", "w8a8"])  # int4's own error is larger: checked against its oracle below
def test_lora_applies_over_a_quantized_base(model_and_adapters, make_core, mode):
    """A LoRA changes an int8 base's rows as it changes the dense base's (its delta in the compute dtype);
    an adapter silently dropped over a quantized base fails here."""
    folder, adapters = model_and_adapters
    prompt = [(5 * j) % 250 + 3 for j in range(9)]
    dense, _ = _adapter_minus_base(make_core(folder, max_batch=2, max_loras=1, max_rank=8), adapters["a"], prompt)
    quant, _ = _adapter_minus_base(make_core(folder, max_batch=2, max_loras=1, max_rank=8, quantize=mode),
                                   adapters["a"], prompt)
    assert dense.abs().max() > 0.5  # the adapter matters in the oracle
    assert (quant - dense).abs().max() <= 0.1 * dense.abs().max(), mode


def _int8_dequantized(w: torch.Tensor) -> torch.Tensor:
    q, scales = quantize_rows(w, torch.float32)
    return q.float() * scales[:, None]


def _int4_dequantized(w: torch.Tensor) -> torch.Tensor:
    q, scales, zeros = quantize_groups(w)
    return dequantize_groups(q, scales.bfloat16().float(), zeros.bfloat16().float())  # kept in bf16


# mode → (the weights its base stands for, whether its lm_head stays dense, tolerance: int4's kernel rounds the
# tokens to bf16)
WEIGHT_ONLY = {"int8": (_int8_dequantized, False, 1e-4), "int4": (_int4_dequantized, True, 2e-2),
               "fp16": (lambda w: w.half().float(), False, 1e-4)}


@pytest.mark.parametrize("mode", WEIGHT_ONLY)
def test_lora_over_a_weight_only_base_equals_peft_over_its_dequantized_weights(model_and_adapters, make_core,
                                                                               tmp_path, mode):
    """Weight-only quantized base + LoRA is the LoRA over the weights the base stands for."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dequantized, dense_lm_head, tolerance = WEIGHT_ONLY[mode]
    folder, adapters = model_and_adapters
    hf = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, torch.nn.Linear) and not (dense_lm_head and module is hf.lm_head):
                module.weight.copy_(dequantized(module.weight))
    hf.save_pretrained(tmp_path / "dequantized")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized"), adapters["a"])
    prompt = [(5 * j) % 250 + 3 for j in range(9)]
    _, ours = _adapter_minus_base(make_core(folder, max_batch=2, max_loras=1, max_rank=8, quantize=mode),
                                  adapters["a"], prompt)
    ref = peft_logits(peft.eval(), prompt, "default")
    assert (ours - ref).abs().max() <= tolerance * max(1, ref.abs().max())
