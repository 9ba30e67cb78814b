"""Upload validation, torch-free: every malformed or unsafe input is a typed error naming the problem."""

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from store_fixtures import BASE_CONFIG, lora_folder, lora_tensors, tar_gz_bytes, zip_bytes

from adapters_store import compeft
from adapters_store.archives import ArchiveLimits, unpack
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import AdapterTooLargeError, IncompatibleAdapterError, InvalidAdapterError
from adapters_store.kinds import validate_upload
from adapters_store.mapped_files import map_file
from adapters_store.safetensors_file import all_finite, read_header, read_tensors, write_tensors
from adapters_store.validation import UploadedFile, UploadLimits, collect_files

BASE = BaseModelSpec.from_config(BASE_CONFIG)
LIMITS = UploadLimits(max_rank=16)


def check(files: dict[str, bytes], limits=LIMITS, kind=None):
    uploads = [UploadedFile(n, b) for n, b in files.items()]
    return validate_upload(collect_files(uploads, limits), BASE, limits, kind)


def test_target_shapes_agree_with_the_engine(tmp_path):
    from workers.adapters.lora import target_shapes
    from workers.model.config import DecoderConfig

    for cfg in (BASE_CONFIG, {**BASE_CONFIG, "num_key_value_heads": 4, "head_dim": 32},
                {**BASE_CONFIG, "model_type": "qwen2", "intermediate_size": 96}):
        ours = BaseModelSpec.from_config(cfg).target_shapes()
        assert ours == target_shapes(DecoderConfig.from_hf_dict(cfg))


def test_accepts_folder_zip_tar_and_single_file_forms():
    folder = lora_folder()
    a = check(folder)
    assert (a.kind, a.rank, a.alpha, a.targets, a.layers) == ("lora", 4, 8.0, ("q_proj", "v_proj"), 2)
    assert check({"my.zip": zip_bytes({f"ada/{n}": b for n, b in folder.items()})}).rank == 4
    assert check({"my.tar.gz": tar_gz_bytes({f"./ada/{n}": b for n, b in folder.items()})}).rank == 4
    single = {"weights.safetensors": folder["adapter_model.safetensors"], "cfg.json": folder["adapter_config.json"]}
    assert check(single).rank == 4
    assert check({**folder, "README.md": b"# hi"}).rank == 4


def test_accepts_compeft_uploads():
    packed = compeft.compress(lora_tensors(), density=0.1).encode()
    files = {"adapter_config.json": lora_folder()["adapter_config.json"], "adapter_model.compeft": packed}
    assert check(files).kind == "compeft"
    with pytest.raises(InvalidAdapterError, match="kind 'lora'"):
        check(files, kind="lora")


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.pt", "x.pkl", "w.ckpt"])
def test_refuses_pickles(name):
    with pytest.raises(InvalidAdapterError, match="pickle"):
        check({**lora_folder(), name: b"\x80\x04"})


def test_refuses_bad_json_config():
    for raw, match in [(b"{not json", "not valid JSON"), (b"[1]", "JSON object"),
                       (json.dumps({"peft_type": "PREFIX_TUNING"}).encode(), "not a LoRA"),
                       (json.dumps({"use_dora": True}).encode(), "use_dora")]:
        with pytest.raises(InvalidAdapterError, match=match):
            check({**lora_folder(), "adapter_config.json": raw})


def test_refuses_truncated_and_broken_safetensors():
    good = lora_folder()["adapter_model.safetensors"]
    for data, match in [(good[:-10], "truncated"), (good[:5], "truncated"), (struct.pack("<Q", 10**9) + b"{}", "over"),
                        (struct.pack("<Q", 2) + b"[]", "not a JSON object"), (good + b"x", "trailing")]:
        with pytest.raises(InvalidAdapterError, match=match):
            check({**lora_folder(), "adapter_model.safetensors": data})


