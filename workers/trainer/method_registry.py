"""The training methods, registered once: a method's name (`method["type"]` of a job, validated by
`adapters_store.training_methods`) → the function that turns a spec into a `MethodSetup`. The loop
(`training.py`) looks a method up here and imports no method module; adding a method means one module that
implements `method_contract` and one line below."""

from __future__ import annotations

from collections.abc import Callable

from workers.trainer import lora, medusa, s2ft
from workers.trainer.method_contract import MethodSetup, TrainingSpec

METHODS: dict[str, Callable[[TrainingSpec], MethodSetup]] = {
    "lora": lora.setup,
    "s2ft": s2ft.setup,
    "medusa": medusa.setup,
}


def setup(spec: TrainingSpec) -> MethodSetup:
    """The registered method's setup for this job (a name not registered is a bug upstream: the gateway
    validated the method against `adapters_store.training_methods`)."""
    method = METHODS.get(spec.method["type"])
    if method is None:
        raise ValueError(f"unknown training method {spec.method['type']!r}")
    return method(spec)
