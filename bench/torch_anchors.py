#!/usr/bin/env python3
"""Anchors for decima's benchmarks, measured on the same GPU and model: Hugging Face transformers' eager
`generate` (and, with --compile, the same model's decode step over a static KV cache under torch.compile
"reduce-overhead", in a plain greedy loop), fixed prompt and output lengths. Prints one JSON line per
configuration.

  python3 bench/torch_anchors.py --model /tmp/dc1b --batch 1 --prompt-len 128 --gen-len 256 [--compile]
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def load(model_dir, dtype):
    with open(f"{model_dir}/config.json") as f:
        cfg = json.load(f)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "model_type")})
    try:
        model = LlamaForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype)
    except TypeError:  # older transformers
        model = LlamaForCausalLM.from_pretrained(model_dir, config=config, torch_dtype=dtype)
    return model.to("cuda").eval()


def run(model, batch, prompt_len, gen_len, **kw):
    ids = torch.randint(19, 1000, (batch, prompt_len), device="cuda")
    mask = torch.ones_like(ids)

    def generate(n):
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)

    generate(8)  # warm-up (and compilation)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(1)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(gen_len)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + gen_len
    step = (total - ttft) / (gen_len - 1)
    return {"ttft_ms": ttft * 1e3, "step_ms": step * 1e3, "tokens_per_s": batch / step, "total_ms": total * 1e3}


def static_cache(model, batch, max_len):
    from transformers import StaticCache
    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # older transformers
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device="cuda", dtype=model.dtype)


def run_compiled(model, batch, prompt_len, gen_len):
    """gpt-fast's way: prefill eagerly, then a compiled one-token step (CUDA graphs) in a plain greedy loop.
    generate() with a compiled forward fails under CUDA graphs here (the static cache overwrites a graph's
    output), so the loop marks each step and keeps only the argmax."""
    cache = static_cache(model, batch, prompt_len + gen_len)

    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def step(tok, pos):
        return model(input_ids=tok, position_ids=pos, cache_position=pos[0], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)

    def generate(n):
        cache.reset()
        ids = torch.randint(19, 1000, (batch, prompt_len), device="cuda")
        pos = torch.arange(prompt_len, device="cuda")
        with torch.no_grad():
            tok = model(input_ids=ids, position_ids=pos[None].expand(batch, -1), cache_position=pos, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(n - 1):
                torch.compiler.cudagraph_mark_step_begin()
                p = torch.full((batch, 1), prompt_len + i, device="cuda", dtype=torch.long)
                tok = step(tok[:, None], p).clone()
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    generate(16)  # compilation and graph recording
    generate(16)
    total = generate(gen_len)
    step_s = total / (gen_len - 1)
    return {"step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    model = load(args.model, getattr(torch, args.dtype))
    for b in args.batch:
        r = run(model, b, args.prompt_len, args.gen_len)
        print(json.dumps({"anchor": "transformers eager generate", "batch": b, "prompt_len": args.prompt_len, "gen_len": args.gen_len, **r}), flush=True)
    if args.compile:
        for b in args.batch:
            r = run_compiled(model, b, args.prompt_len, args.gen_len)
            print(json.dumps({"anchor": "transformers model, static cache, decode step under torch.compile reduce-overhead", "batch": b,
                              "prompt_len": args.prompt_len, "gen_len": args.gen_len, **r}), flush=True)


if __name__ == "__main__":
    main()
