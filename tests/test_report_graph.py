"""The report as a graph (networkx): a node per match and near miss, an edge where one's output
reaches the other through unfused ops; DOT for Graphviz."""
import json

import networkx as nx
import torch

import fastlora
from helpers import tiny_llama, token_batch, with_lora


def _compile(model, **inputs):
    compiled = torch.compile(model, backend="fastlora", options={"compiler": "aot_eager"})
    compiled(**inputs).loss.backward()
    return fastlora.last_report()


def _node(g, pattern, module_end):
    [key] = [k for k, d in g.nodes(data=True)
             if d["pattern"] == pattern and d["module"].endswith(module_end)]
    return key


def test_matches_form_the_models_dataflow():
    report = _compile(with_lora(tiny_llama(layers=2)), **token_batch())
    g = report.to_networkx()
    assert g.number_of_nodes() == len(report.matches) + len(report.near_misses)
    assert nx.is_directed_acyclic_graph(g) and g.number_of_edges() > 0
    running = [k for k, d in g.nodes(data=True) if not d.get("absorbed_into")]
    absorbed = [k for k in g if k not in running]
    assert absorbed and all(g.degree(k) == 0 for k in absorbed)  # fused further: no op of its own
    attention = [_node(g, "attention", f"layers.{i}.self_attn") for i in (0, 1)]
    loss = _node(g, "linear_cross_entropy", "")
    assert nx.has_path(g, attention[0], attention[1]) and not nx.has_path(g, attention[1],
                                                                           attention[0])
    assert all(nx.has_path(g, a, loss) for a in attention) and g.out_degree(loss) == 0
    # inside a layer: the rotary embedding feeds attention, attention feeds o_proj's adapter
    rope_to_attention = [a for a, b in g.in_edges(attention[0]) if g.nodes[a]["pattern"] == "rope"]
    assert rope_to_attention
    assert any(g.nodes[b]["pattern"] == "lora_linear" and "o_proj" in g.nodes[b]["module"]
               for _, b in g.out_edges(attention[0]))
    assert json.loads(report.to_json())["flow"]  # plain data too


def test_near_misses_sit_in_the_flow_and_dot_draws_them():
    """A custom 4-D mask (causal with one hidden key in one row) leaves attention unfused: its
    near miss is a node between the rotary embedding and o_proj's adapter."""
    inputs = token_batch(batch=2, seq=12)
    mask = torch.tril(torch.ones(12, 12, dtype=torch.bool)).expand(2, 1, 12, 12).clone()
    mask[0, 0, 5:, 2] = False
    report = _compile(with_lora(tiny_llama(layers=1)), **inputs, attention_mask=mask)
    g = report.to_networkx()
    [miss] = [k for k, d in g.nodes(data=True) if d["kind"] == "near_miss"
              and d["pattern"] == "attention"]
    assert g.nodes[miss]["refusal"] == "check"  # the mask prover's Reject
    assert any(g.nodes[a]["pattern"] == "rope" for a, _ in g.in_edges(miss))
    assert any(g.nodes[b]["pattern"] == "lora_linear" for _, b in g.out_edges(miss))
    dot = report.to_dot()
    assert dot.startswith('digraph "fastlora graph') and dot.rstrip().endswith("}")
    assert f'"{miss}" [label="attention (near miss)' in dot and "style=\"filled,dashed\"" in dot
    edges = [line for line in dot.splitlines() if " -> " in line]
    reduced = nx.transitive_reduction(g.subgraph(
        k for k, d in g.nodes(data=True) if not d.get("absorbed_into")))
    assert len(edges) == reduced.number_of_edges() > 0
