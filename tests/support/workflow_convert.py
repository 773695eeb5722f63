"""Convert a ComfyUI workflow as the UI saves it (workflows/*.json) into the API prompt POST /prompt takes.

The tests queue the shipped workflow files themselves, so what users drag onto the canvas is what is
tested. ComfyUI's frontend does this conversion in JavaScript (`graphToPrompt`); this is the same
mapping in Python, driven by the server's /object_info:

- `widgets_values` are positional: they fill a node's widget inputs in /object_info order (required,
  then optional), where a widget input is a COMBO / INT / FLOAT / STRING / BOOLEAN without `forceInput`.
  Optional widgets added to a node after the workflow was saved (no value left for them) get their
  default, as in the frontend.
  The frontend stores one extra value after a widget with a "control after generate" companion (INT
  inputs marked `control_after_generate`, and any INT named seed / noise_seed) and after an upload
  button (`image_upload` and the like): those are skipped.
- A link `[id, from_node, from_slot, to_node, to_slot, type]` (or the newer object form) becomes
  `[str(from_node), from_slot]`, also for a widget converted to an input (an input with a "widget" key).
- Virtual nodes never reach the server: Note and MarkdownNote are dropped, a Reroute is followed to
  its source, a PrimitiveNode's value is written into every input it feeds.
- A muted node (mode 2) is dropped with the links out of it; a bypassed node (mode 4) passes, for each
  link out of it, its first input of the same type through (the frontend's rule).
- Groups and other UI-only data are ignored. Unknown node types raise UnknownNodeTypes naming them.
"""
from __future__ import annotations

MODE_MUTED = 2
MODE_BYPASS = 4
DROPPED_NODES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}


class WorkflowError(ValueError):
    """The UI workflow cannot be converted; the message says which node and why."""


class UnknownNodeTypes(WorkflowError):
    def __init__(self, missing: dict[str, list[str]]):
        self.missing = missing
        listed = ", ".join(f"{t} (node {', '.join(ids)})" for t, ids in sorted(missing.items()))
        super().__init__(f"the workflow uses node types this ComfyUI does not know: {listed}. "
                         "Install the custom nodes that provide them (or check that our pack imported: see the server log).")


def _links(ui: dict) -> dict[int, tuple[int, int, str]]:
    """link id -> (origin node id, origin slot, type), for both the list and the object link format."""
    out = {}
    for link in ui.get("links", []):
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type", ""))
        else:
            link_id, origin, slot, _target, _target_slot, link_type = link[:6]
            out[link_id] = (origin, slot, link_type)
    return out


def _input_specs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of every required then optional input, in the order the node declares them."""
    inputs = info.get("input", {})
    order = info.get("input_order", {})
    specs = []
    for section in ("required", "optional"):
        declared = inputs.get(section, {}) or {}
        for name in order.get(section, list(declared)):
            specs.append((name, declared[name]))
    return specs


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_values(name: str, spec: list) -> int:
    """How many frontend-only values follow this widget's value in widgets_values."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extra = 0
    if spec[0] == "INT" and (options.get("control_after_generate") or name in SEED_NAMES):
        extra += 1
    if any(key.endswith("_upload") and value for key, value in options.items()):
        extra += 1
    return extra


def _widget_inputs(node: dict, info: dict) -> dict:
    """Map a node's widgets_values onto its widget inputs by position (see the module doc)."""
    values = node.get("widgets_values", [])
    widgets = [(name, spec) for name, spec in _input_specs(info) if _is_widget(spec)]
    if isinstance(values, dict):  # some nodes save their widgets by name
        return {name: values[name] for name, _ in widgets if name in values}
    optional = set(info.get("input", {}).get("optional", {}) or {})
    out, pos = {}, 0
    for name, spec in widgets:
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if pos >= len(values) and name in optional and "default" in options:
            # A workflow saved before the node gained this optional input: the frontend gives the new
            # widget its default (it fills widgets from widgets_values by position and stops at the end).
            out[name] = options["default"]
            continue
        if pos >= len(values):
            raise WorkflowError(
                f"node {node['id']} ({node['type']}) has {len(values)} widget values but its inputs need more: "
                f"widgets {[n for n, _ in widgets]}, values {values}. The workflow was saved for another version of this node.")
        out[name] = values[pos]
        pos += 1 + _extra_values(name, spec)
    if pos != len(values):
        raise WorkflowError(
            f"node {node['id']} ({node['type']}) has {len(values)} widget values, expected {pos}: "
            f"widgets {[n for n, _ in widgets]}, values {values}. The workflow was saved for another version of this node.")
    return out


def ui_to_api(ui_workflow: dict, object_info: dict) -> dict:
    """Return the API-format prompt {node id: {"class_type", "inputs", "_meta"}} for a UI-format workflow."""
    if "nodes" not in ui_workflow:
        raise WorkflowError("not a UI-format workflow (no 'nodes' list); API-format prompts need no conversion")
    nodes = {node["id"]: node for node in ui_workflow["nodes"]}
    links = _links(ui_workflow)

    missing: dict[str, list[str]] = {}
    for node in nodes.values():
        if node["type"] not in object_info and node["type"] not in DROPPED_NODES | {"Reroute", "PrimitiveNode"}:
            missing.setdefault(node["type"], []).append(str(node["id"]))
    if missing:
        raise UnknownNodeTypes(missing)

    def source(link_id, wanted_type: str, seen=()):
        """Follow a link through Reroutes and bypassed nodes: ("link", [id, slot]), ("value", v) or None."""
        if link_id is None or link_id not in links:
            return None
        origin_id, slot, _ = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None or origin_id in seen:
            return None
        seen = seen + (origin_id,)
        if origin.get("mode") == MODE_MUTED:
            return None
        if origin["type"] == "PrimitiveNode":
            return ("value", origin["widgets_values"][0])
        if origin["type"] == "Reroute":
            return source(origin["inputs"][0].get("link"), wanted_type, seen)
        if origin.get("mode") == MODE_BYPASS:
            inputs = origin.get("inputs", [])
            for index in [slot] + list(range(len(inputs))):
                if index < len(inputs) and inputs[index].get("type") == wanted_type:
                    return source(inputs[index].get("link"), wanted_type, seen)
            return None
        return ("link", [str(origin_id), slot])

    prompt = {}
    for node_id, node in nodes.items():
        if node["type"] in DROPPED_NODES | {"Reroute", "PrimitiveNode"} or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info[node["type"]]
        inputs = _widget_inputs(node, info)
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue  # an unlinked socket, or a widget shown as a socket: its widget value stands
            found = source(slot["link"], slot.get("type", ""))
            if found is None:
                inputs.pop(slot["name"], None)  # fed by a muted node: ComfyUI's validation reports it if required
            else:
                inputs[slot.get("widget", {}).get("name", slot["name"])] = found[1]
        title = node.get("title") or info.get("display_name") or node["type"]
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
    return prompt
