"""options["memory_budget"] as a size ("14GiB"): parsing, refusals, the search for the
partitioner's fraction (on stand-in saved sets), and a tiny Llama compiled with inductor on the
CPU (no checkpointing: the partitioner chooses what to save) that stays exact, reports what each
graph saves, and saves fewer bytes under a smaller size."""
import pytest
import torch
from torch import fx

import fastlora
from fastlora import memory_budget
from helpers import checkpointed, compare_compiled, tiny_llama, token_batch, with_lora


@pytest.mark.parametrize("text,nbytes", [
    ("14GiB", 14 * 2**30), ("14 GiB", 14 * 2**30), ("14gib", 14 * 2**30),
    ("900MiB", 900 * 2**20), ("1.5 GB", 1_500_000_000), ("20mb", 20_000_000),
    ("0GiB", 0), (".5MiB", 2**19),
])
def test_sizes_parse(text, nbytes):
    assert memory_budget.size_in_bytes(text) == nbytes
    assert fastlora.Options.parse({"memory_budget": text}).memory_budget == text


@pytest.mark.parametrize("value,extra", [
    (-0.1, ""), (1.5, "(a size needs a unit)"), (14, "(a size needs a unit)"), ("14", ""),
    ("14 TiB", ""), ("-1GiB", ""), ("GiB", ""), ("fourGiB", ""), (True, ""), ([0.5], ""),
    (float("nan"), ""),
])
def test_bad_budgets_are_one_line(value, extra):
    with pytest.raises(fastlora.OptionsError) as e:
        fastlora.Options.parse({"memory_budget": value})
    message = str(e.value)
    assert "must be a fraction between 0 and 1" in message and "'14GiB'" in message, message
    assert message.endswith(f"got {value!r}" + (f" {extra}" if extra else "")), message


def test_a_size_needs_inductor():
    with pytest.raises(fastlora.OptionsError, match="needs compiler='inductor'"):
        fastlora.Options.parse({"memory_budget": "1GiB", "compiler": "aot_eager"})
    assert fastlora.options.backend_options({"memory_budget": "1GiB"}, {"rms_norm"},
                                            [torch.zeros(1)]).compiler == "inductor"


# --- the search, on stand-in saved sets: node names are sizes, "in*" are the graph's inputs

def _fit(levels: dict, size: int, inputs=("in8",)):
    """memory_budget._fit with a partitioner that saves ``levels[f]`` (the first level at or
    above fraction f); returns (saved names, entry, fractions asked)."""
    asked = []

    def saved_at(f):
        asked.append(f)
        return list(inputs) + next(names for at, names in sorted(levels.items()) if f <= at)

    def size_of(name):
        return int(name.lstrip("inax"))

    def activations(saved):
        return sum(size_of(n) for n in saved if n not in inputs)

    saved, entry = memory_budget._fit(saved_at, activations, list(inputs), size_of, size)
    return saved, entry, asked


def test_the_fastest_plan_is_kept_when_it_fits():
    saved, entry, asked = _fit({1.0: ["a60"]}, 100)
    assert asked == [1.0] and saved == ["in8", "a60"]
    assert entry == {"budget_bytes": 100, "fraction": 1.0, "saved_bytes": 60,
                     "fastest_bytes": 60, "tries": 1}


def test_the_largest_set_that_fits_is_chosen():
    levels = {0.25: ["a10"], 0.5: ["a10", "x20"], 0.75: ["a10", "x20", "x30"],
              1.0: ["a10", "x20", "x30", "x40"]}
    saved, entry, asked = _fit(levels, 65)
    assert saved == ["in8", "a10", "x20", "x30"], (saved, asked)
    assert entry["saved_bytes"] == 60 and 0.5 < entry["fraction"] <= 0.75
    assert entry["tries"] == len(asked) <= memory_budget.TRIES + 1


def test_full_recompute_when_nothing_smaller_fits():
    saved, entry, asked = _fit({1.0: ["a10", "x40"], 0.9: ["a10"]}, 5)
    assert saved == ["in8"] and entry["fraction"] == 0.0 and entry["saved_bytes"] == 0
    saved, entry, asked = _fit({1.0: ["a10", "x40"]}, 0)
    assert saved == ["in8"] and asked == [1.0]  # a size of 0: nothing to search


# --- a tiny Llama on the CPU with inductor

class _SavedBytes:
    """Post-grad pass recording the bytes of the tensors each forward graph saves for its
    backward (its outputs beyond the user-visible ones: AOTAutograd appends the saved ones)."""

    def __init__(self):
        self.saved = []

    def __call__(self, graph):
        if any(n.name.startswith("tangents") for n in graph.find_nodes(op="placeholder")):
            return  # the backward
        outputs = graph.find_nodes(op="output")[0].args[0]
        inputs = set(graph.find_nodes(op="placeholder"))
        self.saved.append(sum(
            o.meta["val"].numel() * o.meta["val"].element_size() for o in outputs
            if isinstance(o, fx.Node) and o not in inputs
            and isinstance(o.meta.get("val"), torch.Tensor)))

    def uuid(self):
        return None


