"""The worker's default context length: the model's limit, capped by the KV-cache budget."""

from tiny_models import make_tiny_model

from workers.model.config import DecoderConfig
from workers.service.context_length import default_max_seq, kv_bytes_per_token


def test_default_max_seq_is_the_models_limit_capped_by_the_kv_budget(tmp_path):
    folder, _ = make_tiny_model(tmp_path, "llama")  # 2 layers, 2 kv heads, head_dim 16, 512 positions
    per_token = kv_bytes_per_token(DecoderConfig.from_folder(folder), "float32")
    assert per_token == 2 * 2 * 2 * 16 * 4
    assert default_max_seq(folder, 16, "float32", 2.0) == 512  # fits: the model's own limit
    budget_gib = per_token * 16 * 100 / (1 << 30)  # room for 100 positions of 16 sequences
    assert default_max_seq(folder, 16, "float32", budget_gib) == 100
    assert default_max_seq(folder, 16, "bfloat16", budget_gib) == 200
