// Frontend behaviour of the LLM Diff Adapter nodes that the node schema cannot express in ComfyUI 0.3.75's frontend.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "LLMDiffAdapter.Widgets",
  nodeCreated(node) {
    if (!String(node.comfyClass ?? "").startsWith("LLMDiff")) return;
    // The schema marks rare knobs `advanced`. Frontend 1.32 copies that into the widget's options only, and
    // even a widget's own `advanced` flag just stops it being drawn: the node keeps its room. A hidden
    // widget gives its room up, so an advanced widget is hidden until the node's "Show Advanced" (right-click
    // menu, which appears because `advanced` is set) turns the node's showAdvanced on.
    let folded = false;
    for (const widget of node.widgets ?? []) {
      if (widget.options?.advanced && !widget.advanced) {
        widget.advanced = true;
        let hidden = false;
        Object.defineProperty(widget, "hidden", {
          configurable: true,
          get: () => hidden || !node.showAdvanced,
          set: (value) => { hidden = value; },
        });
        // Frontend 1.32's widget layout reserves a row for every widget, drawn or not, unless the widget sizes itself.
        widget.computeSize = (width) =>
          widget.hidden ? [0, -4] : [width ?? node.size[0], LiteGraph.NODE_WIDGET_HEIGHT];
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
