"""UI-format -> API-format workflow conversion (support/workflow_convert.py), against a hand-written
object_info shaped like ComfyUI 0.3.75's. The same converter is checked against the real server's
object_info in tests/e2e/test_comfy_harness.py."""
import copy

import pytest

from support.workflow_convert import UnknownNodeTypes, WorkflowError, ui_to_api

OBJECT_INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
                               "input_order": {"required": ["ckpt_name"]}, "display_name": "Load Checkpoint"},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
                       "input_order": {"required": ["text", "clip"]}},
    "EmptyLatentImage": {"input": {"required": {"width": ["INT", {}], "height": ["INT", {}], "batch_size": ["INT", {}]}}},
    "KSampler": {"input": {"required": {
        "model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}],
        "cfg": ["FLOAT", {}], "sampler_name": [["euler", "dpmpp_2m"], {}], "scheduler": [["normal", "karras"], {}],
        "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}], "latent_image": ["LATENT", {}],
        "denoise": ["FLOAT", {}]}}},
    "LoraLoader": {"input": {"required": {"model": ["MODEL", {}], "clip": ["CLIP", {}], "lora_name": [["l.safetensors"], {}],
                                          "strength_model": ["FLOAT", {}], "strength_clip": ["FLOAT", {}]}}},
    # optional widgets come after required ones; forceInput makes a STRING a socket, not a widget
    "FakeEncode": {"input": {"required": {"text": ["STRING", {}], "extra": ["STRING", {"forceInput": True}]},
                             "optional": {"mode": ["COMBO", {"options": ["none", "concat"]}], "strength": ["FLOAT", {}]}}},
    "LoadImage": {"input": {"required": {"image": [["x.png"], {"image_upload": True}]}}},
}


def link(link_id, origin, origin_slot, target, target_slot, kind):
    return [link_id, origin, origin_slot, target, target_slot, kind]


def base_workflow():
    """Checkpoint -> (Reroute) -> KSampler, prompt text from a PrimitiveNode, a Note and a group."""
    return {
        "nodes": [
            {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [], "widgets_values": ["b.safetensors"]},
            {"id": 20, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}]},
            {"id": 6, "type": "CLIPTextEncode", "mode": 0, "title": "Positive",
             "inputs": [{"name": "clip", "type": "CLIP", "link": 3},
                        {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 10}],
             "widgets_values": ["stale text that the primitive overrides"]},
            {"id": 7, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 5}],
             "widgets_values": ["blurry"]},
            {"id": 5, "type": "EmptyLatentImage", "mode": 0, "inputs": [], "widgets_values": [512, 768, 2]},
            {"id": 3, "type": "KSampler", "mode": 0,
             "inputs": [{"name": "model", "type": "MODEL", "link": 2}, {"name": "positive", "type": "CONDITIONING", "link": 4},
                        {"name": "negative", "type": "CONDITIONING", "link": 6}, {"name": "latent_image", "type": "LATENT", "link": 7}],
             "widgets_values": [156680208700286, "randomize", 20, 8.0, "dpmpp_2m", "karras", 1.0]},
            {"id": 30, "type": "PrimitiveNode", "mode": 0, "outputs": [{"name": "STRING", "type": "STRING", "links": [10]}],
             "widgets_values": ["a red cube"]},
            {"id": 40, "type": "Note", "mode": 0, "widgets_values": ["put the checkpoint in models/checkpoints"]},
            {"id": 41, "type": "MarkdownNote", "mode": 0, "widgets_values": ["# hello"]},
        ],
        "links": [link(1, 4, 0, 20, 0, "MODEL"), link(2, 20, 0, 3, 0, "MODEL"), link(3, 4, 1, 6, 0, "CLIP"),
                  link(4, 6, 0, 3, 1, "CONDITIONING"), link(5, 4, 1, 7, 0, "CLIP"), link(6, 7, 0, 3, 2, "CONDITIONING"),
                  link(7, 5, 0, 3, 3, "LATENT"), link(10, 30, 0, 6, 1, "STRING")],
        "groups": [{"title": "Prompts", "bounding": [0, 0, 100, 100]}],
        "version": 0.4,
    }


