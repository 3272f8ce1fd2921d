"""fastlora.compile_cache: inductor's caches in a lasting folder, and the portable bundle."""
import os
import subprocess
import sys

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


def test_second_run_is_served_from_the_folder(tmp_path):
    folder = tmp_path / "cache"
    first = _run(folder, tmp_path)
    assert "fxgraph_cache_miss" in first and str(folder / "artifacts.bin") in first
    assert any((folder / "inductor").iterdir())  # inductor wrote into our folder, not /tmp's
    second = _run(folder, tmp_path)
    assert "fxgraph_cache_hit" in second and "fxgraph_cache_miss" not in second


def test_the_bundle_alone_warms_a_new_folder(tmp_path):
    """What another machine gets from a copied artifacts.bin: inductor's graph cache hits."""
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, tmp_path)
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
