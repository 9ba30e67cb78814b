"""vLLM's routes beyond OpenAI's: /tokenize, /detokenize, /version, and (admin key) /v1/load_lora_adapter,
/v1/unload_lora_adapter. Answers are shaped like vLLM's (load/unload answer plain text)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from server.auth import AdminTenant, CurrentTenant
from server.dependencies import Vllm
from server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraAdapterRequest,
)
from server.version import VERSION

router = APIRouter(responses={"default": {"model": ErrorResponse}})


@router.post("/tokenize", response_model=TokenizeResponse | list[dict])
async def tokenize(body: TokenizeRequest, service: Vllm, tenant: CurrentTenant):
    return await service.tokenize(body, tenant)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, service: Vllm, tenant: CurrentTenant):
    return DetokenizeResponse(prompt=await service.detokenize(body, tenant))


@router.get("/version")
async def version() -> dict:
    return {"version": VERSION}


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraAdapterRequest, service: Vllm, admin: AdminTenant) -> str:
    stored = await service.load_lora(admin, body)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully (version {stored.version})."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, service: Vllm, admin: AdminTenant) -> str:
    await service.unload_lora(admin, body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