def test_links_widgets_seed_control_primitive_reroute_and_notes():
    api = ui_to_api(base_workflow(), OBJECT_INFO)

    assert set(api) == {"4", "6", "7", "5", "3"}  # Reroute, PrimitiveNode and notes never reach the server
    assert api["4"] == {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"},
                        "_meta": {"title": "Load Checkpoint"}}
    assert api["3"]["inputs"] == {
        "seed": 156680208700286, "steps": 20, "cfg": 8.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
        "denoise": 1.0,  # "randomize" (control_after_generate) was skipped, so nothing shifted
        "model": ["4", 0],  # through the Reroute
        "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}
    assert api["6"]["inputs"] == {"text": "a red cube", "clip": ["4", 1]}  # the primitive's value wins
    assert api["6"]["_meta"]["title"] == "Positive"
    assert api["5"]["inputs"] == {"width": 512, "height": 768, "batch_size": 2}


def test_object_form_links_give_the_same_prompt():
    ui = base_workflow()
    ui["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), l)) for l in ui["links"]]
    assert ui_to_api(ui, OBJECT_INFO) == ui_to_api(base_workflow(), OBJECT_INFO)


def test_seed_named_input_skips_the_control_value_without_the_option():
    info = copy.deepcopy(OBJECT_INFO)
    info["KSampler"]["input"]["required"]["seed"] = ["INT", {}]  # older servers: only the name tells
    assert ui_to_api(base_workflow(), info)["3"]["inputs"]["steps"] == 20


def test_optional_widgets_follow_required_ones_and_force_input_is_a_socket():
    ui = {"nodes": [
        {"id": 1, "type": "FakeEncode", "mode": 0, "inputs": [{"name": "extra", "type": "STRING", "link": 1}],
         "widgets_values": ["hello", "concat", 0.5]},
        {"id": 2, "type": "PrimitiveNode", "mode": 0, "widgets_values": ["from a primitive"]}],
        "links": [link(1, 2, 0, 1, 1, "STRING")]}
    assert ui_to_api(ui, OBJECT_INFO)["1"]["inputs"] == {"text": "hello", "mode": "concat", "strength": 0.5,
                                                         "extra": "from a primitive"}


def test_upload_button_value_is_skipped():
    ui = {"nodes": [{"id": 1, "type": "LoadImage", "mode": 0, "widgets_values": ["x.png", "image"]}], "links": []}
    assert ui_to_api(ui, OBJECT_INFO)["1"]["inputs"] == {"image": "x.png"}


def test_bypassed_node_passes_its_matching_input_through():
    ui = base_workflow()
    ui["nodes"].append({"id": 50, "type": "LoraLoader", "mode": 4,
                        "inputs": [{"name": "model", "type": "MODEL", "link": 20}, {"name": "clip", "type": "CLIP", "link": 21}],
                        "widgets_values": ["l.safetensors", 1.0, 1.0]})
    ui["links"] += [link(20, 4, 0, 50, 0, "MODEL"), link(21, 4, 1, 50, 1, "CLIP")]
    # the positive prompt's CLIP now comes from the LoRA's CLIP output (slot 1), the sampler's MODEL from slot 0
    ui["links"] = [l for l in ui["links"] if l[0] not in (2, 3)]
    ui["links"] += [link(2, 50, 0, 3, 0, "MODEL"), link(3, 50, 1, 6, 0, "CLIP")]

    api = ui_to_api(ui, OBJECT_INFO)

    assert "50" not in api
    assert api["3"]["inputs"]["model"] == ["4", 0]
    assert api["6"]["inputs"]["clip"] == ["4", 1]


def test_muted_node_is_dropped_with_its_links():
    ui = base_workflow()
    next(n for n in ui["nodes"] if n["id"] == 7)["mode"] = 2
    api = ui_to_api(ui, OBJECT_INFO)
    assert "7" not in api
    assert "negative" not in api["3"]["inputs"]  # ComfyUI's validation will name the missing input


def test_unknown_node_types_are_listed():
    ui = base_workflow()
    ui["nodes"] += [{"id": 60, "type": "LLMDiffTextEncode", "mode": 0, "widgets_values": []},
                    {"id": 61, "type": "LLMDiffTextEncode", "mode": 0, "widgets_values": []},
                    {"id": 62, "type": "SomethingElse", "mode": 0, "widgets_values": []}]
    with pytest.raises(UnknownNodeTypes, match=r"LLMDiffTextEncode \(node 60, 61\), SomethingElse \(node 62\)") as err:
        ui_to_api(ui, OBJECT_INFO)
    assert err.value.missing == {"LLMDiffTextEncode": ["60", "61"], "SomethingElse": ["62"]}


@pytest.mark.parametrize("values", [[512, 768], [512, 768, 2, 9]])
def test_widget_count_mismatch_names_the_node(values):
    ui = {"nodes": [{"id": 5, "type": "EmptyLatentImage", "mode": 0, "widgets_values": values}], "links": []}
    with pytest.raises(WorkflowError, match=r"node 5 \(EmptyLatentImage\) has \d widget values"):
        ui_to_api(ui, OBJECT_INFO)


def test_api_format_input_is_refused_clearly():
    with pytest.raises(WorkflowError, match="not a UI-format workflow"):
        ui_to_api({"3": {"class_type": "KSampler", "inputs": {}}}, OBJECT_INFO)


def test_optional_widgets_added_after_saving_get_their_defaults():
    info = copy.deepcopy(OBJECT_INFO)
    info["FakeEncode"]["input"]["optional"]["strength"] = ["FLOAT", {"default": 1.5}]
    ui = {"nodes": [{"id": 1, "type": "FakeEncode", "mode": 0, "widgets_values": ["hello", "concat"]}], "links": []}
    assert ui_to_api(ui, info)["1"]["inputs"] == {"text": "hello", "mode": "concat", "strength": 1.5}
    with pytest.raises(WorkflowError, match="has 1 widget values"):  # a required or default-less one is still an error
        ui_to_api({"nodes": [{"id": 1, "type": "FakeEncode", "mode": 0, "widgets_values": ["hello"]}], "links": []}, info)
