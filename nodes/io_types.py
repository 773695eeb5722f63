"""The pack's wire types. Their names are saved in workflows: never rename them."""
from comfy_api.latest import io

LLMType = io.Custom("LLMDIFF_LLM")  # carries nodes.handles.LLMHandle
AdapterType = io.Custom("LLMDIFF_ADAPTER")  # carries nodes.handles.AdapterHandle


def advanced(widget: io.Input) -> io.Input:
    """Mark a rare knob `advanced` (the frontend folds it away); 0.3.75's widget constructors lack the argument."""
    widget.extra_dict["advanced"] = True
    return widget
