"""bf16 and int8 bases against the fp32 oracle (documented tolerances), `--dtype auto` decided by the
measured GEMMs, and the flags reaching the engine through the worker's command line."""

from collections import Counter

import pytest
import torch
from tiny_models import make_tiny_model

from workers.errors import UnsupportedModelError
from workers.model.batch import build_step_batch
from workers.model.decoder import Linear
from workers.model.fp16 import Fp16Linear
from workers.model.int4 import Int4Linear, dequantize_groups, quantize_groups
from workers.model.kernel_choice import KernelTable
from workers.model.kv_cache import KVCache
from workers.model.linear_kernels import CANDIDATES, MEASURED_ROWS, linear_kernels, row_bucket, weight_elements
from workers.model.loader import ModelSpec, load_decoder
from workers.model.precision import AUTO_ROWS, resolve_dtype
from workers.model.quantized import MODES as QUANTIZE_MODES
from workers.model.quantized import Int8Linear
from workers.model.rope import rope_tables

# Documented tolerances (README §Precision), on a tiny random model whose logits span a few units:
# the largest logit error relative to the largest |logit|, and greedy-token agreement with fp32 when
# both read the same (fp32 greedy) prefix.
# int4 runs on a model whose weights lie on a 4-bit grid already (as the default model's, shipped as q4_1):
# what is left is bf16's rounding of the tokens and of the grid's scales and offsets.
# fp16 keeps 10 mantissa bits of every weight and sums in fp32: far inside bf16's error.
TOLERANCE = {"bfloat16": (0.05, 0.9), "int8": (0.05, 0.9), "w8a8": (0.05, 0.9), "int4": (0.05, 0.9),
             "fp16": (0.005, 0.97)}


def snap_to_int4_grid(folder):
    """Rewrites a checkpoint's linear weights as the 4-bit groups' values (a q4_1-like file)."""
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    state = load_file(file)
    for name, w in state.items():
        if w.dim() == 2 and "embed" not in name:
            state[name] = dequantize_groups(*quantize_groups(w)).contiguous()
    save_file(state, file, metadata={"format": "pt"})


def teacher_forced_logits(model, prompt: list[int], new_tokens: int, follow: list[int] | None = None):
    """Prefill, then decode greedily (or along `follow`); returns (tokens, logits per step [vocab] fp32)."""
    cfg, dev = model.config, torch.device("cpu")
    kv = KVCache(cfg.num_layers, 1, 128, cfg.num_kv_heads, cfg.head_dim, model.dtype, dev)
    cos, sin = (t.to(model.dtype) for t in rope_tables(cfg, 128))
    logits = [model(build_step_batch([], [(0, 0, prompt, True)], cos, sin, cfg.sliding_window, dev), kv)[0]]
    tokens = []
    for i in range(new_tokens):
        tokens.append(follow[i] if follow else int(logits[-1].argmax()))
        step = build_step_batch([(0, len(prompt) + i, tokens[-1])], [], cos, sin, cfg.sliding_window, dev)
        logits.append(model(step, kv)[0])
    return tokens, logits[:-1]


@pytest.mark.parametrize("mode", ["bfloat16", "int8", "w8a8", "int4", "fp16"])
def test_bf16_and_quantized_bases_agree_with_fp32(tmp_path, mode):
    folder, _ = make_tiny_model(tmp_path, "llama")
    if mode == "int4":
        snap_to_int4_grid(folder)
    oracle = load_decoder(ModelSpec(str(folder), dtype="float32"))
    spec = ModelSpec(str(folder), dtype="bfloat16") if mode == "bfloat16" else ModelSpec(str(folder), quantize=mode)
    model = load_decoder(spec)
    if mode == "int4":
        assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
        assert model.model.layers[0].self_attn.q_proj.packed.dtype == torch.uint8
        assert isinstance(model.lm_head, Linear) and model.lm_head.kernels is not None  # kept dense, measured
    elif mode == "fp16":
        assert all(isinstance(m, Fp16Linear) for m in (model.lm_head, model.model.layers[0].mlp.down_proj))
        assert model.model.layers[0].self_attn.q_proj.weight16.dtype == torch.float16 and model.dtype == torch.float32
    elif mode != "bfloat16":
        assert all(isinstance(m, Int8Linear) for m in (model.lm_head, model.model.layers[0].mlp.down_proj))
        assert model.model.layers[0].self_attn.q_proj.qweight.dtype == torch.int8
        smoothed = [m.inv_smooth is not None for m in model.modules() if isinstance(m, Int8Linear)]
        assert all(smoothed) if mode == "w8a8" else not any(smoothed)
    else:
        assert model.dtype == torch.bfloat16
    max_err, agree, total = 0.0, 0, 0
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(4):
            prompt = torch.randint(0, 256, (8,), generator=gen).tolist()
            ref_tokens, ref_logits = teacher_forced_logits(oracle, prompt, 16)
            _, logits = teacher_forced_logits(model, prompt, 16, follow=ref_tokens)
            for ours, ref in zip(logits, ref_logits, strict=True):
                max_err = max(max_err, ((ours.float() - ref).abs().max() / ref.abs().max()).item())
                agree += int(ours.argmax() == ref.argmax())
                total += 1
    err_tol, agree_tol = TOLERANCE[mode]
    assert max_err <= err_tol, f"{mode}: largest relative logit error {max_err:.4f}"
    assert agree / total >= agree_tol, f"{mode}: greedy agreement {agree}/{total}"


