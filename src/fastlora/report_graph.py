"""The rewrite report as a graph: which fused op (or near miss) feeds which, for a viewer.

After a graph is rewritten, ``record_flow`` walks it once in program order and records an edge
``a -> b`` wherever a value computed by fused op (or unfused near-miss anchor) ``a`` reaches ``b``
through ops that are neither. ``Report.to_networkx()`` turns the report into a
``networkx.DiGraph``: one node per match (``"match:<i>"``, its report entry as attributes) and
per near miss (``"near_miss:<i>"``), those edges between them. ``Report.to_dot()`` writes it for
Graphviz (``dot -Tsvg``), transitively reduced so that a chain reads as a chain, without the
matches a later pattern fused further (``absorbed_into``: their op no longer runs on its own;
in ``to_networkx`` they are nodes without edges).
"""
from __future__ import annotations

from torch import fx


def record_flow(report, graph: fx.Graph, first_near_miss: int = 0) -> None:
    """Add to ``report.flow`` the edges between the fused ops and near misses of ``graph`` (the
    near misses from index ``first_near_miss`` on are this graph's)."""
    stops: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if "fastlora_match" in node.meta:
            stops[node] = f"match:{node.meta['fastlora_match']}"
    by_name = {n.name: n for n in graph.nodes}
    for i in range(first_near_miss, len(report.near_misses)):
        node = by_name.get(report.near_misses[i]["node"])
        if node is not None:  # a node missed by several patterns is one stop: the first
            stops.setdefault(node, f"near_miss:{i}")
    upstream: dict[fx.Node, frozenset] = {}  # node -> the nearest stops above it
    for node in graph.nodes:
        above = set()
        for source in node.all_input_nodes:
            above |= {stops[source]} if source in stops else upstream.get(source, frozenset())
        if node in stops:
            report.flow.update((a, stops[node]) for a in above if a != stops[node])
        else:
            upstream[node] = frozenset(above)


def to_networkx(report):
    import networkx as nx

    g = nx.DiGraph(graph=report.index)
    for i, match in enumerate(report.matches):
        g.add_node(f"match:{i}", kind="match", **match)
    for i, miss in enumerate(report.near_misses):
        # the entry's own "kind" (why it was refused, refusal.py) becomes "refusal" on the node,
        # whose "kind" says match or near miss
        attrs = {("refusal" if key == "kind" else key): value for key, value in miss.items()}
        g.add_node(f"near_miss:{i}", kind="near_miss", **attrs)
    g.add_edges_from(edge for edge in sorted(report.flow) if all(end in g for end in edge))
    return g


def to_dot(report) -> str:
    import networkx as nx

    g = to_networkx(report)
    g.remove_nodes_from([k for k, d in g.nodes(data=True) if d.get("absorbed_into")])
    reduced = nx.transitive_reduction(g) if nx.is_directed_acyclic_graph(g) else g
    lines = [f'digraph "fastlora graph {report.index}" {{',
             '  node [shape=box, style=filled, fontname="monospace", fontsize=10];']
    for key, data in g.nodes(data=True):
        where = data.get("module") or data.get("node", "")
        if data["kind"] == "match":
            label, look = f"{data['pattern']}\\n{where}", 'fillcolor="#c6efce"'
        else:
            label = f"{data['pattern']} (near miss)\\n{where}"
            look = f'fillcolor="#ffeb9c", style="filled,dashed", tooltip="{_quote(data["reason"])}"'
        lines.append(f'  "{key}" [label="{_quote(label)}", {look}];')
    lines += [f'  "{a}" -> "{b}";' for a, b in sorted(reduced.edges)]
    return "\n".join(lines + ["}"]) + "\n"


def _quote(text: str) -> str:
    return text.replace('"', '\\"')
