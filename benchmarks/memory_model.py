"""Memory model of one preftune training step: bytes saved for backward, by module kind.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_model.py --max_length 2048 --batch 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_model.py --max_length 1024 --layout plain --backward

One forward of the default model (SmolLM2-135M-Instruct loaded by
:func:`preftune.models.load_model_and_tokenizer`, LoRA r16 all-linear, ``--lora_dropout`` default
0.05) over ``--batch`` synthetic pairs of ``max_length`` tokens (prompt ``L/2``, chosen and
rejected ``L/4`` each: ``[P C]`` = ``3L/4``, the shared-prompt unit ``[P C R]`` = ``L``), laid out
by :func:`preftune.engine.layout.collate_pairs`, under
``torch.autograd.graph.saved_tensors_hooks``. Every tensor autograd saves is attributed to the
innermost module running when it was saved (forward pre/post hooks keep a module stack) and
counted once per storage (views of one buffer, e.g. ``x`` saved by q, k and v, count once;
parameters are not counted: they are the weights). ``--backward`` also runs the backward and
reports the peak RSS of the step (``VmHWM`` reset before the forward).

Kinds (where the tensor was saved): ``attention_core`` (inside ``self_attn`` but in no
projection: rotary, ``repeat_kv``, the attention kernel), ``attn_TxT`` (any saved tensor whose last
two dims are ``T × T``: a mask or attention probabilities), ``lora_dropout`` (``dropout(x)`` and its
mask), ``lora_A`` / ``lora_B`` (the rank-r intermediates), ``base_linear`` (inputs of the frozen
projections), ``mlp_act`` (SiLU, gate*up), ``norm`` (RMSNorm), ``lm_head``, ``other``.
The JSON line printed last holds every figure; ``--out`` writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class _MallInfo2(__import__("ctypes").Structure):
    _fields_ = [(n, __import__("ctypes").c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_stats_mb() -> dict:
    """glibc ``mallinfo2``: bytes in use (heap + mmapped) and free bytes kept by the heap, MB."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        mi = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"in_use_mb": (mi.uordblks + mi.hblkhd) / 2**20, "mmapped_mb": mi.hblkhd / 2**20,
            "heap_free_mb": mi.fordblks / 2**20, "heap_mb": mi.arena / 2**20}


def synthetic_pairs(batch: int, max_length: int, vocab: int, seed: int = 0):
    """``batch`` pairs with prompt ``L/2`` and completions ``L/4`` tokens (random ids)."""
    from preftune.types import TokenizedPair

    g = torch.Generator().manual_seed(seed)
    lp, lc = max_length // 2, max_length // 4

    def ids(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(lp), ids(lc), ids(lc)) for _ in range(batch)]


def unfuse_lora_dropout(model) -> int:
    """Back to peft's LoRA dropout (``nn.Dropout`` then ``nn.Linear``), for before/after measurements."""
    from torch import nn

    from preftune.models.lora_dropout import DropoutLinear

    n = 0
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict):
            continue
        for name, a in lora_a.items():
            if isinstance(a, DropoutLinear):
                module.lora_dropout[name] = nn.Dropout(a.dropout_p)
                a.__class__ = nn.Linear
                n += 1
    return n


LAYOUTS = {"shared": (True, True), "shared-padded": (True, False), "packed": (False, True), "plain": (False, False)}


