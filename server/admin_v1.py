"""The /v1 admin API: upload, list, load and unload task adapters (admin token required)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError

from .catalog import TaskEntry
from .dataplane import DataPlane
from .errors import BadRequest, UnsupportedMedia
from .rest_v1 import ERROR_RESPONSES
from .schemas import AdapterList, CacheView, DeviceView, LoadRequest, TaskName, TaskView, UnloadResponse, UploadResponse, VersionView

ADMIN_PREFIX = "/v1/adapters"
PACKAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class AdapterEndpoints:
    """The admin routes over one data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def version_view(self, entry: TaskEntry, version: int) -> VersionView:
        """One stored version: its size, age, where it is loaded, and whether unpinned requests get it."""
        registry, key = self.plane.registry, (entry.name, version)
        info, slot = entry.versions[version], registry.slot_of(key)
        return VersionView(
            version=version,
            bytes=info.nbytes,
            created_at=info.manifest.created_at,
            location=registry.location(key),
            slot=slot,
            device=None if slot is None else str(registry.engine.device),
            serving=version == entry.serving,
        )

    def task_view(self, entry: TaskEntry) -> TaskView:
        serving = entry.manifest
        versions = [self.version_view(entry, version) for version in sorted(entry.versions)]
        return TaskView(
            name=entry.name,
            kind=serving.kind,
            enabled=entry.enabled,
            serving_version=entry.serving,
            labels=len(serving.labels),
            input_size=serving.input.size,
            versions=versions,
        )

    async def list_adapters(self) -> AdapterList:
        registry = self.plane.registry
        await registry.refresh()
        engine, slots, cache = registry.engine, registry.slots, registry.loader.cache
        return AdapterList(
            tasks=[self.task_view(entry) for entry in self.plane.tasks()],
            device=DeviceView(
                device=str(engine.device),
                dtype=str(engine.dtype).removeprefix("torch."),
                slots=engine.num_slots,
                slots_used=len(slots.residents),
                slot_bytes=engine.slot_nbytes,
                resident_bytes=slots.resident_bytes(),
                budget_bytes=slots.budget_bytes,
            ),
            cpu_cache=CacheView(entries=len(cache), bytes=cache.nbytes, capacity_bytes=cache.capacity),
        )

    async def get_adapter(self, task: TaskName) -> TaskView:
        return self.task_view((await self.plane.task(task)).entry)

    async def upload_adapter(
        self,
        task: TaskName,
        request: Request,
        version: int | None = Query(default=None, ge=1, description="store it as this version (default: the task's next)"),
    ) -> UploadResponse:
        """Store the package in the body as a new version of `task` and serve it; the body is the file itself."""
        registry = self.plane.registry  # 503 while the server loads, before the body is judged
        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            raise UnsupportedMedia(
                f"the package came as a multipart form (curl -F); send the file itself as the body: "
                f"curl -X PUT --data-binary @{task}.safetensors -H 'Authorization: Bearer TOKEN' http://SERVER{request.url.path}"
            )
        uploaded = await registry.upload(task, await request.body(), version)
        return UploadResponse(**self.task_view(uploaded.entry).model_dump(), version=uploaded.version)

    async def load_adapter(self, task: TaskName, request: Request, version: int | None = Query(default=None, ge=1)) -> TaskView:
        registry = self.plane.registry  # 503 while the server loads, before the body is judged
        body = await request.body()
        if body.strip():
            try:
                version = LoadRequest.model_validate_json(body).version or version
            except ValidationError as exc:
                raise BadRequest(f"invalid JSON body: {exc.errors(include_url=False)[0]['msg']}") from None
        return self.task_view(await registry.load(task, version))

    async def unload_adapter(self, task: TaskName, purge: bool = Query(default=False)) -> UnloadResponse:
        await self.plane.registry.unload(task, purge=purge)
        return UnloadResponse(task=task, unloaded=True, purged=purge)


def admin_router(plane: DataPlane, require_admin) -> APIRouter:
    """The /v1/adapters routes, each guarded by `require_admin`."""
    endpoints = AdapterEndpoints(plane)
    router = APIRouter(prefix=ADMIN_PREFIX, tags=["adapters"], dependencies=[Depends(require_admin)], responses=ERROR_RESPONSES)
    add = router.add_api_route
    add("", endpoints.list_adapters, methods=["GET"], response_model=AdapterList, summary="List tasks, versions and where they are loaded")
    add("/{task}", endpoints.get_adapter, methods=["GET"], response_model=TaskView, summary="One task")
    add(
        "/{task}",
        endpoints.upload_adapter,
        methods=["PUT"],
        response_model=UploadResponse,
        status_code=201,
        openapi_extra=PACKAGE_BODY,
        summary="Upload a package (validated, stored, then hot-loaded)",
    )
    add("/{task}/load", endpoints.load_adapter, methods=["POST"], response_model=TaskView, summary="Load a stored version")
    add("/{task}", endpoints.unload_adapter, methods=["DELETE"], response_model=UnloadResponse, summary="Unload (and optionally purge)")
    return router
