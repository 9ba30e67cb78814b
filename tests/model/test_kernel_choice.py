"""Kernels chosen by measurement: every candidate equals the reference, the chooser keeps whichever the
timer says is fastest, and the table is remembered on disk per machine."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny_model

from workers.errors import UnsupportedModelError
from workers.model.kernel_choice import KernelChooser, KernelTable, machine_key, measure
from workers.model.linear_kernels import CANDIDATES, ROW_BUCKETS, linear_kernels, row_bucket
from workers.model.loader import ModelSpec, load_decoder
from workers.model.quantized import CANDIDATES as INT8_CANDIDATES
from workers.model.quantized import quantize_rows

CPU = torch.device("cpu")


def fake_timer(fastest: str, calls: list[str] | None = None):
    """Says `fastest` takes 1 ms and everything else 5 ms; records the order of the timed calls."""

    def timer(name, call):
        call()
        if calls is not None:
            calls.append(name)
        return 0.001 if name == fastest else 0.005

    return timer


BF16_TOLERANCE = 1e-2  # bf16 outputs (and intermediates rounded to bf16): relative to the largest |output|


@pytest.mark.parametrize("name", list(CANDIDATES))
@pytest.mark.parametrize("rows", [1, 3, 16, 70])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_dense_candidate_equals_f_linear(name, rows, bias, dtype):
    """fp32: to 1e-5; bf16 (tokens, weights and output): the fp32 GEMM of the same values within BF16_TOLERANCE."""
    torch.manual_seed(rows)
    w, x = torch.randn(80, 48).to(dtype), torch.randn(rows, 48).to(dtype)
    b = torch.randn(80).to(dtype) if bias else None
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    out = CANDIDATES[name](x, w, b)
    assert out.shape == ref.shape and out.is_contiguous() and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else BF16_TOLERANCE
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= tolerance


@pytest.mark.parametrize("name", list(INT8_CANDIDATES))
@pytest.mark.parametrize("rows", [1, 16])
def test_every_int8_candidate_equals_the_dequantized_reference(name, rows):
    torch.manual_seed(rows)
    q, scales = quantize_rows(torch.randn(80, 48), torch.float32)
    x, b = torch.randn(rows, 48), torch.randn(80)
    ref = F.linear(x, q.float() * scales[:, None], b)
    assert ((INT8_CANDIDATES[name](x, q, scales, b) - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def saved_entries(folder):
    return json.loads((folder / "k.json").read_text())["entries"]


@pytest.mark.parametrize("fastest", ["linear", "wxt", "wxt_pair", "native_gemv"])
def test_the_chooser_keeps_what_the_timer_measures_fastest(tmp_path, fastest):
    calls: list[str] = []
    table = KernelTable(tmp_path / "k.json")
    kernels = linear_kernels(table, timer=fake_timer(fastest, calls))
    fn = kernels.get(torch.Size([80, 48]), 1, torch.float32, CPU)
    assert fn is CANDIDATES[fastest]
    assert set(calls) == set(CANDIDATES) and calls.count(fastest) >= 4  # every candidate, the leader in 3+ rounds
    assert len(calls) < 4 * len(CANDIDATES)  # the 5x slower ones left the race after one timed call
    many = kernels.get(torch.Size([80, 48]), 16, torch.float32, CPU)  # wxt_pair is a one-row candidate
    assert many is CANDIDATES["linear" if fastest == "wxt_pair" else fastest]
    saved = saved_entries(tmp_path)
    assert saved["linear 80x48 rows 1 float32 cpu"]["choice"] == fastest
    assert set(saved["linear 80x48 rows 5-16 float32 cpu"]["ms"]) == set(CANDIDATES) - {"wxt_pair"}
    kernels.get(torch.Size([80, 48]), 17, torch.float32, CPU)
    assert set(saved_entries(tmp_path)["linear 80x48 rows 17-64 float32 cpu"]["ms"]) == set(CANDIDATES) - {"wxt_pair"}


def test_a_saved_table_is_read_back_without_measuring(tmp_path):
    table = KernelTable.for_machine(CPU, tmp_path)
    linear_kernels(table, timer=fake_timer("wxt")).get(torch.Size([32, 16]), 2, torch.float32, CPU)
    assert table.path.name == f"{machine_key(CPU)}.json"

    def must_not_time(name, call):
        raise AssertionError("measured again")

    again = KernelTable.for_machine(CPU, tmp_path)
    assert linear_kernels(again, timer=must_not_time).get(torch.Size([32, 16]), 3, torch.float32, CPU) \
        is CANDIDATES["wxt"]
    assert "wxt" in again.format("linear")


def test_override_forces_a_candidate_and_unknown_names_are_refused(tmp_path):
    table = KernelTable(None)
    kernels = linear_kernels(table, override="wxt_pair", timer=fake_timer("linear"))
    assert kernels.get(torch.Size([8, 8]), 1, torch.float32, CPU) is CANDIDATES["wxt_pair"]
    assert table.entries == {}
    with pytest.raises(ValueError, match="unknown kernel"):
        KernelChooser(("a", "b"), table, override="c")


def test_measure_interleaves_and_reports_each_candidates_fastest_call():
    times = iter([3.0, 1.0] + [2.0, 4.0, 5.0, 0.5] * 10)
    order: list[str] = []

    def timer(name, call):
        order.append(name)
        return next(times)

    timings = measure({"a": lambda: None, "b": lambda: None}, timer, budget_s=0.0, min_repeats=2)
    assert order == ["a", "b", "a", "b", "b", "a"]  # the order rotates each round
    assert (timings["a"].best, timings["a"].median) == (0.5, 2.0)
    assert (timings["b"].best, timings["b"].median) == (1.0, 4.0)


def test_row_buckets_cover_every_row_count():
    assert [row_bucket(n) for n in (1, 2, 4, 5, 16, 17, 64, 65, 512)] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert len(ROW_BUCKETS) == 5


@pytest.mark.parametrize("kernel", list(CANDIDATES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forcing_each_candidate_gives_the_reference_logits(tmp_path, kernel, dtype, monkeypatch):
    """The whole decoder, every linear forced to one candidate, against plain F.linear (no kernels); bf16 within
    BF16_TOLERANCE (sums in another order round differently)."""
    from test_decoder import run_logits

    folder, _ = make_tiny_model(tmp_path, "qwen2")  # biased q/k/v, tied lm_head
    reference = load_decoder(ModelSpec(str(folder), linear_kernel="linear", dtype=dtype))
    for module in reference.modules():
        module.kernels = None  # Linear falls back to F.linear
    forced = load_decoder(ModelSpec(str(folder), linear_kernel=kernel, dtype=dtype))
    ids = torch.randint(0, 256, (9,)).tolist()
    tolerance = 1e-5 if dtype == "float32" else BF16_TOLERANCE
    for ours, ref in zip(run_logits(forced, ids[:6], ids[6:]), run_logits(reference, ids[:6], ids[6:]), strict=True):
        assert ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= tolerance
    monkeypatch.setenv("ADAPTERD_LINEAR_KERNEL", "no-such-kernel")
    with pytest.raises(UnsupportedModelError, match="unknown kernel"):
        load_decoder(ModelSpec(str(folder)))


def test_a_candidate_that_fails_here_is_left_out():
    def broken():
        raise NotImplementedError("no such op on this device")

    timings = measure({"broken": broken, "ok": lambda: None}, lambda name, call: call() or 0.001)
    assert set(timings) == {"ok"}
    with pytest.raises(NotImplementedError):
        measure({"broken": broken}, lambda name, call: 0.001)


def test_the_packed_candidate_packs_again_when_the_weight_is_written_in_place():
    """Fusion adds an adapter into W in place: the packed copy must follow it, never serve the old W."""
    torch.manual_seed(0)
    w, x = torch.randn(80, 48), torch.randn(3, 48)
    packed = CANDIDATES["onednn_packed"]
    assert torch.allclose(packed(x, w, None), F.linear(x, w), atol=1e-5)
    with torch.no_grad():
        w.add_(torch.randn(80, 48))
    assert torch.allclose(packed(x, w, None), F.linear(x, w), atol=1e-5)


def test_candidates_are_timed_cycling_through_the_models_working_set(tmp_path):
    """A call cycles through copies of W standing for the model's weights; the table keeps time per GEMM."""
    shapes_seen = []

    def timer(name, call):
        shapes_seen.append(len(call()))  # the candidate ran once per copy
        return 0.010

    table = KernelTable(tmp_path / "k.json")
    kernels = linear_kernels(table, timer=timer, working_set=10 * 80 * 48)
    kernels.get(torch.Size([80, 48]), 1, torch.float32, CPU)
    entry = table.entries["linear 80x48 rows 1 float32 cpu cycling 10"]
    assert set(shapes_seen) == {10} and set(entry["ms"].values()) == {1.0}
    assert linear_kernels(KernelTable(None)).key(80, 48, 0, torch.float32, CPU) == "linear 80x48 rows 1 float32 cpu"


def test_a_table_from_before_a_candidate_existed_is_measured_again(tmp_path):
    table = KernelTable(tmp_path / "k.json")
    table.entries["linear 80x48 rows 1 float32 cpu"] = {"choice": "wxt", "ms": {"linear": 2.0, "wxt": 1.0}}
    kernels = linear_kernels(table, timer=fake_timer("onednn_packed"))
    assert kernels.get(torch.Size([80, 48]), 1, torch.float32, CPU) is CANDIDATES["onednn_packed"]
    assert set(table.entries["linear 80x48 rows 1 float32 cpu"]["ms"]) == set(CANDIDATES)
