"""The ``backend="fastlora"`` entry point: the whole pipeline, top to bottom.

    receive the Dynamo graph  ->  canonicalize a copy  ->  match and rewrite patterns into
    torch.ops.fastlora.* calls  ->  hand the result to inductor (compile_fx)  ->  publish the report

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(model,
backend="fastlora")`` works without importing fastlora first. Options come through
``torch.compile(..., options={...})`` (see ``Options``).
"""
from __future__ import annotations

import contextlib
import itertools
import traceback

import torch
from torch import fx

from . import compile_cache, distributed, dynamo_settings, hooked_embeddings, regions, warmup
from . import kernels  # noqa: F401  (registers torch.ops.fastlora.*)
from .canonicalize import canonicalize, restore_method_calls, sizes_from_inputs
from .options import backend_options, device_types
from .pattern import registered_patterns
from .report import Report, log, module_path, publish
from .rewriter import apply_patterns

_graph_counter = itertools.count()
dynamo_settings.apply()  # before the first trace: checkpointed layers must reach the backend


def fastlora_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None,
                     mode: str | None = None):
    patterns = registered_patterns()
    opts = backend_options(options, {p.name for p in patterns}, example_inputs, mode)
    report = Report(next(_graph_counter), opts.as_dict())
    piece_note = distributed.ddp_piece_note(gm)
    if piece_note:
        report.notes.append(piece_note)
    # compile_for_trainer: layers compiled once or why not; remove_padding packed this call or not
    report.notes.extend(regions.notes())
    retraced = hooked_embeddings.retraced_note()  # plain torch.compile under checkpointing
    if retraced:
        report.notes.append(retraced)

    # 1-2. Receive and canonicalize a copy, so the original survives a failed rewrite.
    rewritten = _copy(gm)
    with _timed("fastlora_rewrite"):  # Dynamo's compile-time metrics list it
        try:
            active = [p for p in patterns if p.name not in opts.disable]
            modules = list(_graph_modules(rewritten))
            # Every graph is canonical before any is rewritten: a pattern in a body may look out
            # into the graph that calls it (the attention mask prover does, see _link_callers).
            for module in modules:
                canonicalize(module.graph)
                sizes_from_inputs(module.graph)
            _link_callers(modules)
            sites = call_sites(modules)
            shared = [len(sites[m]) for m in modules if len(sites[m]) > 1]
            if shared:
                report.notes.append(f"{len(shared)} compiled bodies run {sum(shared)} times per "
                                    f"step (decoder layers compiled once)")
            # Subgraphs first (bodies of activation checkpointing and other higher-order ops). A
            # body that several calls share (a decoder layer compiled once) is rewritten once.
            for module in modules:
                # 3-4. Match and rewrite.
                apply_patterns(module.graph, active, report, strict=opts.strict, options=opts,
                               top_level=module is rewritten, call_sites=sites[module])
            for module in modules:  # Dynamo's spelling again, which compile caches can key
                restore_method_calls(module.graph)
                module.recompile()
        except Exception as e:
            if opts.strict:
                raise
            report.fallback = f"an internal error occurred ({type(e).__name__}: {e})"
            report.errors.append(traceback.format_exc())
            report.matches.clear()
            log.warning("fastlora: compiling graph %d without rewrites: %s", report.index, e)
            rewritten = gm

    from .offload import offload_mode  # imports inductor's pass API: only when compiling

    offload = offload_mode(opts, gm, opts.mode or mode)
    if opts.offload_activations is True and offload is None:
        report.notes.append("offload_activations=True: this graph has no checkpointed regions "
                            "(gradient checkpointing off?), nothing to offload")

    cuda_graphs = cuda_graphs_note(example_inputs, opts.compiler, opts.mode or mode)
    if cuda_graphs:
        report.notes.append(cuda_graphs)

    # 6. Publish the report (logger `fastlora`, tlparse artifact, stdout when asked).
    publish(report, example_inputs, opts.print_report, graph=gm)

    # 5. Codegen of everything else; under DDP, split at gradient buckets first (distributed.py).
    def compile_graph(graph, inputs):
        return _inner_compile(graph, inputs, opts.compiler, opts.mode or mode, offload=offload,
                              memory_budget=opts.memory_budget, report=report,
                              warm=warmup.wanted(opts.warm_kernels, inputs))

    bucket_cap = distributed.deferred_bucket_cap()
    if bucket_cap is None:
        return compile_graph(rewritten, example_inputs)
    compiled, pieces = distributed.split_after_fusion(gm, rewritten, example_inputs, bucket_cap,
                                                      compile_graph)
    note = distributed.split_note(pieces, bucket_cap)
    if note:
        report.notes.append(note)
        log.info("fastlora: graph %d: %s", report.index, note)
    return compiled


