"""``kiln dump``: what the compiler did to a model, as text, JSON, DOT, SVG or HTML.

The same view for every source: an ONNX file, a saved Kiln graph (.json), a built-in
example model, or ``package.module:factory``. Stages are the imported graph (``input``)
and the graph after each pass of the pipeline; kernel groups come from the partition.
"""
from __future__ import annotations

import difflib
import html
import json
import re

from kiln.ir import Graph, OpKind, format_graph, to_json
from kiln.ir.cost import node_bytes, node_flops
from kiln.ir.printer import format_attrs

from .errors import KilnError
from kiln.ir.record import record

FORMATS = ("text", "json", "dot", "svg", "html")


@record(frozen=False, slots=False)
class Stage:
    label: str  # "input", "fold/fold_bn", ...
    phase: str
    name: str
    graph: Graph


def import_model(ref: str) -> Graph:
    """Import a model reference to Kiln IR without optimizing it."""
    import os

    from .modelref import load_model

    if ref.endswith(".json") and os.path.exists(ref):
        from kiln.ir import SerializeError, load

        try:
            return load(ref)
        except (SerializeError, ValueError, KeyError) as e:
            raise KilnError(f"{ref}: not a Kiln graph file ({e})") from None
    model, inputs = load_model(ref)
    if inputs is None:  # ONNX
        from kiln.frontends.onnx_import import from_onnx, load_onnx

        return from_onnx(load_onnx(model), None, name=os.path.splitext(os.path.basename(ref))[0])
    from kiln.frontends.torch_export import export_program, from_exported

    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    try:
        ep = export_program(model, inputs)
    except Exception as e:
        raise KilnError(f"torch.export could not trace {ref}: {type(e).__name__}") from e
    return from_exported(ep, ref.split(":")[-1]).graph


def run_stages(graph: Graph, select=None) -> list[Stage]:
    """The imported graph followed by the graph after every pass that ran."""
    from kiln.passes.pipeline import run_pipeline

    stages = [Stage("input", "input", "input", graph)]
    run_pipeline(graph, select=select, on_pass=lambda rec, before, after: stages.append(
        Stage(f"{rec.phase}/{rec.name}", rec.phase, rec.name, after)))
    return stages


def pick(stages: list[Stage], name: str, before: bool = False) -> Graph:
    """The graph after (or before) a pass or phase; a phase means its last (first) pass."""
    hits = [i for i, s in enumerate(stages) if name in (s.label, s.name, s.phase)]
    if not hits:
        names = sorted({s.name for s in stages} | {s.phase for s in stages})
        raise KilnError(f"no pass or phase {name!r} ran; stages: {', '.join(names)}")
    if before:
        return stages[max(hits[0] - 1, 0)].graph
    return stages[hits[-1]].graph


# ----------------------------------------------------------------------------- view model
def view(graph: Graph) -> dict:
    """Nodes, edges, kernel groups and fallbacks, as plain data (drives DOT/SVG/HTML)."""
    from kiln.passes.partition import partition

    part = partition(graph)
    gid = {n: g.id for g in part.groups for n in g.nodes}
    ids = {}
    nodes = []
    for v in graph.inputs:
        ids[v] = len(nodes)
        nodes.append({"id": len(nodes), "kind": "input", "label": v.name, "type": repr(v.type), "scope": "",
                      "group": None})
    for n in graph.nodes:
        i = len(nodes)
        for o in n.outputs:
            ids[o] = i
        attrs = format_attrs(n.attrs)
        label = n.op.value
        act = getattr(n.attrs, "activation", None)
        if n.op in (OpKind.LINEAR, OpKind.CONV2D) and len(n.inputs) > 3 and n.inputs[3] is not None:
            label += " +residual"
        if act is not None and act.value != "none":
            label += f" +{act.value}"
        nodes.append({"id": i, "kind": "op", "label": label, "type": ", ".join(repr(o.type) for o in n.outputs),
                      "attrs": attrs, "scope": n.scope, "group": gid.get(n), "fallback": n.op is OpKind.FALLBACK,
                      "reason": getattr(n.attrs, "reason", "") if n.op is OpKind.FALLBACK else "",
                      "outputs": [o.name for o in n.outputs]})
    edges = []
    for n in graph.nodes:
        dst = ids[n.outputs[0]]
        for v in n.inputs:
            if v is not None and v in ids:
                edges.append([ids[v], dst])
    outs = [ids[v] for v in graph.outputs if v in ids]
    groups = [{"id": g.id, "kind": g.kind, "ops": g.ops} for g in part.groups]
    return {"name": graph.name, "nodes": nodes, "edges": edges, "outputs": outs, "groups": groups,
            "constants": len(graph.constants), "parameters": graph.num_parameters()}