def _fill(table: KernelTable, shapes: Counter, fp32_ms: float, bf16_ms: float) -> None:
    """A table as if measured: every shape's buckets at fp32_ms / bf16_ms."""
    kernels = linear_kernels(table, working_set=weight_elements(shapes))  # as resolve_dtype times them
    for (out_f, in_f) in shapes:
        for rows in AUTO_ROWS:
            for dtype, ms in ((torch.float32, fp32_ms), (torch.bfloat16, bf16_ms)):
                key = kernels.key(out_f, in_f, row_bucket(rows), dtype, torch.device("cpu"))
                table.entries[key] = {"choice": "linear", "ms": {name: ms * (1 + (name != "linear"))
                                                                 for name in CANDIDATES}}


@pytest.mark.parametrize(("fp32_ms", "bf16_ms", "expected"), [(1.0, 0.4, torch.bfloat16), (1.0, 3.0, torch.float32)])
def test_auto_dtype_follows_the_measured_gemms(fp32_ms, bf16_ms, expected):
    shapes = Counter({(64, 32): 3, (256, 32): 1})
    table = KernelTable(None)
    _fill(table, shapes, fp32_ms, bf16_ms)
    assert resolve_dtype("auto", torch.device("cpu"), shapes, table, native_bf16=True) == expected
    # without bf16 instructions: fp32 whatever the timings say (bf16 activations are not free there)
    assert resolve_dtype("auto", torch.device("cpu"), shapes, table, native_bf16=False) == torch.float32
    assert resolve_dtype("float32", torch.device("cpu"), shapes, table) == torch.float32
    assert resolve_dtype(None, torch.device("cpu"), shapes, table) == torch.float32  # the oracle path


def test_auto_dtype_measures_when_nothing_is_known(tmp_path):
    """Without a table, auto times both dtypes at the model's shapes (a fake timer makes every bf16 call
    cost more, so fp32 wins) and remembers the timings."""
    seen = []

    def timer(name, call):
        call()
        seen.append(name)
        return 0.001

    table = KernelTable(tmp_path / "k.json")
    shapes = Counter({(64, 32): 2})
    assert resolve_dtype("auto", torch.device("cpu"), shapes, table, timer=timer, native_bf16=True) in (
        torch.float32, torch.bfloat16)
    keys = set(table.entries)
    assert {f"linear 64x32 rows {r} {d} cpu cycling 2" for r in ("1", "5-16") for d in ("float32", "bfloat16")} <= keys
    assert MEASURED_ROWS[row_bucket(16)] == 16 and seen