def cuda_graphs_note(example_inputs, compiler: str, mode: str | None) -> str | None:
    """The report's word on CUDA graphs for a graph on a GPU that inductor compiles: on where
    the mode asks for them, else off and why (docs/options.md, "On the GPU: CUDA graphs").
    None elsewhere."""
    if compiler != "inductor" or "cuda" not in device_types(example_inputs):
        return None
    if mode == "reduce-overhead":
        return ("CUDA graphs on (mode='reduce-overhead'): inductor records this graph once per "
                "input size; start each step with torch.compiler.cudagraph_mark_step_begin()")
    return ("CUDA graphs off: not asked for (options={'mode': 'reduce-overhead'}); not the "
            "default because they need a call in the training loop and measured no faster "
            "(docs/options.md, \"On the GPU: CUDA graphs\")")


def _timed(key: str):
    """Dynamo's timer (``torch._dynamo.utils.dynamo_timed``): the time is listed under ``key`` in
    ``torch._dynamo.utils.compile_times()`` and tlparse, beside Dynamo's, AOTAutograd's and
    inductor's phases. A plain context where a PyTorch release lacks it."""
    import torch._dynamo.utils

    timer = getattr(torch._dynamo.utils, "dynamo_timed", None)
    return timer(key) if timer is not None else contextlib.nullcontext()


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graph and nested graph modules can be rewritten freely."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(gm.meta)  # e.g. a checkpointed body's _checkpoint_context_fn (selective AC)
    if hasattr(gm, "_backend_id"):  # Dynamo's name for this graph's compiled code (precompile)
        copy._backend_id = gm._backend_id
    for name, child in gm.named_children():
        if isinstance(child, fx.GraphModule):
            setattr(copy, name, _copy(child))
    return copy


def _graph_modules(gm: fx.GraphModule, seen: set | None = None):
    """``gm``'s nested graph modules that its graph reads (innermost first, each once), then
    ``gm`` itself. A body no node reads is dead and left out: torch 2.13 inlines a nested
    compile region called once and leaves its body behind as an attribute."""
    seen = set() if seen is None else seen
    for node in gm.graph.nodes:
        child = getattr(gm, node.target, None) if node.op == "get_attr" else None
        if isinstance(child, fx.GraphModule) and id(child) not in seen:
            seen.add(id(child))
            yield from _graph_modules(child, seen)
    yield gm


def _link_callers(modules) -> None:
    """Record on each nested body's graph the nodes that call it, as ``graph.fastlora_callers``
    (e.g. ``tag_activation_checkpoint(body, *operands)`` in the graph around a checkpointed
    layer), so a pattern can follow a body's placeholder out to the operand passed in."""
    for module in modules:
        for node in module.graph.nodes:
            body = getattr(module, node.target, None) if node.op == "get_attr" else None
            if isinstance(body, fx.GraphModule):
                callers = getattr(body.graph, "fastlora_callers", [])
                body.graph.fastlora_callers = callers + list(node.users)