def _layers(v: dict) -> dict[int, int]:
    depth = {}
    preds: dict[int, list[int]] = {}
    for a, b in v["edges"]:
        preds.setdefault(b, []).append(a)
    for nd in v["nodes"]:  # nodes are in topological order
        depth[nd["id"]] = 1 + max((depth[p] for p in preds.get(nd["id"], [])), default=-1)
    return depth


_PALETTE = ["#cfe2f3", "#d9ead3", "#fff2cc", "#f4cccc", "#d9d2e9", "#fce5cd", "#d0e0e3", "#ead1dc"]


def _fill(nd) -> str:
    if nd["kind"] == "input":
        return "#ffffff"
    if nd.get("fallback"):
        return "#f8b4b4"
    g = nd.get("group")
    return _PALETTE[g % len(_PALETTE)] if g is not None else "#eeeeee"


def render_dot(graph: Graph) -> str:
    v = view(graph)
    lines = [f'digraph "{graph.name}" {{', "  rankdir=TB; node [shape=box, style=\"rounded,filled\", "
             "fontname=\"monospace\", fontsize=10];"]
    by_group: dict = {}
    for nd in v["nodes"]:
        by_group.setdefault(nd["group"], []).append(nd)
    for g, nds in by_group.items():
        indent = "  "
        if g is not None:
            lines.append(f"  subgraph cluster_{g} {{ label=\"group {g}\"; style=dashed;")
            indent = "    "
        for nd in nds:
            label = f"{nd['label']}\\n{nd['type']}" + (f"\\n{nd['scope']}" if nd["scope"] else "")
            shape = ", shape=ellipse" if nd["kind"] == "input" else ""
            color = ", color=red, penwidth=2" if nd.get("fallback") else ""
            lines.append(f'{indent}n{nd["id"]} [label="{_dot_escape(label)}", fillcolor="{_fill(nd)}"{shape}{color}];')
        if g is not None:
            lines.append("  }")
    for a, b in v["edges"]:
        lines.append(f"  n{a} -> n{b};")
    for o in v["outputs"]:
        lines.append(f'  out{o} [label="output", shape=plaintext]; n{o} -> out{o};')
    lines.append("}")
    return "\n".join(lines)


def _dot_escape(s: str) -> str:
    return s.replace('"', '\\"')


