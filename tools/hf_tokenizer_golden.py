#!/usr/bin/env python3
"""Golden token ids from Hugging Face's `tokenizers` for decima's tokenizer parity test.

  python3 tools/hf_tokenizer_golden.py MODEL_DIR test/fixtures/tokenizer-cases.json OUT.json

MODEL_DIR is a model made by `decima create-model` (its tokenizer.json is deterministic).
"""
import json
import sys

import tokenizers
from tokenizers import Tokenizer


def main():
    model_dir, cases_path, out_path = sys.argv[1:4]
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    with open(cases_path) as f:
        cases = json.load(f)
    texts = [c if isinstance(c, str) else c["text"] for c in (cases["cases"] if isinstance(cases, dict) else cases)]
    golden = [{"text": t, "ids": tok.encode(t).ids} for t in texts]
    with open(out_path, "w") as f:
        json.dump({"generator": f"tools/hf_tokenizer_golden.py, tokenizers {tokenizers.__version__}", "cases": golden}, f, ensure_ascii=False, indent=1)
    print(f"wrote {out_path}: {len(golden)} cases")


if __name__ == "__main__":
    main()
