"""Loading and unloading a model in whichever engine serves it: the tensor registry, or the
generation engines for text-generation models. Shared by the Models page and export jobs.
Never imports the API layer."""

from __future__ import annotations

import anyio

from appliance.admin.context import AdminContext


def is_generation(ctx: AdminContext, name: str) -> bool:
    """True when `name` is served by the generation engines rather than the tensor registry."""
    if ctx.generation is None:
        return False
    serving = ctx.registry.repository.serving_version(name)
    return serving is not None and serving.manifest.task == "text-generation"


async def load_model(ctx: AdminContext, name: str) -> tuple[str, str | None]:
    """Load (or reload) the serving version of `name` in whichever engine serves it."""
    if await anyio.to_thread.run_sync(is_generation, ctx, name) and ctx.generation is not None:
        state = await ctx.generation.load(name)
        return state.status, state.reason
    loaded = await ctx.registry.load(name)
    return loaded.status, loaded.reason


async def unload_model(ctx: AdminContext, name: str) -> None:
    """Stop serving `name`; it stays loaded nowhere until deployed again."""
    if await anyio.to_thread.run_sync(is_generation, ctx, name) and ctx.generation is not None:
        await ctx.generation.unload(name)
    else:
        await ctx.registry.unload(name)