def test_dtype_and_quantize_flags_reach_the_engine_through_the_worker_cli(tmp_path, smollm2_tokenizer):
    from workers.service.app import _build_engine, _parse_args

    folder, _ = make_tiny_model(tmp_path, "llama")
    smollm2_tokenizer.save_pretrained(folder)
    engine = _build_engine(_parse_args(["--model", str(folder), "--dtype", "bfloat16", "--quantize", "int8",
                                        "--max-seq", "64", "--max-batch", "2"]))
    runner = engine.core.runner
    assert engine.core.cfg.dtype == "bfloat16" and engine.core.cfg.quantize == "int8"
    assert runner.dtype == torch.bfloat16 and runner.devices["lora"].bank.a["q_proj"].dtype == torch.bfloat16
    assert isinstance(runner.model.lm_head, Int8Linear)
    assert not engine.core.cfg.fusion.enabled  # an int8 base cannot hold a merged adapter
    plain = _build_engine(_parse_args(["--model", str(folder), "--dtype", "float32", "--max-seq", "64"]))
    assert plain.core.runner.dtype == torch.float32 and plain.core.cfg.quantize is None
    w8a8 = _build_engine(_parse_args(["--model", str(folder), "--quantize", "w8a8", "--max-seq", "64"]))
    assert w8a8.core.cfg.quantize == "w8a8" and w8a8.core.runner.model.lm_head.inv_smooth is not None
    int4 = _build_engine(_parse_args(["--model", str(folder), "--quantize", "int4", "--max-seq", "64"]))
    layers = [type(m) for m in int4.core.runner.model.modules()]
    assert layers.count(Int4Linear) == 7 * 2 and isinstance(int4.core.runner.model.lm_head, Linear)
    assert not int4.core.cfg.fusion.enabled
    fp16 = _build_engine(_parse_args(["--model", str(folder), "--quantize", "fp16", "--max-seq", "64"]))
    assert isinstance(fp16.core.runner.model.lm_head, Fp16Linear) and fp16.core.runner.dtype == torch.float32
    with pytest.raises(UnsupportedModelError, match="computes in float32"):  # bf16 would round the weights first
        _build_engine(_parse_args(["--model", str(folder), "--quantize", "fp16", "--dtype", "bfloat16"]))
    assert not fp16.core.cfg.fusion.enabled
    with pytest.raises(SystemExit):
        _parse_args(["--quantize", "int3"])
    with pytest.raises(SystemExit):
        _parse_args(["--dtype", "int8"])


def test_serve_passes_dtype_and_quantize_to_its_workers(monkeypatch):
    from typer.testing import CliRunner

    import server.launcher
    from server.operator_cli import Quantize, app

    seen = []
    monkeypatch.setattr(server.launcher, "serve", lambda options: seen.append(options) or 0)
    result = CliRunner().invoke(app, ["serve", "--dtype", "bfloat16", "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert seen[0].worker_args == ["--dtype", "bfloat16", "--quantize", "int8"]
    assert CliRunner().invoke(app, ["serve", "--quantize", "w8a8"]).exit_code == 0
    assert seen[1].worker_args == ["--dtype", "auto", "--quantize", "w8a8"]
    assert CliRunner().invoke(app, ["serve", "--quantize", "int4"]).exit_code == 0
    assert seen[2].worker_args == ["--dtype", "auto", "--quantize", "int4"]
    assert CliRunner().invoke(app, ["serve", "--quantize", "fp16"]).exit_code == 0
    assert seen[3].worker_args == ["--dtype", "auto", "--quantize", "fp16"]
    assert CliRunner().invoke(app, ["serve", "--dtype", "fp8"]).exit_code != 0
    assert {q.value for q in Quantize} == {"none", *QUANTIZE_MODES}  # the gateway's list (no torch there) in step


def test_a_kernel_override_forces_the_kernels_it_names_and_leaves_the_others_measured(tmp_path):
    """Under int4 the lm_head stays dense: a dense name forces it, a mode's name forces the int4 layers; a name of
    neither is refused."""
    folder, _ = make_tiny_model(tmp_path, "llama")
    dense_forced = load_decoder(ModelSpec(str(folder), quantize="int4", linear_kernel="wxt"))
    assert dense_forced.lm_head.kernels.chooser.override == "wxt"
    assert dense_forced.model.layers[0].mlp.up_proj.kernels.chooser.override is None
    int4_forced = load_decoder(ModelSpec(str(folder), quantize="int4", linear_kernel="int4pack_mm"))
    assert int4_forced.model.layers[0].mlp.up_proj.kernels.chooser.override == "int4pack_mm"
    assert int4_forced.lm_head.kernels.chooser.override is None
    with pytest.raises(UnsupportedModelError, match="unknown kernel"):
        load_decoder(ModelSpec(str(folder), quantize="int4", linear_kernel="int_mm"))  # w8a8's, not int4's