def test_refuses_wrong_shapes_wrong_base_and_rank_over_cap():
    def with_tensors(tensors):
        return {**lora_folder(), "adapter_model.safetensors": write_tensors(tensors)}

    wrong = lora_tensors()
    wrong["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = np.zeros((63, 4), np.float32)
    with pytest.raises(IncompatibleAdapterError, match=r"q_proj.*do not fit the base"):
        check(with_tensors(wrong))
    other_base = lora_tensors(shapes={"q_proj": (32, 32), "v_proj": (32, 16)})
    with pytest.raises(IncompatibleAdapterError, match="another base model"):
        check(with_tensors(other_base))
    with pytest.raises(IncompatibleAdapterError, match="layer 2 but the base has 2"):
        check(with_tensors(lora_tensors(layers=3)))
    with pytest.raises(IncompatibleAdapterError, match="rank 32 is outside 1..16"):
        check(with_tensors(lora_tensors(rank=32)))
    unknown = {**lora_tensors(), "base_model.model.lm_head.weight": np.zeros((4, 4), np.float32)}
    with pytest.raises(IncompatibleAdapterError, match="unsupported tensor"):
        check(with_tensors(unknown))
    nan = lora_tensors()
    next(iter(nan.values()))[0, 0] = np.nan
    with pytest.raises(IncompatibleAdapterError, match="non-finite"):
        check(with_tensors(nan))


def test_size_caps():
    folder = lora_folder()
    with pytest.raises(AdapterTooLargeError, match="file limit"):
        check(folder, UploadLimits(max_file_bytes=1000))
    with pytest.raises(AdapterTooLargeError, match="upload is"):
        check(folder, UploadLimits(max_total_bytes=len(folder["adapter_model.safetensors"])))


def test_archive_path_traversal_absolute_and_links():
    folder = lora_folder()
    for entries, match in [({"../adapter_config.json": b"{}"}, "path traversal"),
                           ({"/etc/adapter_config.json": b"{}"}, "absolute"),
                           ({"C:/x/adapter_config.json": b"{}"}, "absolute")]:
        with pytest.raises(InvalidAdapterError, match=match):
            check({"a.zip": zip_bytes({**folder, **entries})})
        with pytest.raises(InvalidAdapterError, match=match):
            check({"a.tar.gz": tar_gz_bytes({**folder, **entries})})
    with pytest.raises(InvalidAdapterError, match="symbolic link"):
        check({"a.zip": zip_bytes({"adapter_config.json": folder["adapter_config.json"]},
                                  symlinks={"adapter_model.safetensors": "/etc/passwd"})})
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        with pytest.raises(InvalidAdapterError, match="is a link"):
            check({"a.tar.gz": tar_gz_bytes({"adapter_config.json": folder["adapter_config.json"]},
                                            links={"adapter_model.safetensors": (kind, "/etc/passwd")})})
    with pytest.raises(InvalidAdapterError, match="path traversal"):
        check({"../adapter_config.json": b"{}"})


def test_decompression_bombs():
    zeros = b"\0" * (8 * 1024 * 1024)
    limits = UploadLimits(archive=ArchiveLimits(max_total_bytes=4 * 1024 * 1024))
    with pytest.raises(AdapterTooLargeError, match="bomb"):
        check({"a.zip": zip_bytes({"big.bin.txt": zeros})})  # ratio ~1000x
    with pytest.raises(AdapterTooLargeError, match="decompresses to more than"):
        noise = np.random.default_rng(0).bytes(3_000_000)
        check({"a.zip": zip_bytes({"a.txt": noise, "b.txt": noise})}, limits)
    with pytest.raises(AdapterTooLargeError, match="decompresses to more than"):
        check({"a.tar.gz": tar_gz_bytes({"big.txt": zeros})}, limits)
    many = {f"f{i}.txt": b"x" for i in range(100)}
    with pytest.raises(AdapterTooLargeError, match="entries"):
        check({"a.zip": zip_bytes(many)})


def test_zip_that_lies_about_sizes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("adapter_config.json", b"{}" * 100)
    data = bytearray(buf.getvalue())
    cd = data.rfind(b"PK\x01\x02")  # central directory: claim a smaller uncompressed size
    struct.pack_into("<I", data, cd + 24, 10)
    with pytest.raises(InvalidAdapterError):
        check({"a.zip": bytes(data)})


def test_safetensors_round_trip_and_bf16():
    tensors = lora_tensors()
    assert all(np.array_equal(read_tensors(write_tensors(tensors))[n], a) for n, a in tensors.items())
    bf16 = np.array([1.0, -2.5, 0.0], dtype=np.float32).view(np.uint32) >> 16
    header = json.dumps({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    data = struct.pack("<Q", len(header)) + header + bf16.astype("<u2").tobytes()
    assert read_header(data).tensors["x"].dtype == "BF16"
    np.testing.assert_array_equal(read_tensors(data)["x"], [1.0, -2.5, 0.0])


@pytest.mark.parametrize("dtype", ["F64", "F32", "F16", "BF16"])
def test_all_finite_in_pieces_agrees_with_the_whole_tensor_check(dtype):
    rng = np.random.default_rng(1)
    for bad in (None, 0, 37, 99):  # none, first, a piece boundary's neighbourhood, last
        values = rng.standard_normal(100).astype(np.float32)
        if bad is not None:
            values[bad] = [np.nan, np.inf, -np.inf][bad % 3]
        raw = {"F64": values.astype("<f8").tobytes(), "F32": values.astype("<f4").tobytes(),
               "F16": values.astype("<f2").tobytes(),
               "BF16": (values.view(np.uint32) >> 16).astype("<u2").tobytes()}[dtype]
        header = json.dumps({"a": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
                             "x": {"dtype": dtype, "shape": [10, 10], "data_offsets": [3, 3 + len(raw)]}}).encode()
        data = struct.pack("<Q", len(header)) + header + b"\x01\x02\x03" + raw
        parsed = read_header(data)
        reference = all(np.isfinite(read_tensors(data)[n]).all() for n in ("x",))
        for piece in (8, 24, 1 << 20):
            assert all_finite(data, parsed, piece) == reference == (bad is None)


def _spooled_entry(tmp_path, size: int) -> Path:
    entry = tmp_path / "adapter_model.safetensors"
    with entry.open("wb") as f:
        for i in range(size // (1 << 20)):
            f.write(bytes([i % 251]) * (1 << 20))
    return entry


@pytest.mark.parametrize("form", ["zip", "tar.gz"])
def test_archives_unpack_from_disk_to_disk_with_bounded_memory(tmp_path, form):
    """A 48 MiB archive entry is read from the mapped upload and written to a mapped temp file: the Python
    and numpy heap never holds it (it used to be bytes twice: the upload and the entry)."""
    import hashlib
    import tracemalloc

    entry = _spooled_entry(tmp_path, 48 << 20)
    archive = tmp_path / f"a.{form}"
    if form == "zip":
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
            z.write(entry, "ada/adapter_model.safetensors")
    else:
        with tarfile.open(archive, "w:gz", compresslevel=1) as t:
            t.add(entry, "ada/adapter_model.safetensors")
    with archive.open("rb") as f:
        data = map_file(f)
    tracemalloc.start()
    try:
        entries = unpack(archive.name, data, ArchiveLimits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (got,) = entries.values()
    assert hashlib.sha256(got).digest() == hashlib.sha256(entry.read_bytes()).digest()
    assert peak < 8 << 20, f"unpacking peaked at {peak >> 20} MiB"
