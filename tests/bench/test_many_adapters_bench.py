"""The many-adapters benchmark runs end to end through the worker's own path (tiny model, a handful of
adapters published into a store, `store:` sources, a few seconds per phase) and reports every figure."""

import json


def test_many_adapters_bench_smoke(tiny_with_tokenizer, run_bench, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERD_CACHE_DIR", str(tmp_path / "cache"))
    out = run_bench("many_adapters", "--model", str(tiny_with_tokenizer), "--adapters", "6", "--duration", "3",
                    "--capacity-seconds", "2", "--new-tokens", "4", "--work-dir", str(tmp_path / "work"))
    report = json.loads(out.read_text())
    assert report["capacity_base"]["requests_per_second"] > 0 and report["arrivals"] > 0
    for name in ("base", "fp16", "compeft"):
        phase = report["phases"][name]
        assert phase["requests"] == report["arrivals"] and phase["tokens_per_second"] > 0
        assert phase["ttft_p50_s"] <= phase["ttft_p99_s"]
    for name in ("fp16", "compeft"):
        phase = report["phases"][name]
        assert phase["throughput_vs_base"] > 0 and phase["host_loads_per_second"] > 0  # adapters were loaded
        assert 0 <= phase["host_hit_rate"] < 1 and phase["device_hit_rate"] is not None
    assert set(report["adapter_bytes"]) == {"fp16", "compeft"}
    assert report["adapter_bytes"]["compeft"] < report["adapter_bytes"]["fp16"]
