"""The Medusa kind (`workers.adapters.medusa`): extra decoding heads for tree speculation. Heads do not change
the base's layers: they attach to an owner — an adapter (its requests speculate with them) or the base
(None: the default heads of base-model requests) — and the speculator evaluates them before each verified
step. Their device is `MedusaDevice`, the heads on the device by owner; they are never fused. In an adapter
folder they live in the `medusa/` subfolder (`attaches_as`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from workers.adapters.kind import AdapterKind, DeviceContext, ReadContext
from workers.adapters.medusa import MedusaHeads, MedusaWeights, is_medusa_folder, read_medusa
from workers.errors import AdapterValidationError

Owner = str | None  # an adapter's name, or None for the base


class MedusaDevice:
    """The heads on the device, by owner, with each set's fingerprint (its acceptance record's key)."""

    def __init__(self, model: nn.Module, ctx: DeviceContext):
        self.lm_head, self.dtype, self.device = model.lm_head, ctx.dtype, ctx.device  # v2 heads share lm_head
        self.depth = ctx.medusa_depth
        self.heads: dict[Owner, MedusaHeads] = {}
        self.fingerprints: dict[Owner, str] = {}

    def attach(self, owner: Owner, weights: MedusaWeights) -> None:
        """Places heads for `owner`, replacing the ones it had."""
        self.heads[owner] = MedusaHeads(weights.to(self.dtype, self.device), self.lm_head)
        self.fingerprints[owner] = weights.fingerprint()

    def detach(self, owner: Owner) -> bool:
        self.fingerprints.pop(owner, None)
        return self.heads.pop(owner, None) is not None

    def heads_of(self, owner: Owner) -> MedusaHeads | None:
        return self.heads.get(owner)

    def check(self, source) -> None:
        """Heads must fill this worker's tree (one head per depth); other kinds' adapters carry none."""
        num_heads = getattr(source, "num_heads", None)
        if num_heads is not None and num_heads < self.depth:
            raise AdapterValidationError(f"this worker's Medusa tree is {self.depth} deep and needs {self.depth} "
                                         f"heads; these heads have {num_heads}")

    # the rest of the device contract: heads attach by owner, so rows carry no Medusa handles

    def fits(self, part) -> bool:
        return True

    def place(self, part):
        raise TypeError("Medusa heads attach to an owner (MedusaDevice.attach), not to a request's rows")

    def free(self, handle) -> None:
        pass

    def set_batch(self, decode, chunks) -> None:
        pass  # the layers read no Medusa weights; the speculator reads `heads_of` before the forward

    def stats(self) -> dict:
        return {"device_medusa_heads": len(self.heads)}


class MedusaKind(AdapterKind):
    name = "medusa"
    attaches_as = "medusa"

    def matches(self, folder: Path) -> bool:
        return is_medusa_folder(folder)

    def read(self, folder: Path, ctx: ReadContext) -> tuple[MedusaWeights, MedusaWeights]:
        heads = read_medusa(folder, ctx.base)
        return heads, heads  # stored and decoded alike: the heads' own fp32 tensors

    def on_device(self, model: nn.Module, ctx: DeviceContext) -> MedusaDevice:
        return MedusaDevice(model, ctx)


MEDUSA = MedusaKind()
