"""fastlora.compile_cache: inductor's caches in a lasting folder, and the portable bundle."""
import os
import shutil
import subprocess
import sys

import pytest

from fastlora import compile_cache

RUN = """
import sys, torch
from fastlora import compile_cache
from torch._dynamo.utils import counters
root = compile_cache.use(sys.argv[1])
f = torch.compile(lambda x: (x.sin() * 2 + x.cos()).sum(), backend="inductor")
f(torch.randn(64))
print(dict(counters["inductor"]), compile_cache.save(sys.argv[1]))
"""


def _run(folder, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    script = tmp_path / "run.py"
    script.write_text(RUN)
    out = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """A folder after one cold run (inductor compiled from nothing), made once for the tests
    below: (the folder, what that run printed). Each test then runs in a copy of it."""
    tmp_path = tmp_path_factory.mktemp("cold")
    folder = tmp_path / "cache"
    return folder, _run(folder, tmp_path)


def test_second_run_is_served_from_the_folder(cold, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(cold[0], folder)
    first = cold[1]
    assert "fxgraph_cache_miss" in first and str(cold[0] / "artifacts.bin") in first
    assert any((cold[0] / "inductor").iterdir())  # inductor wrote into our folder, not /tmp's
    second = _run(folder, tmp_path)
    assert "fxgraph_cache_hit" in second and "fxgraph_cache_miss" not in second


def test_the_bundle_alone_warms_a_new_folder(cold, tmp_path):
    """What another machine gets from a copied artifacts.bin: inductor's graph cache hits."""
    a, b = cold[0], tmp_path / "b"
    b.mkdir()
    (b / "artifacts.bin").write_bytes((a / "artifacts.bin").read_bytes())
    assert "fxgraph_cache_hit" in _run(b, tmp_path)


def test_off_leaves_inductor_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLORA_CACHE", "off")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.folder() is None and compile_cache.use() is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_a_folder_the_user_chose_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLORA_CACHE", str(tmp_path / "fl"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.use() == tmp_path / "fl"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("FASTLORA_CACHE")
    assert compile_cache.folder() == compile_cache.pathlib.Path("~/.cache/fastlora").expanduser()


# A rewritten model, compiled by inductor, in a fresh process: its loss and LoRA gradients, and
# what AOTAutograd's cache did. argv: the cache folder, "same" (or "changed": another code key,
# as another version of fastlora has), the tests folder, the device.
RUN_MODEL = """
import sys, torch, fastlora
from fastlora import compile_cache
from torch._dynamo.utils import counters
sys.path.insert(0, sys.argv[3])
from helpers import tiny_llama, with_lora
compile_cache.use(sys.argv[1])
if sys.argv[2] == "changed":
    compile_cache.code_key = lambda: "another-version"
torch.manual_seed(0)
model = with_lora(tiny_llama(layers=3, hidden=32, heads=2, kv_heads=1, inter=64, vocab=64), r=4)
model = model.to(sys.argv[4])
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
fastlora.compile_for_trainer(model, compiler="inductor")  # offloads checkpointed layer inputs
ids = torch.randint(0, 64, (2, 24), device=sys.argv[4])
loss = model(input_ids=ids, labels=ids, use_cache=False).loss
loss.backward()
grads = [p.grad.double().sum().item() for n, p in model.named_parameters() if "lora_B" in n]
reports = fastlora.reports(model)
assert reports.counts().get("lora_qkv", 0) == 3, reports.counts()
offloaded = [o for r in reports for o in r.offloaded]
print(repr((loss.item(), grads, dict(counters["aot_autograd"]), offloaded)))
"""


def _run_model(folder, tmp_path, code="same", device="cpu"):
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    script = tmp_path / "run_model.py"
    script.write_text(RUN_MODEL)
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, str(script), str(folder), code, tests, device],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own script's repr


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_rewritten_model_is_served_from_aot_autograds_cache(tmp_path, device):
    """The second run of a fused, checkpointed model skips AOTAutograd's trace of forward and
    backward (its cache: a hit for every graph, the one that offloads its layer inputs too,
    with the same loss and gradients), and its report still lists what was offloaded.
    On a GPU inductor launches the kernels: their launchers' bodies are in the backward graph
    the cache keeps, and torch 2.11 rebuilds that graph from its source when it reads the entry
    (kernels/_buffers.py; an entry that cannot be rebuilt was a miss in every rerun)."""
    folder = tmp_path / "cache"
    loss, grads, aot, offloaded = _run_model(folder, tmp_path, device=device)
    assert aot.get("autograd_cache_miss") and not aot.get("autograd_cache_bypass"), aot
    assert offloaded, "the checkpointed layers' inputs were not offloaded"
    loss2, grads2, aot2, offloaded2 = _run_model(folder, tmp_path, device=device)
    assert aot2.get("autograd_cache_hit") and not aot2.get("autograd_cache_miss") \
        and not aot2.get("autograd_cache_bypass"), aot2
    assert (loss2, grads2) == (loss, grads)
    assert offloaded2 == offloaded  # from the record kept beside the cache (offload.account)


def test_an_offload_served_without_its_record_says_so(tmp_path, monkeypatch):
    """offload.account: the pass ran (a compile): its record is kept; it did not (the code came
    from a cache): the record is read back, or, when there is none, the report says so."""
    import torch
    from torch import fx

    from fastlora import offload
    from fastlora.report import Report

    monkeypatch.setattr("torch._inductor.runtime.cache_dir_utils.cache_dir",
                        lambda: str(tmp_path))
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["example_value"] = torch.empty(2, 3)
    graph.output(graph.call_function(torch.relu, (x,)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    compiled = offload.OverlapCopies(Report(0, {}))
    compiled.ran = True
    compiled.report.offloaded.append({"tensor": "add", "dtype": "float32", "shape": [2, 3]})
    offload.account(compiled, gm, "layers")
    served = offload.OverlapCopies(Report(1, {}))
    offload.account(served, gm, "layers")
    assert served.report.offloaded == compiled.report.offloaded and not served.report.notes
    other = offload.OverlapCopies(Report(2, {}))  # another mode: another record, none kept
    offload.account(other, gm, 16.0)
    assert other.report.offloaded == [] and other.report.notes == [offload.CACHED_NOTE]


def test_compiles_are_keyed_by_fastlora_code(monkeypatch):
    """The tag PyTorch adds to every compile cache key carries fastlora's code key (and keeps
    the user's own tag): another version of fastlora cannot be served this one's backward."""
    import torch.compiler.config as cconfig

    monkeypatch.setattr(compile_cache, "code_key", lambda: "v1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest interprets (settings_key)
    with cconfig.patch(cache_key_tag="mine"):
        with compile_cache.keyed_by_fastlora():
            assert cconfig.cache_key_tag == "mine+fastlora-v1"
        assert cconfig.cache_key_tag == "mine"
    monkeypatch.undo()
    key = compile_cache.code_key()
    assert len(key) == 16 and key == compile_cache.code_key()


def test_tuning_overrides_are_in_the_key(monkeypatch):
    """A launcher reads the tuning overrides when AOTAutograd traces it into kernel launches:
    a graph compiled under an override is keyed apart from one compiled without."""
    import torch.compiler.config as cconfig

    from fastlora.kernels import tuning

    monkeypatch.setattr(compile_cache, "code_key", lambda: "v1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tags = []
    for cfg in ({}, {"tile": (2, 8)}, {"tile": (4, 8)}, {}):
        with tuning.override("rms_norm", **cfg), compile_cache.keyed_by_fastlora():
            tags.append(cconfig.cache_key_tag)
    assert tags[0] == tags[3] == "fastlora-v1"
    assert len(set(tags)) == 3 and all(t.startswith("fastlora-v1-") for t in tags[1:3])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert compile_cache.settings_key() not in ("", tags[1][len("fastlora-v1"):])


def test_rewritten_graphs_are_cacheable(monkeypatch):
    """What AOTAutograd's cache checks on the graph fastlora hands on (the check, without the
    compile): no call of a Tensor method spelled as a function (torch 2.13 skips its cache
    for such a graph; every rewritten graph had them before restore_method_calls)."""
    import torch
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable

    import fastlora
    from fastlora import backend
    from helpers import tiny_llama, with_lora

    seen = []
    real = backend._inner_compile
    monkeypatch.setattr(backend, "_inner_compile",
                        lambda gm, *a, **k: seen.append(gm) or real(gm, *a, **k))
    model = with_lora(tiny_llama(layers=1, hidden=32, heads=2, kv_heads=1, inter=64,
                                 vocab=64), r=4)
    fastlora.compile_for_trainer(model)
    ids = torch.randint(0, 64, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen and sum(fastlora.reports(model).counts().values()) > 3
    for gm in seen:
        check_cacheable(gm)
    # the graphs call the fused ops as packets (torch.ops.fastlora.rms_norm): seen as fused, so
    # inductor gets the settings for their kernels (backend.INDUCTOR_PATCHES and Triton typing)
    assert all(backend.has_fused_ops(gm) for gm in seen)