def classify(path: str, shape: tuple, t: int) -> str:
    if len(shape) >= 2 and shape[-1] == t and shape[-2] == t and t > 1:
        return "attn_TxT"
    last = path.split(".")[-1] if path else ""
    if "lora_dropout" in path:
        return "lora_dropout"
    if "lora_A" in path:
        return "lora_A"
    if "lora_B" in path:
        return "lora_B"
    if "lm_head" in path or path == "<head>":
        return "lm_head"
    if last in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "base_layer"):
        return "base_linear"
    if "norm" in last:
        return "norm"
    if last.endswith("self_attn"):
        return "attention_core"
    if last in ("mlp", "act_fn"):
        return "mlp_act"
    if "rotary" in last:
        return "rotary"
    return "other:" + last


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="shared")
    p.add_argument("--lora_dropout", type=float, default=None, help="Default: PeftArguments' default.")
    p.add_argument("--packed_attention", default="blockwise", choices=["blockwise", "mask"])
    p.add_argument("--max_activation_memory_gb", type=float, default=float("inf"),
                   help="The engine's budget (default here: inf, no automatic checkpointing).")
    p.add_argument("--malloc_trim", default="true", choices=["true", "false"], help="The engine's heap trimming.")
    p.add_argument("--peft_dropout", action="store_true",
                   help="Undo preftune's fused LoRA dropout (peft's nn.Dropout + lora_A, as before).")
    p.add_argument("--backward", action="store_true", help="Also run the backward; report peak RSS.")
    p.add_argument("--checkpointing", action="store_true", help="Activation checkpointing of the decoder layers.")
    p.add_argument("--mmap_threshold_kb", type=int, default=None,
                   help="glibc mallopt(M_MMAP_THRESHOLD): blocks above it are mmapped and returned on free.")
    p.add_argument("--trim", action="store_true", help="glibc malloc_trim(0) after every decoder layer (fwd + bwd).")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.mmap_threshold_kb is not None:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold_kb * 1024)  # M_MMAP_THRESHOLD

    from preftune.config import ModelArguments, PeftArguments
    from preftune.engine.layout import collate_pairs
    from preftune.engine.logprobs import sequence_logps
    from preftune.models import load_model_and_tokenizer

    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    peft_kw = {} if args.lora_dropout is None else {"lora_dropout": args.lora_dropout}
    peft_args = PeftArguments(use_peft=True, **peft_kw)
    model, _ = load_model_and_tokenizer(ModelArguments(), peft_args)
    model.train()
    if args.checkpointing:
        from preftune.models import prepare_for_gradient_checkpointing

        prepare_for_gradient_checkpointing(model)
    from preftune.engine.options import configure_engine

    configure_engine(model, packed_attention=args.packed_attention, malloc_trim=args.malloc_trim == "true",
                     max_activation_memory_gb=args.max_activation_memory_gb)
    if args.peft_dropout:
        unfuse_lora_dropout(model)
    cfg = model.config
    share, pf = LAYOUTS[args.layout]
    pairs = synthetic_pairs(args.batch, args.max_length, cfg.vocab_size)
    batch = collate_pairs(pairs, share_prompt=share, padding_free=pf)
    rows, t = batch["input_ids"].shape

    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    weights_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    trainable = [q for q in model.parameters() if q.requires_grad]
    trainable_bytes = sum(q.numel() * q.element_size() for q in trainable)

    stack: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
        handles.append(mod.register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]))

    seen: set[int] = set()
    by_kind: dict[str, int] = defaultdict(int)
    by_kind_count: dict[str, int] = defaultdict(int)
    per_layer: dict[str, int] = defaultdict(int)
    examples: dict[str, set] = defaultdict(set)
    dup_bytes = 0

    def pack(x):
        nonlocal dup_bytes
        if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.layout != torch.strided:
            return x
        st = x.untyped_storage()
        ptr = st.data_ptr()
        path = stack[-1] if stack else "<head>"
        if ptr in params or ptr == 0:
            return x
        if ptr in seen:
            dup_bytes += 0
            return x
        seen.add(ptr)
        nbytes = st.nbytes()
        kind = classify(path, tuple(x.shape), t)
        by_kind[kind] += nbytes
        by_kind_count[kind] += 1
        m = re.search(r"layers\.(\d+)\.", path)
        if m and m.group(1) == "0":
            per_layer[kind] += nbytes
        if len(examples[kind]) < 6:
            examples[kind].add(f"{re.sub(r'layers[.][0-9]+[.]', 'layers.N.', path)} {tuple(x.shape)} {x.dtype}")
        return x

    if args.trim:  # the older experiment: trim with full backward hooks (heavier than the engine's)
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        for name, mod in model.named_modules():
            if re.search(r"layers\.\d+$", name):
                mod.register_forward_hook(lambda m, a, o: libc.malloc_trim(0) and None)
                mod.register_full_backward_hook(lambda m, gi, go: libc.malloc_trim(0) and None)
    rss0 = _status_kb("VmRSS") / 1024
    Path("/proc/self/clear_refs").write_text("5")
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = sequence_logps(model, batch)
        loss = -(out.chosen_logps.sum() + out.rejected_logps.sum())
    fwd_s, fwd_cpu = time.perf_counter() - t0, time.process_time() - c0
    rss_fwd = _status_kb("VmRSS") / 1024
    malloc_fwd = malloc_stats_mb()
    peak_fwd = _status_kb("VmHWM") / 1024
    for h in handles:
        h.remove()
    res = {"max_length": args.max_length, "batch": args.batch, "layout": args.layout, "rows": rows, "T": t,
           "tokens": rows * t, "real_tokens": int((batch["segment_ids"] >= 0).sum()),
           "lora_dropout": peft_args.lora_dropout, "packed_attention": args.packed_attention,
           "peft_dropout": args.peft_dropout, "malloc_trim": args.malloc_trim,
           "max_activation_memory_gb": args.max_activation_memory_gb, "checkpointing": args.checkpointing,
           "mmap_threshold_kb": args.mmap_threshold_kb, "trim": args.trim,
           "threads": torch.get_num_threads(), "forward_s": fwd_s, "forward_cpu_s": fwd_cpu,
           "weights_mb": weights_bytes / 2**20, "trainable_mb": trainable_bytes / 2**20,
           "saved_mb": {k: v / 2**20 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
           "saved_count": dict(by_kind_count), "saved_total_mb": sum(by_kind.values()) / 2**20,
           "layer0_saved_mb": {k: v / 2**20 for k, v in per_layer.items()},
           "examples": {k: sorted(v) for k, v in examples.items()},
           "rss_before_mb": rss0, "rss_after_forward_mb": rss_fwd, "malloc_after_forward": malloc_fwd, "peak_rss_forward_mb": peak_fwd}
    if args.backward:
        t0, c0 = time.perf_counter(), time.process_time()
        loss.backward()
        res["backward_s"], res["backward_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        res["peak_rss_step_mb"] = _status_kb("VmHWM") / 1024
        res["malloc_after_backward"] = malloc_stats_mb()
    res["checkpointed_layers"] = getattr(model, "_preftune_checkpointed_layers", None)
    del out, loss
    line = json.dumps(res)
    print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