def call_sites(modules) -> dict:
    """For each graph module (``modules`` innermost first, the compiled graph last): the module
    path of every call that runs it, per run of the compiled graph: ``[None]`` for the compiled
    graph itself, one path per layer for a body that every decoder layer calls (a nested
    compile region), the caller's sites for a body inside such a body. The report counts a
    match in a body once per site (Report.add_match)."""
    sites = {modules[-1]: [None]}
    for module in reversed(modules[:-1]):  # outermost first: callers are known before bodies
        found = []
        for call in getattr(module.graph, "fastlora_callers", []):
            outer = call.graph.owning_module
            here = module_path(call)[0] or call.name
            found += [site or here for site in sites.get(outer, [None])]
        sites[module] = found or [None]
    return sites


def _inner_compile(gm: fx.GraphModule, example_inputs, compiler: str, mode: str | None,
                   offload=None, memory_budget: float | str | None = None,
                   report: Report | None = None, warm: bool = False):
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends import debugging
        from torch._dynamo.backends.registry import lookup_backend

        if warm and warmup.takes_compilers(debugging.aot_eager):
            nop = warmup.warming(debugging.boxed_nop, report)
            return debugging.aot_eager(gm, example_inputs, fw_compiler=nop, bw_compiler=nop)
        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    from .kernels._launch import INDUCTOR_PATCHES

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    fused = has_fused_ops(gm)
    if fused:
        from .reuse_dead_inputs import ReuseDeadInputs

        patches.update(INDUCTOR_PATCHES)
        # outputs of fastlora's kernels onto inputs dead after them (reuse_dead_inputs.py)
        patches["post_grad_custom_post_pass"] = ReuseDeadInputs(
            then=torch._inductor.config.post_grad_custom_post_pass)
    if (has_user_triton_kernels(gm) or fused) and USER_TRITON_KERNEL_PATCHES:
        log.info("fastlora: this graph launches user Triton kernels; inductor passes their float "
                 "arguments as float32, as Triton does (%s)", USER_TRITON_KERNEL_PATCHES)
        patches.update(USER_TRITON_KERNEL_PATCHES)
    if not PAD_MM_GUARD_FREE and has_symbolic_sizes(gm):
        patches["shape_padding"] = False  # no guard on a token count (PAD_MM_GUARD_FREE)
    if has_shared_bodies(gm):
        patches.update(SHARED_BODY_PATCHES)
    partitioner = contextlib.ExitStack()
    if offload is not None:  # saved activations to host memory (offload.py)
        from .offload import offload_config

        offload_patches, offload_context = offload_config(offload, report)
        patches.update(offload_patches)
        partitioner.enter_context(offload_context)
    if memory_budget is not None:  # a fraction or a size (memory_budget.py)
        from .memory_budget import partition_with

        partitioner.enter_context(partition_with(memory_budget, report))
    # AOTAutograd's cache keys a graph before our ops are traced into their kernel launches:
    # what the launchers decide (block sizes, grids) reaches its key through keyed_by_fastlora
    # (fastlora's sources, the launch route, tuning overrides; the GPU is in PyTorch's own key).
    inner = warmup.warming(compile_fx_inner, report) if warm else compile_fx_inner
    with partitioner, compile_cache.keyed_by_fastlora():
        compiled = compile_fx(gm, example_inputs, inner_compile=inner,
                              config_patches=patches or None)
    if offload is not None:  # what moved, also when the code came from a compile cache
        from .offload import account

        account(offload_patches["post_grad_custom_pre_pass"], gm, offload)
    return compiled


# Inductor (torch 2.10+) launches a user Triton kernel's Python-float arguments as float64 where
# Triton itself launches them as float32. A kernel written for Triton's typing can then fail to
# compile (TRL's chunked log-prob kernel: "loop-carried variable m has initial type fp32 but is
# re-assigned to fp64") or compute in another precision than it does outside torch.compile.
# Graphs that launch user kernels get Triton's own typing back.
USER_TRITON_KERNEL_PATCHES = {"_use_fp64_for_unbacked_floats": False} \
    if hasattr(torch._inductor.config, "_use_fp64_for_unbacked_floats") else {}


