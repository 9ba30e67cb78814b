"""OpenAI's fine-tune request and response shapes ↔ adapterd's flat method (`adapters_store.training_methods`).

Accepted on create (each hyperparameter "auto" or a number; "auto" is resolved from the training file's size,
`adapters_store.auto_hyperparameters`):

    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, ...}}}   # supervised = LoRA
    method = {"type": "lora" | "s2ft" | "medusa", "<type>": {"hyperparameters": {"rank": 16, ...}}}
    method = {"type": "lora", "rank": 16, "epochs": 2, ...}                                    # flat (adapterd's own)
    hyperparameters = {"n_epochs": ..., "batch_size": ..., "learning_rate_multiplier": ...}    # OpenAI's older form

`n_epochs` is `epochs` by OpenAI's name. Returned on the job: `hyperparameters` (OpenAI's three, resolved)
and `method` in the nested form with every resolved hyperparameter of the method.
"""

from __future__ import annotations

OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
SUPERVISED = "supervised"  # OpenAI's name for plain supervised fine-tuning: a LoRA here
UNSUPPORTED_TYPES = {"dpo": "preference (DPO) training", "reinforcement": "reinforcement fine-tuning"}
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def flat_method(method: dict | None, hyperparameters: dict | None) -> tuple[dict, str]:
    """(the flat method for `validate_method`, the type name as requested). Raises ValueError."""
    method = {"type": SUPERVISED} if method is None else method
    if not isinstance(method, dict):
        raise ValueError("method must be an object with a 'type'")
    requested = method.get("type")
    if requested in UNSUPPORTED_TYPES:
        raise ValueError(f"method.type {requested!r} ({UNSUPPORTED_TYPES[requested]}) is not supported; "
                         "use 'supervised' (LoRA), 'lora', 's2ft' or 'medusa'")
    nested = requested if isinstance(requested, str) and requested in method else None
    flat = {k: v for k, v in method.items() if k not in ("type", nested)}
    if nested is not None:
        block = method[nested]
        if not isinstance(block, dict) or set(block) - {"hyperparameters"}:
            raise ValueError(f'method.{nested} must be {{"hyperparameters": {{...}}}}')
        if flat:
            raise ValueError(f"method: hyperparameters {sorted(flat)} given both flat and under "
                             f"method.{nested}.hyperparameters; use one form")
        flat = _object(block.get("hyperparameters") or {}, f"method.{nested}.hyperparameters")
    if hyperparameters is not None:
        if flat:
            raise ValueError("hyperparameters: given both at the top level and in method; the top-level "
                             "`hyperparameters` is OpenAI's older form of method.<type>.hyperparameters")
        flat = _object(hyperparameters, "hyperparameters")
    if "n_epochs" in flat:
        if "epochs" in flat:
            raise ValueError("method: n_epochs and epochs are the same hyperparameter; give one")
        flat["epochs"] = flat.pop("n_epochs")
    kind = "lora" if requested == SUPERVISED else requested
    return {"type": kind, **flat}, requested


def _object(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object")
    return dict(value)


def check_metadata(metadata: dict | None) -> dict | None:
    """OpenAI's limits: at most 16 pairs, string keys up to 64 characters, string values up to 512."""
    if metadata is None:
        return None
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata: at most {MAX_METADATA_KEYS} keys, got {len(metadata)}")
    for key, value in metadata.items():
        if not 0 < len(key) <= MAX_METADATA_KEY:
            raise ValueError(f"metadata: key {key[:80]!r} must have 1 to {MAX_METADATA_KEY} characters")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise ValueError(f"metadata[{key!r}]: a string of at most {MAX_METADATA_VALUE} characters")
    return dict(metadata)


def hyperparameters_view(method: dict) -> dict:
    """OpenAI's `hyperparameters` of a job: its resolved n_epochs, batch_size, learning_rate_multiplier."""
    return {"n_epochs": method.get("epochs"), "batch_size": method.get("batch_size"),
            "learning_rate_multiplier": method.get("learning_rate_multiplier")}


def method_view(method: dict, requested: str | None) -> dict:
    """The job's method in OpenAI's nested form, every resolved hyperparameter under its name."""
    kind = requested or method["type"]
    rest = {k: v for k, v in method.items() if k not in ("type", "epochs")}
    return {"type": kind, kind: {"hyperparameters": {**hyperparameters_view(method), **rest}}}
