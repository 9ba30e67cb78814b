"""Merging adapters into one (LoRAX's `merged_adapters`), torch-free: the gateway checks requests and saves
merges with it, the worker builds per-request merges with it.

A merge request is `{"ids": [...], "weights": [...], "strategy": "linear" | "ties", "density": d,
"majority_sign_method": "total" | "frequency"}` (weights default to 1 each, density to 1.0); LoRAX's
client names the strategy `merge_strategy`. `dare_linear` / `dare_ties` (DARE, as PEFT's): each tensor keeps
a random `density` fraction of its entries, rescaled by 1/density, then linear / TIES sign election; the
random masks are seeded from the tensors' bytes, so every worker builds the same merge.

LoRA members (ComPEFT ones decoded first) merge as PEFT's `add_weighted_adapter` does: per module, the
members that target it contribute A·√|wᵢ·sᵢ|·sign(wᵢ·sᵢ) and B·√|wᵢ·sᵢ| (sᵢ their LoRA scale), and the A
tensors and the B tensors are each combined — `linear`: summed; `ties`: each pruned to its top `density`
magnitudes, a sign elected per entry (sign of the sum of the pruned tensors, or of their signs with
"frequency"), and the weighted entries agreeing with it averaged. The result is a LoRA with scale 1 whose
rank is the largest member rank (lower ranks are zero-padded; PEFT requires equal ranks). S²FT members
merge in weight space, where their updates live: per (layer, module), each delta is placed on the union
of the members' selected heads/channels (zeros elsewhere), then combined the same way with weights wᵢ.
A merge of both kinds has a LoRA part and an S²FT part, each merged among its own members.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from adapters_store import compeft, s2ft_format, safetensors_file
from adapters_store.errors import InvalidAdapterError
from adapters_store.validation import CONFIG_NAME, LORA_KEY, SAFETENSORS_NAME, parse_config

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
MAX_MEMBERS = 16
LORA_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class MergeSpec:
    ids: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"

    @classmethod
    def from_dict(cls, raw: object) -> MergeSpec:
        def bad(message: str) -> InvalidAdapterError:
            return InvalidAdapterError(f"merged_adapters: {message}", param="merged_adapters")

        known = {"ids", "weights", "strategy", "density", "majority_sign_method"}
        if isinstance(raw, dict):  # LoRAX's client names the strategy `merge_strategy` and sends nulls
            if "merge_strategy" in raw and raw.get("strategy") is not None:
                raise bad("give strategy or merge_strategy, not both")
            raw = {("strategy" if k == "merge_strategy" else k): v for k, v in raw.items() if v is not None}
        if not isinstance(raw, dict) or set(raw) - known:
            raise bad(f"must be an object with keys among {sorted(known)}")
        ids = raw.get("ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            raise bad("ids must be a non-empty list of adapter ids")
        if len(ids) > MAX_MEMBERS or len(set(ids)) != len(ids):
            raise bad(f"ids must be unique, at most {MAX_MEMBERS}")
        weights = raw.get("weights", [1.0] * len(ids))
        if (not isinstance(weights, list) or len(weights) != len(ids)
                or not all(isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w)
                           for w in weights)):
            raise bad("weights must be a list of finite numbers, one per id")
        strategy = raw.get("strategy", "linear")
        if strategy not in STRATEGIES:
            raise bad(f"strategy must be one of {', '.join(STRATEGIES)}")
        density = raw.get("density", 1.0)
        if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
            raise bad("density must be in (0, 1]")
        sign = raw.get("majority_sign_method", "total")
        if sign not in SIGN_METHODS:
            raise bad(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}")
        return cls(tuple(ids), tuple(float(w) for w in weights), strategy, float(density), sign)

    def key(self, member_keys: Sequence[str]) -> str:
        """A content key: equal for merges of the same adapter versions with the same parameters."""
        payload = {"members": list(member_keys), "weights": list(self.weights), "strategy": self.strategy,
                   "density": self.density, "sign": self.majority_sign_method}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---- the members ---------------------------------------------------------------------------------
@dataclass
class LoRAMember:
    weight: float
    modules: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]]  # (A [r, in], B [out, r], scale)


@dataclass
class S2FTMember:
    weight: float
    modules: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]  # (unit index [k], delta)


@dataclass
class MergeInputs:
    lora: list[LoRAMember] = field(default_factory=list)
    s2ft: list[S2FTMember] = field(default_factory=list)


def read_member(files: Mapping[str, bytes], weight: float, base: s2ft_format.BaseShape, inputs: MergeInputs) -> None:
    """Adds one stored adapter (LoRA, ComPEFT LoRA or S²FT files, already validated) to `inputs`."""
    if s2ft_format.CONFIG_FILE in files:
        cfg = s2ft_format.parse_config(files[s2ft_format.CONFIG_FILE])
        updates = s2ft_format.parse_s2ft(cfg, s2ft_format.read_arrays(files), base)
        widths = s2ft_format.unit_counts(base)
        inputs.s2ft.append(S2FTMember(weight, {
            key: (u.index[:: widths[key[1]][1]] // widths[key[1]][1], u.delta) for key, u in updates.items()}))
        return
    cfg = parse_config(files[CONFIG_NAME])
    if compeft.FILENAME in files:
        tensors = compeft.decode(files[compeft.FILENAME]).to_dense()
    else:
        tensors = safetensors_file.read_tensors(files[SAFETENSORS_NAME])
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        m = LORA_KEY.search(name)
        if m is None:
            raise InvalidAdapterError(f"unexpected tensor {name!r} in a LoRA adapter")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value
    alpha, rslora = float(cfg.get("lora_alpha", cfg.get("r", 8))), bool(cfg.get("use_rslora", False))
    modules = {}
    for key, ab in pairs.items():
        r = ab["A"].shape[0]
        modules[key] = (ab["A"], ab["B"], alpha / math.sqrt(r) if rslora else alpha / r)
    inputs.lora.append(LoRAMember(weight, modules))


# ---- the math ------------------------------------------------------------------------------------
def magnitude_prune(x: np.ndarray, density: float) -> np.ndarray:
    """x with all but its int(density · numel) largest magnitudes zeroed."""
    if density >= 1:
        return x
    k = int(density * x.size)
    keep = np.zeros(x.size, dtype=bool)
    if k:
        keep[np.argpartition(np.abs(x).ravel(), x.size - k)[x.size - k:]] = True
    return np.where(keep.reshape(x.shape), x, 0).astype(x.dtype)


def dare_masks(tensors: Sequence[np.ndarray], density: float) -> list[np.ndarray]:
    """DARE's random keep-masks (1 with probability `density`), one per tensor, seeded from their bytes."""
    rng = np.random.default_rng(zlib.crc32(b"".join(np.ascontiguousarray(t).tobytes() for t in tensors)))
    return [(rng.random(t.shape) < density).astype(np.float64) for t in tensors]