# Inductor's static buffer reuse is off in graphs with shared bodies (invoke_subgraph, as
# reuse_layers makes them). Torch 2.11 and 2.13 hand the memory of a region's input to a later
# buffer once the region has been called, although the region returns that input as a tensor
# saved for its backward (an alias inductor does not track): the saved tensor is overwritten
# and the backward is wrong. Found on the H200 (reuse_layers with inductor launching the
# kernels: the final norm's output took the last layer's input, LoRA gradients 20-95% off);
# tests/test_layer_regions.py shows it with plain torch code on the CPU. Dead buffers are still
# freed, and the caching allocator hands their memory out again only when no tensor holds it.
SHARED_BODY_PATCHES = {"allow_buffer_reuse": False}


# Inductor's matmul padding pass (``shape_padding``) asks whether a matmul is compute bound. Up
# to torch 2.11 it asks with the symbolic sizes of a dynamic graph, which adds a guard on the
# token count (measured on the H200, torch 2.11: "kwargs['input_ids'].size()[1] *
# kwargs['input_ids'].size()[0] < 97", so a batch of fewer than 97 tokens after a larger one
# recompiled the whole model). Later versions take size hints there (``pad_mm.hint_symbols``)
# and add no guard. Where that is missing, a graph with symbolic sizes compiles without the
# pass: it pads only misaligned matmul dimensions, and in a fused LoRA graph the token count is
# the only one that varies and the big matmuls run in fastlora's kernels.
try:
    from torch._inductor.fx_passes import pad_mm as _pad_mm

    PAD_MM_GUARD_FREE = hasattr(_pad_mm, "hint_symbols")
except ImportError:  # pragma: no cover - inductor without the pass
    PAD_MM_GUARD_FREE = True


def has_symbolic_sizes(gm: fx.GraphModule) -> bool:
    """Whether an input of ``gm`` has a symbolic size (Dynamo's dynamic-shape graph: its
    placeholders' example values are SymInts or fake tensors with symbolic sizes)."""
    def symbolic(value) -> bool:
        if isinstance(value, torch.SymInt):
            return True
        return isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt)
                                                       for d in value.shape)
    return any(symbolic(node.meta.get("example_value", node.meta.get("val")))
               for node in gm.graph.find_nodes(op="placeholder"))


def _calls(gm: fx.GraphModule, targets) -> bool:
    """Whether ``gm`` or a graph nested in it calls a function for which ``targets`` is true."""
    return any(node.op == "call_function" and targets(node.target)
               for module in _graph_modules(gm) for node in module.graph.nodes)


def has_fused_ops(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls a fastlora op: on CUDA, AOTAutograd traces those into launches of
    their Triton kernels that inductor's code makes (FASTLORA_LAUNCH, kernels/_launch.py)."""
    return _calls(gm, is_fused_op)


def is_fused_op(target) -> bool:
    """Whether ``target`` is a fastlora op, as an overload (``torch.ops.fastlora.rope.default``)
    or as the packet the rewritten graphs call (``torch.ops.fastlora.rope``)."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.startswith("fastlora::")
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "fastlora"


def has_shared_bodies(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` or a graph nested in it calls a body through ``invoke_subgraph`` (a
    nested compile region)."""
    hop = getattr(torch.ops.higher_order, "invoke_subgraph", None)
    return hop is not None and _calls(gm, lambda t: t is hop)


def has_user_triton_kernels(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` or a graph nested in it launches a user-written Triton kernel (as Dynamo
    captures ``kernel[grid](...)``, e.g. inside an autograd.Function of a training library)."""
    hops = {getattr(torch.ops.higher_order, name, None)
            for name in ("triton_kernel_wrapper_mutation", "triton_kernel_wrapper_functional")}
    hops.discard(None)
    return _calls(gm, lambda t: t in hops)