def _step(budget):
    """One step of a 1-layer tiny Llama without checkpointing, compiled with inductor under
    ``budget``, against eager; returns (forward bytes not inputs, report entries)."""
    fastlora.clear_reports()
    torch.manual_seed(0)
    recorder = _SavedBytes()
    with torch._inductor.config.patch(post_grad_custom_post_pass=recorder,
                                      fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        loss_err, grad_errs, _ = compare_compiled(
            with_lora(tiny_llama(layers=1)), token_batch(batch=2, seq=16),
            {"compiler": "inductor", "memory_budget": budget})
    assert loss_err < 1e-5 and max(grad_errs.values()) < 1e-4, grad_errs
    entries = [e for r in fastlora.reports() for e in r.memory_budget]
    return max(recorder.saved), entries


def _mib(n):
    return f"{n / 2**20:.3g} MiB"


def test_a_size_is_exact_reported_and_a_smaller_one_saves_less():
    fastest, [entry] = _step(1.0)  # the fastest plan, measured
    assert entry["budget_bytes"] is None and entry["fraction"] == 1.0
    most = entry["saved_bytes"]
    assert most > 0

    big, [entry] = _step(f"{2 * most / 2**20:.4f}MiB")  # room for the fastest plan: kept
    assert entry["fraction"] == 1.0 and entry["saved_bytes"] == entry["fastest_bytes"] == most
    assert big == fastest

    half = f"{0.5 * most / 2**20:.4f}MiB"
    small, [entry] = _step(half)
    assert entry["budget_bytes"] == memory_budget.size_in_bytes(half)
    assert entry["fastest_bytes"] == most and entry["saved_bytes"] <= entry["budget_bytes"]
    assert 0 <= entry["fraction"] < 1 and entry["tries"] > 1
    assert small < big, (small, big)
    line = f"memory_budget {_mib(entry['budget_bytes'])}: saves {_mib(entry['saved_bytes'])} of " \
        f"activations for backward at fraction {entry['fraction']:.3g} (the fastest plan " \
        f"saves {_mib(most)}; {entry['tries']} partitioner call(s)"
    assert line in str(fastlora.last_report()), str(fastlora.last_report())

    none, [entry] = _step("0MiB")
    assert entry["fraction"] == 0.0 and entry["saved_bytes"] == 0
    assert none <= small, (none, small)


# --- under gradient checkpointing: room in the size buys back layers

class _Node:
    def __init__(self, region, nbytes):
        self.meta = {"recompute": "PREFER_RECOMPUTE", "ac_graph_id": region}
        self.nbytes = nbytes


def test_spare_room_keeps_the_last_layers_that_fit():
    """_keep_layers on stand-in layers: the fastest plan saves 10 bytes plus every untagged
    node's; the largest k of the last layers that fits is kept, their tags stay lifted, the
    others' are put back."""
    layers = [[_Node(r, 4), _Node(r, 6)] for r in range(5)]  # 10 bytes a layer
    nodes = [n for layer in layers for n in layer]

    def fastest():
        return ["base"] + [n for n in nodes if "recompute" not in n.meta]

    def activations(saved):
        return 10 + sum(n.nbytes for n in saved if n != "base")

    entry = {"saved_bytes": 10, "tries": 1}
    saved = memory_budget._keep_layers(layers, fastest, activations, 37, ["base"], entry)
    assert entry["kept_layers"] == 2 and entry["checkpointed_layers"] == 5
    assert entry["saved_bytes"] == 30 and entry["recomputed_bytes"] == 10
    assert saved == ["base"] + layers[3] + layers[4]
    assert all("recompute" not in n.meta for layer in layers[3:] for n in layer)
    assert all(n.meta["recompute"] == "PREFER_RECOMPUTE" for layer in layers[:3] for n in layer)
    assert entry["tries"] <= 1 + 3  # bisection over 5: at most 3 calls

    for layer in layers[3:]:  # put back, then a size with no room for a layer
        for n in layer:
            n.meta["recompute"] = "PREFER_RECOMPUTE"
    entry = {"saved_bytes": 10, "tries": 1}
    assert memory_budget._keep_layers(layers, fastest, activations, 19, ["base"], entry) \
        == ["base"]
    assert entry["kept_layers"] == 0 and entry["saved_bytes"] == 10
    assert all(n.meta["recompute"] == "PREFER_RECOMPUTE" for n in nodes)


def test_checkpointed_llama_with_room_keeps_its_layers_and_stays_exact():
    """A checkpointed tiny Llama compiled with a size larger than any plan: every checkpointed
    layer is kept (saved, not recomputed), the forward saves what the report says (more than
    with every layer recomputed), and loss and every LoRA gradient are eager's."""
    fastlora.clear_reports()
    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=3))
    inputs = checkpointed(model, token_batch(batch=2, seq=16))
    recorder = _SavedBytes()
    with torch._inductor.config.patch(post_grad_custom_post_pass=recorder,
                                      fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        loss_err, grad_errs, _ = compare_compiled(
            model, inputs, {"compiler": "inductor", "memory_budget": "1GiB"})
    assert loss_err < 1e-5 and max(grad_errs.values()) < 1e-4, grad_errs
    [entry] = [e for r in fastlora.reports() for e in r.memory_budget if "kept_layers" in e]
    assert entry["kept_layers"] == entry["checkpointed_layers"] == 3, entry
    assert entry["saved_bytes"] > entry["recomputed_bytes"], entry
    # the compiled forward saves that plan (its outputs beyond its inputs), not the recomputing one
    assert max(recorder.saved) >= entry["saved_bytes"], (recorder.saved, entry)
    assert "3 of 3 checkpointed layers kept, not recomputed" in str(fastlora.reports())