def render_svg(graph: Graph, v: dict | None = None) -> str:
    """A self-contained SVG: a layered top-down layout (layer = longest path from the inputs)."""
    v = v or view(graph)
    depth = _layers(v)
    rows: dict[int, list[dict]] = {}
    for nd in v["nodes"]:
        rows.setdefault(depth[nd["id"]], []).append(nd)
    W, H, GX, GY = 210, 40, 24, 26
    width = max(len(r) for r in rows.values()) * (W + GX) + GX if rows else 100
    height = (max(rows) + 1) * (H + GY) + GY if rows else 100
    pos = {}
    for d, nds in rows.items():
        off = (width - len(nds) * (W + GX) + GX) / 2
        for i, nd in enumerate(nds):
            pos[nd["id"]] = (off + i * (W + GX), GY + d * (H + GY))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="10">',
           '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="6" refY="3" orient="auto">'
           '<path d="M0,0 L6,3 L0,6 z" fill="#666"/></marker></defs>']
    for a, b in v["edges"]:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        out.append(f'<line class="edge" data-src="{a}" data-dst="{b}" x1="{x1 + W / 2:.0f}" y1="{y1 + H:.0f}" '
                   f'x2="{x2 + W / 2:.0f}" y2="{y2:.0f}" stroke="#999" marker-end="url(#arrow)"/>')
    outset = set(v["outputs"])
    for nd in v["nodes"]:
        x, y = pos[nd["id"]]
        title = html.escape(f"{nd['label']} : {nd['type']}" + (f"  [{nd['scope']}]" if nd["scope"] else "")
                            + (f"  group {nd['group']}" if nd["group"] is not None else "")
                            + (f"  FALLBACK: {nd.get('reason', '')}" if nd.get("fallback") else ""))
        stroke = "red" if nd.get("fallback") else ("#000" if nd["id"] in outset else "#555")
        rx = 18 if nd["kind"] == "input" else 4
        out.append(f'<g class="node" data-id="{nd["id"]}" data-scope="{html.escape(nd["scope"])}">'
                   f'<title>{title}</title>'
                   f'<rect x="{x:.0f}" y="{y:.0f}" width="{W}" height="{H}" rx="{rx}" fill="{_fill(nd)}" '
                   f'stroke="{stroke}" stroke-width="{2 if nd["id"] in outset or nd.get("fallback") else 1}"/>'
                   f'<text x="{x + 6:.0f}" y="{y + 15:.0f}" font-weight="bold">{html.escape(nd["label"][:28])}</text>'
                   f'<text x="{x + 6:.0f}" y="{y + 30:.0f}">{html.escape(nd["type"][:32])}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>kiln dump: __NAME__</title>
<style>
body { font-family: sans-serif; margin: 0; display: flex; height: 100vh; }
#side { width: 340px; overflow: auto; border-right: 1px solid #ccc; padding: 8px; font-size: 12px; }
#main { flex: 1; overflow: auto; }
.hit rect { stroke: #e00 !important; stroke-width: 3 !important; }
.hidden { display: none; }
details { margin-left: 8px; } summary { cursor: pointer; }
.op { font-family: monospace; }
</style></head>
<body>
<div id="side">
  <h3>__NAME__</h3>
  <div><span id="node-count"></span> nodes, <span id="group-count"></span> kernel groups,
       <span id="fallback-count"></span> fallbacks, __CONSTS__ constants (__PARAMS__ parameters)</div>
  <p><input id="search" placeholder="search op, type or module" size="30">
     <span id="match-count"></span></p>
  <div>Modules (uncheck to collapse a module out of the graph):</div>
  <div id="tree"></div>
</div>
<div id="main">__SVG__</div>
<script id="data" type="application/json">__DATA__</script>
<script>
window.onerror = (msg) => { document.body.dataset.errors = (document.body.dataset.errors || '') + msg + ';'; };
const data = JSON.parse(document.getElementById('data').textContent);
const ops = data.nodes.filter(n => n.kind === 'op');
document.getElementById('node-count').textContent = ops.length;
document.getElementById('group-count').textContent = data.groups.length;
document.getElementById('fallback-count').textContent = ops.filter(n => n.fallback).length;
const els = {};
document.querySelectorAll('g.node').forEach(g => { els[g.dataset.id] = g; });
document.getElementById('search').addEventListener('input', e => {
  const q = e.target.value.toLowerCase();
  let hits = 0;
  for (const n of data.nodes) {
    const hit = q && (n.label + ' ' + n.type + ' ' + n.scope).toLowerCase().includes(q);
    els[n.id].classList.toggle('hit', !!hit);
    if (hit) hits++;
  }
  document.getElementById('match-count').textContent = q ? hits + ' match(es)' : '';
});
// module tree: scope "a.b.c" nests under "a" and "a.b"
const root = {children: {}, nodes: []};
for (const n of ops) {
  let t = root;
  for (const part of (n.scope || '(top)').split('.')) {
    t = t.children[part] = t.children[part] || {children: {}, nodes: []};
  }
  t.nodes.push(n);
}
function collect(t) { return t.nodes.concat(...Object.values(t.children).map(collect)); }
function build(t, name, path) {
  const d = document.createElement('details');
  const s = document.createElement('summary');
  const box = document.createElement('input');
  box.type = 'checkbox'; box.checked = true;
  box.addEventListener('change', () => {
    for (const n of collect(t)) els[n.id].classList.toggle('hidden', !box.checked);
  });
  s.appendChild(box);
  s.appendChild(document.createTextNode(' ' + name + ' (' + collect(t).length + ')'));
  d.appendChild(s);
  for (const [k, c] of Object.entries(t.children)) d.appendChild(build(c, k, path + '.' + k));
  for (const n of t.nodes) {
    const div = document.createElement('div');
    div.className = 'op';
    div.textContent = n.label + ' : ' + n.type + (n.group !== null ? '  [g' + n.group + ']' : '');
    d.appendChild(div);
  }
  return d;
}
const tree = document.getElementById('tree');
for (const [k, c] of Object.entries(root.children)) tree.appendChild(build(c, k, k));
document.body.dataset.ready = '1';
</script>
</body></html>
"""


def render_html(graph: Graph) -> str:
    v = view(graph)
    data = json.dumps(v).replace("</", "<\\/")
    return (_HTML.replace("__NAME__", html.escape(graph.name)).replace("__SVG__", render_svg(graph, v))
            .replace("__DATA__", data).replace("__CONSTS__", str(v["constants"]))
            .replace("__PARAMS__", f"{v['parameters']:,}"))


def render(graph: Graph, fmt: str) -> str:
    if fmt == "text":
        return format_graph(graph) + "\n"
    if fmt == "json":
        return to_json(graph)
    if fmt == "dot":
        return render_dot(graph) + "\n"
    if fmt == "svg":
        return render_svg(graph) + "\n"
    if fmt == "html":
        return render_html(graph)
    raise KilnError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------- stats and diff
def stats(graph: Graph) -> str:
    from kiln.passes.partition import partition

    rows: dict[str, list[int]] = {}
    param_of: dict = {}
    for n in graph.nodes:
        r = rows.setdefault(n.op.value, [0, 0, 0, 0])
        r[0] += 1
        params = sum(graph.constants[v].numel() for v in n.inputs if v is not None and v in graph.constants
                     and v not in param_of)
        for v in n.inputs:
            if v is not None and v in graph.constants:
                param_of[v] = True
        r[1] += params
        r[2] += node_flops(n)
        r[3] += node_bytes(n)
    part = partition(graph)
    total = [sum(r[i] for r in rows.values()) for i in range(4)]
    lines = [f"{'op':<22}{'count':>7}{'params':>14}{'MFLOP':>12}{'MB':>10}"]
    for op, r in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"{op:<22}{r[0]:>7}{r[1]:>14,}{r[2] / 1e6:>12.1f}{r[3] / 1e6:>10.2f}")
    lines.append(f"{'total':<22}{total[0]:>7}{total[1]:>14,}{total[2] / 1e6:>12.1f}{total[3] / 1e6:>10.2f}")
    summary = ", ".join(f"{k} {v}" for k, v in sorted(part.summary().items()))
    fallbacks = [n for n in graph.nodes if n.op is OpKind.FALLBACK]
    lines.append(f"kernel groups: {len(part.groups)} ({summary})")
    lines.append(f"fallbacks: {len(fallbacks)}" + "".join(
        f"\n  {n.attrs.target}" + (f" at {n.scope}" if n.scope else "") + f": {n.attrs.reason}" for n in fallbacks))
    return "\n".join(lines) + "\n"


def _normalized_text(graph: Graph) -> list[str]:
    """The printer's text with value names renumbered in order of appearance."""
    names: dict[str, str] = {}

    def rename(m):
        k = m.group(0)
        if k not in names:
            names[k] = f"%{len(names)}"
        return names[k]

    return [re.sub(r"%[\w.]+", rename, line) for line in format_graph(graph, show_constants=False).splitlines()]


def diff(a: Graph, b: Graph, label_a: str, label_b: str) -> str:
    ca, cb = a.op_counts(), b.op_counts()
    lines = [f"op counts {label_a} -> {label_b}:"]
    for op in sorted(set(ca) | set(cb)):
        if ca.get(op, 0) != cb.get(op, 0):
            d = cb.get(op, 0) - ca.get(op, 0)
            lines.append(f"  {op:<20} {ca.get(op, 0):>5} -> {cb.get(op, 0):<5} ({'+' if d > 0 else ''}{d})")
    if len(lines) == 1:
        lines.append("  (unchanged)")
    lines.append(f"nodes: {len(a.nodes)} -> {len(b.nodes)}")
    lines += list(difflib.unified_diff(_normalized_text(a), _normalized_text(b), label_a, label_b, lineterm="", n=1))
    return "\n".join(lines) + "\n"