def combine(tensors: Sequence[np.ndarray], weights: Sequence[float], spec: MergeSpec) -> np.ndarray:
    """tensors: same-shaped task tensors; weights: one per tensor."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1, *([1] * tensors[0].ndim))
    stacked = np.stack([t.astype(np.float64) for t in tensors])  # [n, ...]
    if spec.strategy == "linear":
        return (stacked * w).sum(0).astype(np.float32)
    if spec.strategy.startswith("dare_"):  # random pruning, rescaled to keep the expected value
        pruned = np.stack(dare_masks(tensors, spec.density)) * stacked / spec.density
        if spec.strategy == "dare_linear":
            return (pruned * w).sum(0).astype(np.float32)
    else:
        pruned = np.stack([magnitude_prune(t, spec.density) for t in stacked])
    votes = pruned.sum(0) if spec.majority_sign_method == "total" else np.sign(pruned).sum(0)
    agree = np.sign(pruned) == np.where(votes >= 0, 1.0, -1.0)  # [n, ...]
    kept = np.where(agree, pruned * w, 0.0)
    return (kept.sum(0) / np.maximum(agree.sum(0), 1)).astype(np.float32)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    return np.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def merge_lora(members: Sequence[LoRAMember], spec: MergeSpec) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(layer, module) → (A [R, in], B [out, R]) of a scale-1 LoRA, R the largest member rank."""
    rank = max(a.shape[0] for m in members for a, _, _ in m.modules.values())
    out = {}
    for key in sorted({k for m in members for k in m.modules}):
        present = [(m.weight, m.modules[key]) for m in members if key in m.modules]
        a_weights, b_weights = [], []
        for weight, (_, _, scale) in present:
            ws = weight * scale
            a_weights.append(math.copysign(math.sqrt(abs(ws)), ws))
            b_weights.append(math.sqrt(abs(ws)))
        a = combine([_pad_rows(a, rank) for _, (a, _, _) in present], a_weights, spec)  # [R, in]
        b = combine([_pad_rows(b.T, rank).T for _, (_, b, _) in present], b_weights, spec)  # [out, R]
        out[key] = (a, b)
    return out


