"""The V3 extension object ComfyUI asks for the pack's node list."""
from comfy_api.latest import ComfyExtension, io


class LLMDiffAdapterExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from . import NODES

        return list(NODES)


async def comfy_entrypoint() -> LLMDiffAdapterExtension:
    return LLMDiffAdapterExtension()
