"""A decoder layer body shared by reuse_layers has its backward traced once in a cold compile
(tests/shared_body_backward.py: a tiny Llama through compile_for_trainer on the inductor launch
route, a pretend GPU, nothing launched).

torch.compile keys a shared body's backward by the metadata of the gradients it receives,
storage size included. The last layer's gradient came from the final RMSNorm's backward, a
rows-first [B*S, N] buffer viewed as [B, S, N], whose storage size is the product of the sizes
(``N*s0*s1``); the other layers' gradients have the strided form (``N*s1*(s0 - 1) + N*s1``).
Two backward variants: the layer's backward traced (and compiled) twice. Measured on this CPU,
16 layers, up to inductor's codegen: 40.7 s before, 36.5 s after."""
from pretend_gpu import run_script


def test_a_shared_layer_body_has_one_backward():
    facts = run_script("shared_body_backward.py", "--layers", "4")
    assert len(facts["graphs"]) == 2, facts  # forward and backward reached inductor
    assert facts["backward_variants"] == 1, facts