def merge_s2ft(members: Sequence[S2FTMember], spec: MergeSpec,
               base: s2ft_format.BaseShape) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(layer, module) → (unit index [k], delta) over the union of the members' units."""
    widths = s2ft_format.unit_counts(base)
    out = {}
    for key in sorted({k for m in members for k in m.modules}):
        module, width = key[1], widths[key[1]][1]
        col = s2ft_format.MODULES[module][1] == "col"
        present = [(m.weight, m.modules[key]) for m in members if key in m.modules]
        units = np.unique(np.concatenate([index for _, (index, _) in present]))  # [k] sorted
        lines = s2ft_format.expand(units, width)
        position = {int(line): i for i, line in enumerate(lines)}
        aligned = []
        for _, (index, delta) in present:
            at = np.array([position[int(line)] for line in s2ft_format.expand(index, width)])
            full = np.zeros((delta.shape[0], lines.size) if col else (lines.size, delta.shape[1]), np.float32)
            if col:
                full[:, at] = delta
            else:
                full[at, :] = delta
            aligned.append(full)
        out[key] = (units, combine(aligned, [w for w, _ in present], spec))
    return out


def merge_files(members: Sequence[tuple[Mapping[str, bytes], float]], spec: MergeSpec,
                base: s2ft_format.BaseShape) -> dict[str, dict[str, bytes]]:
    """The merged adapter as folders: {"lora": PEFT LoRA files} and/or {"s2ft": S²FT files}."""
    inputs = MergeInputs()
    for files, weight in members:
        read_member(files, weight, base, inputs)
    folders = {}
    if inputs.lora:
        folders["lora"] = lora_files(merge_lora(inputs.lora, spec))
    if inputs.s2ft:
        folders["s2ft"] = s2ft_files(merge_s2ft(inputs.s2ft, spec, base))
    return folders


def lora_files(modules: Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray]]) -> dict[str, bytes]:
    rank = next(iter(modules.values()))[0].shape[0]
    targets = sorted({m for _, m in modules})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": targets, "bias": "none",
              "use_rslora": False}
    tensors = {}
    for (layer, module), (a, b) in modules.items():
        prefix = f"base_model.model.model.layers.{layer}.{LORA_PARENT[module]}.{module}"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
    return {CONFIG_NAME: json.dumps(config).encode(), SAFETENSORS_NAME: safetensors_file.write_tensors(tensors)}


def s2ft_files(modules: Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray]]) -> dict[str, bytes]:
    config = {"format": s2ft_format.FORMAT, "version": s2ft_format.VERSION,
              "modules": [m for m in s2ft_format.MODULES if any(m == module for _, module in modules)],
              "metadata": {"merged": True}}
    tensors = {}
    for (layer, module), (units, delta) in modules.items():
        tensors[s2ft_format.tensor_key(layer, module, "index")] = units.astype(np.int64)
        tensors[s2ft_format.tensor_key(layer, module, "delta")] = delta
    return s2ft_format.dense_files(json.dumps(config).encode(), tensors)
