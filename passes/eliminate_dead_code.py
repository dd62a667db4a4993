"""eliminate_dead_code: remove nodes none of whose outputs reach a graph output.

    before: a = Relu(x); b = Sigmoid(x)  -> outputs (a)
    after:  a = Relu(x)                  -> outputs (a)
"""

from __future__ import annotations

from applec.ir import Graph


def run(graph: Graph) -> int:
    live = {id(v) for v in graph.outputs}
    removed = 0
    for node in reversed(list(graph.nodes)):
        if any(id(v) in live for v in node.outputs):
            live.update(id(v) for v in node.inputs if v is not None)
            continue
        graph.remove_node(node)
        removed += 1
        source = node.meta.get("onnx_node")
        entry = graph.meta.get("report", {}).get(source)
        if entry is not None and entry.get("status") == "imported":
            entry.update(status="eliminated", reason="its outputs are never used")
    return removed
