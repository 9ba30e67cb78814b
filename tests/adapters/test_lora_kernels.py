"""The LoRA decode kernel is chosen by measurement per shape, decode rows and adapters in the batch."""

import pytest
import torch

from workers.adapters.layers import AdapterContext
from workers.adapters.lora_kernels import CANDIDATES, LoRAKernels
from workers.adapters.ops import build_adapter_batch, lora_add_reference
from workers.model.kernel_choice import KernelTable


@pytest.mark.parametrize("fastest", list(CANDIDATES))
def test_auto_runs_the_candidate_the_timer_measures_fastest(tmp_path, fastest):
    timed = []

    def timer(name, call):
        call()
        timed.append(name)
        return 0.001 if name == fastest else 0.004

    table = KernelTable(tmp_path / "k.json")
    kernels = LoRAKernels(table, timer=timer)
    torch.manual_seed(0)
    a, bt, x = torch.randn(24, 32), torch.randn(24, 40), torch.randn(5, 32)
    batch = build_adapter_batch([((0, 8),), ((8, 16),), (), ((0, 8),), ((16, 24),)], [], torch.float32,
                                torch.device("cpu"))
    y, ref = torch.zeros(5, 40), torch.zeros(5, 40)
    kernels(y, x, a, bt, batch)
    lora_add_reference(ref, x, a, bt, batch)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert set(timed) == set(CANDIDATES)
    entry = table.entries["lora 32x40 bank 24 rows 5-16 adapters 2-4 with base rows float32 cpu"]
    assert entry["choice"] == fastest
    assert kernels._chosen[(32, 40, 24, 2, 1, True, torch.float32, torch.device("cpu"))] is CANDIDATES[fastest]
    timed.clear()
    kernels(y, x, a, bt, batch)  # known now: not measured again
    assert timed == []


def test_unknown_kernel_names_are_refused():
    with pytest.raises(ValueError, match="unknown LoRA kernel"):
        AdapterContext("fastest")
    assert isinstance(AdapterContext("auto").kernel, LoRAKernels)


def test_gathered_races_only_where_some_decode_rows_use_the_base(tmp_path):
    timed = []

    def timer(name, call):
        call()
        timed.append(name)
        return 0.001

    kernels = LoRAKernels(KernelTable(tmp_path / "k.json"), timer=timer)
    torch.manual_seed(0)
    a, bt, x = torch.randn(16, 32), torch.randn(16, 40), torch.randn(3, 32)
    all_active = build_adapter_batch([((0, 8),), ((8, 16),), ((0, 8),)], [], torch.float32, torch.device("cpu"))
    y, ref = torch.zeros(3, 40), torch.zeros(3, 40)
    kernels(y, x, a, bt, all_active)
    lora_add_reference(ref, x, a, bt, all_active)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert set(timed) == set(CANDIDATES) - {"gathered"} and all_active.all_decode_active
    assert "lora 32x40 bank 16 rows 2-4 adapters 2-4 float32 cpu" in kernels.table.entries
    timed.clear()
    mixed = build_adapter_batch([((0, 8),), (), ((8, 16),)], [], torch.float32, torch.device("cpu"))
    assert mixed.decode_active.tolist() == [0, 2] and not mixed.all_decode_active
    kernels(y, x, a, bt, mixed)
    assert set(timed) == set(CANDIDATES)


@pytest.mark.parametrize("name", ["packed", "native_bgmv_packed"])
def test_the_packed_kernel_follows_writes_to_the_bank(name):
    """An adapter load writes bank rows in place: the packed copies must be packed again, never stale."""
    torch.manual_seed(1)
    a, bt, x = torch.randn(16, 32), torch.randn(16, 40), torch.randn(3, 32)
    batch = build_adapter_batch([((0, 8),), ((8, 16),), ((0, 8),)], [], torch.float32, torch.device("cpu"))
    for _ in range(2):
        y, ref = torch.zeros(3, 40), torch.zeros(3, 40)
        CANDIDATES[name](y, x, a, bt, batch)
        lora_add_reference(ref, x, a, bt, batch)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        a[8:16] = torch.randn(8, 32)  # a new adapter placed in the rows of the second
        bt[8:16] = torch.randn(8, 40)


@pytest.mark.parametrize("name", list(CANDIDATES))
@pytest.mark.parametrize(("in_f", "out_f"), [(32, 40), (37, 13), (70, 100)])  # tails of every vector loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_candidate_equals_the_reference_on_wide_and_uneven_rows(name, in_f, out_f, dtype):
    """Rows of rank 8 and 80 (wider than one pass of the native kernel's 64), a row with two ranges, a base row,
    and a prefill chunk after the decode rows; bf16 (tokens, banks and output) against the fp32 reference over the
    same values, within 1e-2 of the largest output."""
    torch.manual_seed(1)
    a, bt = torch.randn(120, in_f).to(dtype), torch.randn(120, out_f).to(dtype)
    decode = [((0, 8),), ((8, 88),), (), ((0, 8), (100, 116)), ((88, 96),)]
    batch = build_adapter_batch(decode, [(5, 9, ((8, 88),))], dtype, torch.device("cpu"))
    x = torch.randn(9, in_f).to(dtype)
    y = torch.randn(9, out_f).to(dtype)  # the base's output, added to
    ref = y.float()
    CANDIDATES[name](y, x, a, bt, batch)
    lora_add_reference(ref, x.float(), a.float(), bt.float(),
                       build_adapter_batch(decode, [(5, 9, ((8, 88),))], torch.float32, torch.device("cpu")))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and ((y.float() - ref).abs().max() / ref.abs().max()).item() <= tolerance
