#!/usr/bin/env python3
"""Golden data from Hugging Face's own code, for decima's parity tests and GPU checks.

Run where torch and transformers are installed (the GPU machine). For a model directory made by
`decima create-model`, it writes JSON with the teacher-forced logits at every position of a token sequence
and a greedy continuation:

  python3 tools/hf_reference.py --model /tmp/tiny --tokens-seed 1 --prompt-len 32 --gen 32 --out tiny.json

DeciCoder-style checkpoints (model_type llama) run through transformers' LlamaForCausalLM. DeciLM-style
ones (num_key_value_heads_per_layer, which transformers does not know) run through `PerLayerKvLlama` below,
a small PyTorch reference that is first checked against LlamaForCausalLM on the same weights with a uniform
head count (--check-reference).

With --compare-decima it also runs `decima logits` (compiled CLI, node on PATH) on the same tokens and
prints the relative L2 error per position: the GPU parity check of issue 3.
"""
import argparse
import base64
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def load_state(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(model_dir, name)))
    return state


class PerLayerKvLlama(torch.nn.Module):
    """Llama's decoder (HF's math: RMSNorm, rotate_half RoPE, GQA, SwiGLU) with KV heads per layer."""

    def __init__(self, cfg, state, dtype):
        super().__init__()
        self.cfg = cfg
        self.w = {k: v.to(dtype) for k, v in state.items()}
        self.dtype = dtype
        n = cfg["num_hidden_layers"]
        self.kv = cfg.get("num_key_value_heads_per_layer") or [cfg.get("num_key_value_heads", cfg["num_attention_heads"])] * n

    def rms(self, x, w):
        eps = self.cfg.get("rms_norm_eps", 1e-6)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return w * xf.to(x.dtype)

    def forward(self, ids):
        cfg, w = self.cfg, self.w
        heads = cfg["num_attention_heads"]
        hd = cfg["hidden_size"] // heads
        t = ids.shape[0]
        theta = cfg.get("rope_theta", 10000.0)
        inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=ids.device).float() / hd))
        freqs = torch.arange(t, device=ids.device).float()[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

        def rot(x):  # x: [heads, t, hd]
            x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
            return x * cos + torch.cat([-x2, x1], dim=-1) * sin

        x = w["model.embed_tokens.weight"][ids]
        mask = torch.full((t, t), float("-inf"), device=ids.device).triu(1)
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            kvh = self.kv[i]
            h = self.rms(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(t, heads, hd).transpose(0, 1)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(t, kvh, hd).transpose(0, 1)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(t, kvh, hd).transpose(0, 1)
            q, k = rot(q), rot(k)
            k = k.repeat_interleave(heads // kvh, dim=0)
            v = v.repeat_interleave(heads // kvh, dim=0)
            s = (q @ k.transpose(1, 2)).float() / math.sqrt(hd) + mask
            a = (torch.softmax(s, dim=-1).to(self.dtype) @ v).transpose(0, 1).reshape(t, heads * hd)
            x = x + a @ w[p + "self_attn.o_proj.weight"].T
            h = self.rms(x, w[p + "post_attention_layernorm.weight"])
            g = h @ w[p + "mlp.gate_proj.weight"].T
            u = h @ w[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
        x = self.rms(x, w["model.norm.weight"])
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return (x @ head.T).float()


def hf_llama(model_dir, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_config(model_dir)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "model_type")})
    try:
        model = LlamaForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype)
    except TypeError:  # older transformers
        model = LlamaForCausalLM.from_pretrained(model_dir, config=config, torch_dtype=dtype)
    model = model.to(device).eval()
    return lambda ids: model(ids[None, :]).logits[0].float()


def forward_fn(model_dir, dtype, device):
    cfg = load_config(model_dir)
    if cfg.get("num_key_value_heads_per_layer"):
        model = PerLayerKvLlama(cfg, {k: v.to(device) for k, v in load_state(model_dir).items()}, dtype)
        return model, "PerLayerKvLlama (decima tools/hf_reference.py)"
    return hf_llama(model_dir, dtype, device), "transformers LlamaForCausalLM"


def check_reference(model_dir, device):
    """PerLayerKvLlama must agree with transformers where transformers can run the model."""
    cfg = load_config(model_dir)
    ids = torch.arange(20, 60, device=device)
    ours = PerLayerKvLlama(cfg, {k: v.to(device) for k, v in load_state(model_dir).items()}, torch.float32)(ids)
    theirs = hf_llama(model_dir, torch.float32, device)(ids)
    err = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"PerLayerKvLlama vs transformers on {model_dir}: relative L2 error {err:.2e}")
    if err > 1e-5:
        sys.exit("the reference disagrees with transformers")


def encode(a):
    return base64.b64encode(np.asarray(a, dtype="<f4").tobytes()).decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens-seed", type=int, default=1)
    ap.add_argument("--token-range", type=int, default=1000, help="draw prompt ids below this")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    ap.add_argument("--check-reference", action="store_true")
    ap.add_argument("--compare-decima", help="also run `decima logits` with this --dtype on --device cuda and compare")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.check_reference:
        check_reference(args.model, args.device)
        return

    dtype = getattr(torch, args.dtype)
    rng = np.random.default_rng(args.tokens_seed)
    prompt = rng.integers(19, args.token_range, size=args.prompt_len).tolist()
    fwd, impl = forward_fn(args.model, dtype, args.device)
    with torch.no_grad():
        ids = torch.tensor(prompt, device=args.device)
        logits = fwd(ids).cpu().numpy()
        greedy = []
        seq = list(prompt)
        for _ in range(args.gen):
            nxt = int(fwd(torch.tensor(seq, device=args.device))[-1].argmax())
            greedy.append(nxt)
            seq.append(nxt)

    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "generator": f"tools/hf_reference.py with {impl}, torch {torch.__version__}",
                    "model": os.path.basename(os.path.normpath(args.model)),
                    "dtype": args.dtype,
                    "tokens": prompt,
                    "vocab": int(logits.shape[1]),
                    "logits_f32_base64": encode(logits),
                    "greedy": greedy,
                },
                f,
            )
        print(f"wrote {args.out}: {len(prompt)} positions x {logits.shape[1]} logits, {len(greedy)} greedy tokens")

    if args.compare_decima:
        out = subprocess.run(
            ["node", "dist/src/cli/main.js", "logits", "--model", args.model, "--device", "cuda", "--dtype", args.compare_decima,
             "--tokens", ",".join(map(str, prompt))],
            check=True, capture_output=True, text=True,
        ).stdout
        ours = np.asarray(json.loads(out)["logits"], dtype=np.float64)
        ref = logits.astype(np.float64)
        errs = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
        print(f"decima cuda {args.compare_decima} vs {impl} {args.dtype}: relative L2 error per position "
              f"max {errs.max():.3e}, mean {errs.mean():.3e}, top-1 agreement {np.mean(ours.argmax(1) == ref.argmax(1)):.3f}")


if __name__ == "__main__":
    main()
