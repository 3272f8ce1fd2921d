"""The report notes a graph compiled again for the same parameters (repeats.py): the sign of a
Dynamo guard that keeps failing, which otherwise shows only as a slow run."""
import copy

import torch

import fastlora
from helpers import tiny_llama, token_batch, with_lora

AGAIN = "compiled again"


def _again(reports) -> list[str]:
    return [n for r in reports for n in r.notes if n.startswith(AGAIN)]


def test_ordinary_recompiles_are_not_noted():
    """Calls that reuse the compiled graph, a new grad mode, and a second model of the same
    architecture (other parameters) are no repeat."""
    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=1))
    twin = copy.deepcopy(model)
    inputs = token_batch(seq=7, use_cache=False)
    fastlora.clear_reports()
    compiled = torch.compile(model, backend="fastlora", options={"compiler": "aot_eager"})
    for _ in range(2):
        compiled(**inputs).loss.backward()
    with torch.no_grad():
        compiled(**inputs)
    torch._dynamo.reset()  # else Dynamo runs the twin on the model's compiled code
    torch.compile(twin, backend="fastlora", options={"compiler": "aot_eager"})(**inputs)
    assert len(fastlora.reports()) == 3  # grad, no_grad, the twin (same code and sizes)
    assert _again(fastlora.reports()) == []


def test_the_same_graph_compiled_again_is_noted_and_warned_once(warnings_logged):
    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=1))
    inputs = token_batch(seq=7, use_cache=False)
    fastlora.clear_reports()
    for calls in (1, 2, 3):  # Dynamo's cache dropped: each call compiles the same graph again
        torch._dynamo.reset()
        torch.compile(model, backend="fastlora", options={"compiler": "aot_eager"})(**inputs)
        if calls == 2:  # one recompile can be a mode switch: noted, not warned
            assert len(_again(fastlora.reports())) == 1 and warnings_logged == []
    notes = _again(fastlora.reports())
    assert len(notes) == 2 and "compiled 3 times" in notes[-1], notes
    assert sum(AGAIN in line for line in warnings_logged) == 1, warnings_logged
    fastlora.clear_reports()  # forgets the earlier graphs: the next compile is no repeat
    torch._dynamo.reset()
    torch.compile(model, backend="fastlora", options={"compiler": "aot_eager"})(**inputs)
    assert _again(fastlora.reports()) == []
