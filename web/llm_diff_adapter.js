// Frontend behaviour of the LLM Diff Adapter nodes that the node schema cannot express in ComfyUI 0.3.75's frontend.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "LLMDiffAdapter.Widgets",
  nodeCreated(node) {
    if (!String(node.comfyClass ?? "").startsWith("LLMDiff")) return;
    // The schema marks rare knobs `advanced`; frontend 1.32 copies that into the widget's options but only
    // folds away widgets whose own `advanced` flag is set (right-click > Show Advanced brings them back).
    let folded = false;
    for (const widget of node.widgets ?? []) {
      if (widget.options?.advanced && !widget.advanced) {
        widget.advanced = true;
        folded = true;
      }
    }
    // "Same seed, same text": start new Enhance prompt nodes on a fixed seed instead of the frontend's
    // "randomize", which would rewrite the prompt on every run. A workflow's saved choice still wins,
    // because loading a workflow sets the widget values after this runs.
    if (node.comfyClass === "LLMDiffEnhancePrompt") {
      const control = node.widgets?.find((w) => w.name === "control_after_generate");
      if (control) control.value = "fixed";
    }
    if (folded) node.setSize([node.size[0], node.computeSize()[1]]);
  },
});
