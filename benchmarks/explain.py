"""Print the rewrite report (matches and near misses with their reasons) of one benchmark shape
on this machine's device, optionally with the Dynamo graph code; for a near miss that happens
on the GPU only (other library versions there, CUDA-only code paths).

    python benchmarks/explain.py --shape tiny [--gc on] [--graph-code]
    python benchmarks/explain.py --shape llama-8b --layers 2 --gc on --load-4bit --kbit-recipe trl
"""
from __future__ import annotations

import argparse
import json

import torch

import train_step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(train_step.SHAPES))
    ap.add_argument("--gc", default="off", choices=["on", "off"])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers", type=int, default=0, help="override the number of layers")
    ap.add_argument("--graph-code", action="store_true", help="also print Dynamo's graph code")
    ap.add_argument("--load-4bit", action="store_true",
                    help="bitsandbytes NF4 base weights, as train_step.py loads them (CUDA only)")
    ap.add_argument("--kbit-recipe", default="peft", choices=["peft", "trl", "bf16"])
    args = ap.parse_args(argv)
    import transformers

    import fastlora
    if args.graph_code:
        torch._logging.set_logs(graph_code=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = train_step.build_config(args.shape)
    if args.layers:
        cfg.num_hidden_layers = args.layers
    if args.load_4bit and device != "cuda":
        ap.error("--load-4bit needs a CUDA device (train_step.py loads the checkpoint there)")
    ns = argparse.Namespace(variant="fastlora", rank=16, gc=args.gc == "on",
                            load_4bit=args.load_4bit, kbit_recipe=args.kbit_recipe,
                            shape=args.shape, seq=args.seq,
                            cache=f"/tmp/fastlora-bench/layers{cfg.num_hidden_layers}")
    if device == "cuda":
        model = train_step.build_model(ns, cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32,
                                                 target_modules=train_step.TARGETS))
    model.train()  # as in training: gradient checkpointing and dropout act only in train mode
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {device}")
    compiled = torch.compile(model, backend="fastlora", options={"print_report": True})
    ids = torch.randint(0, cfg.vocab_size, (2, args.seq), device=device)
    compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    reports = fastlora.reports(model)
    print(json.dumps({"matches": reports.counts(),
                      "near_misses": sorted({f"{n['pattern']}: {n['reason']}"
                                             for n in reports.near_misses()})}, indent=1))


if __name__ == "__main__":
    main()
