import { SequencePreTokenizer } from "./hf.js";

/**
 * A real tokenizer for test models (`decima create-model`): byte-level BPE in StarCoder's form, so the
 * whole tokenizer path (special tokens, FIM, multi-byte characters, digits) is exercised with a vocabulary
 * small enough for a tiny model. Same structure as bigcode/starcoder's tokenizer.json (no normalizer;
 * Digits then ByteLevel; ByteLevel post-processor and decoder; its 19 special tokens at ids 0..18), a
 * vocabulary of its own. The files follow the tokenizer.json schema exactly, so Hugging Face's Python
 * `tokenizers`/`transformers` load them too.
 */

export const STARCODER_SPECIAL_TOKENS = [
  "<|endoftext|>",
  "<fim_prefix>",
  "<fim_middle>",
  "<fim_suffix>",
  "<fim_pad>",
  "<filename>",
  "<gh_stars>",
  "<issue_start>",
  "<issue_comment>",
  "<issue_closed>",
  "<jupyter_start>",
  "<jupyter_text>",
  "<jupyter_code>",
  "<jupyter_output>",
  "<empty_output>",
  "<commit_before>",
  "<commit_msg>",
  "<commit_after>",
  "<reponame>",
] as const;

/** Within the test models' vocabulary of 1024. */
export const BUILT_VOCAB_SIZE = 1000;

const ENDOFTEXT = STARCODER_SPECIAL_TOKENS[0];

const SPECIAL_TOKEN_FLAGS = { single_word: false, lstrip: false, rstrip: false, normalized: false, special: true };

const PRE_TOKENIZER = {
  type: "Sequence",
  pretokenizers: [
    { type: "Digits", individual_digits: true },
    { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
  ],
};

export interface TokenizerFiles {
  tokenizerJson: object;
  tokenizerConfig: object;
}

export function buildTokenizerFiles(opts: { vocabSize?: number } = {}): TokenizerFiles {
  const { vocab, merges } = trainBpe(CORPUS, BUILT_VOCAB_SIZE);
  return { tokenizerJson: tokenizerJson(withFillers(vocab, opts.vocabSize ?? vocab.length), merges), tokenizerConfig: tokenizerConfig() };
}

/**
 * Pad the vocabulary to a model's size with tokens no merge produces (" t1a", " t1b", ...): encoding is
 * unchanged, and every id a random test model can generate decodes to text, as with a real checkpoint.
 */
function withFillers(vocab: string[], size: number): string[] {
  const out = [...vocab];
  const taken = new Set(vocab);
  for (let i = 0; out.length < size; i++) {
    const token = `\u0120t${i.toString(36)}`; // Ġ: the byte-level alphabet's space
    if (!taken.has(token)) out.push(token);
  }
  return out;
}

function tokenizerJson(vocab: string[], merges: string[]): object {
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: STARCODER_SPECIAL_TOKENS.map((content, id) => ({ id, content, ...SPECIAL_TOKEN_FLAGS })),
    normalizer: null,
    pre_tokenizer: PRE_TOKENIZER,
    post_processor: { type: "ByteLevel", add_prefix_space: true, trim_offsets: false, use_regex: true },
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab: Object.fromEntries(vocab.map((token, id) => [token, id])),
      merges,
    },
  };
}

/** As transformers' save_pretrained writes it (keys sorted). */
function tokenizerConfig(): object {
  return {
    add_bos_token: false,
    add_prefix_space: false,
    added_tokens_decoder: Object.fromEntries(
      STARCODER_SPECIAL_TOKENS.map((content, id) => [String(id), { content, ...SPECIAL_TOKEN_FLAGS }]),
    ),
    additional_special_tokens: [...STARCODER_SPECIAL_TOKENS],
    bos_token: ENDOFTEXT,
    clean_up_tokenization_spaces: false,
    eos_token: ENDOFTEXT,
    model_max_length: 2048,
    tokenizer_class: "GPT2Tokenizer",
    unk_token: ENDOFTEXT,
  };
}

/**
 * GPT-2's map from bytes to printable characters: byte-level BPE works on these so that every token is a
 * visible string. Printable Latin-1 bytes stand for themselves; the rest are shifted past U+0100.
 */
function byteChars(): string[] {
  const chars = new Array<string>(256);
  let shifted = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    chars[b] = String.fromCharCode(printable ? b : 256 + shifted++);
  }
  return chars;
}

/**
 * A small BPE trainer, written by hand because no JavaScript library trains BPE. It follows Hugging Face's
 * BpeTrainer where that decides the result: the special tokens first, then the byte alphabet sorted by
 * character, then one token per merge of the most frequent adjacent pair (ties go to the pair of lowest
 * ids), counting pre-tokens exactly as the tokenizer splits text. It recounts every pair for each merge:
 * slow for a real corpus, a tenth of a second for this one.
 */
function trainBpe(corpus: string, vocabSize: number): { vocab: string[]; merges: string[] } {
  const vocab: string[] = [...STARCODER_SPECIAL_TOKENS, ...byteChars().sort()];
  const ids = new Map(vocab.map((token, id) => [token, id]));
  const words = countWords(corpus).map(([word, count]) => ({ symbols: [...word].map((c) => ids.get(c)!), count }));
  const merges: string[] = [];
  while (vocab.length < vocabSize) {
    const best = mostFrequentPair(words);
    if (best === null) break;
    const [a, b] = best;
    const merged = vocab[a] + vocab[b];
    let id = ids.get(merged);
    if (id === undefined) {
      id = vocab.length;
      vocab.push(merged);
      ids.set(merged, id);
    }
    merges.push(`${vocab[a]} ${vocab[b]}`);
    for (const word of words) word.symbols = mergePair(word.symbols, a, b, id);
  }
  return { vocab, merges };
}

/** Pre-tokens (in byte-level characters) and how often each occurs, in order of first occurrence. */
function countWords(corpus: string): [string, number][] {
  const counts = new Map<string, number>();
  for (const word of new SequencePreTokenizer(PRE_TOKENIZER).pre_tokenize(corpus)) {
    counts.set(word, (counts.get(word) ?? 0) + 1);
  }
  return [...counts];
}

function mostFrequentPair(words: { symbols: number[]; count: number }[]): [number, number] | null {
  const counts = new Map<number, number>();
  for (const { symbols, count } of words) {
    for (let i = 0; i + 1 < symbols.length; i++) {
      const key = symbols[i] * 65536 + symbols[i + 1];
      counts.set(key, (counts.get(key) ?? 0) + count);
    }
  }
  let bestKey = -1;
  let bestCount = 0;
  for (const [key, count] of counts) {
    if (count > bestCount || (count === bestCount && key < bestKey)) {
      bestKey = key;
      bestCount = count;
    }
  }
  return bestKey === -1 ? null : [Math.floor(bestKey / 65536), bestKey % 65536];
}

function mergePair(symbols: number[], a: number, b: number, merged: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < symbols.length; i++) {
    if (symbols[i] === a && symbols[i + 1] === b) {
      out.push(merged);
      i++;
    } else {
      out.push(symbols[i]);
    }
  }
  return out;
}

/** What the merges are learned from: everyday Python, JavaScript and TypeScript. */
const CORPUS = String.raw`import os
import sys
import json
from typing import Dict, List, Optional


def read_json(path: str) -> dict:
    """Read a JSON file and return its contents."""
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


class Counter:
    def __init__(self, name: str, start: int = 0):
        self.name = name
        self.value = start

    def increment(self, step: int = 1) -> int:
        self.value += step
        return self.value

    def reset(self) -> None:
        self.value = 0

    def __repr__(self) -> str:
        return f"Counter(name={self.name!r}, value={self.value})"


def fibonacci(n: int) -> List[int]:
    result = [0, 1]
    for i in range(2, n):
        result.append(result[i - 1] + result[i - 2])
    return result[:n]


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for i in range(2, int(n ** 0.5) + 1):
        if n % i == 0:
            return False
    return True


def group_by(items: List[dict], key: str) -> Dict[str, List[dict]]:
    groups: Dict[str, List[dict]] = {}
    for item in items:
        value = item.get(key)
        if value is None:
            continue
        groups.setdefault(value, []).append(item)
    return groups


def find_files(root: str, suffix: str = ".py") -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for filename in filenames:
            if filename.endswith(suffix):
                found.append(os.path.join(dirpath, filename))
    return sorted(found)


def main(argv: Optional[List[str]] = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        print("usage: main.py <path>")
        return 1
    for path in args:
        data = read_json(path)
        print(path, len(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

import numpy as np
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)

"use strict";

const fs = require("fs");
const path = require("path");

function readLines(file) {
  return fs.readFileSync(file, "utf8").split("\n").filter((line) => line.length > 0);
}

function debounce(fn, wait) {
  let timer = null;
  return function (...args) {
    if (timer !== null) clearTimeout(timer);
    timer = setTimeout(() => {
      timer = null;
      fn.apply(this, args);
    }, wait);
  };
}

async function fetchJson(url, options = {}) {
  const response = await fetch(url, options);
  if (!response.ok) {
    throw new Error("request failed: " + response.status + " " + response.statusText);
  }
  return response.json();
}

class EventEmitter {
  constructor() {
    this.listeners = new Map();
  }

  on(event, listener) {
    if (!this.listeners.has(event)) this.listeners.set(event, []);
    this.listeners.get(event).push(listener);
    return this;
  }

  emit(event, ...args) {
    const listeners = this.listeners.get(event) || [];
    for (const listener of listeners) listener(...args);
    return listeners.length > 0;
  }
}

const sum = (values) => values.reduce((a, b) => a + b, 0);
const unique = (values) => [...new Set(values)];
const chunk = (values, size) => {
  const out = [];
  for (let i = 0; i < values.length; i += size) out.push(values.slice(i, i + size));
  return out;
};

document.addEventListener("DOMContentLoaded", () => {
  const button = document.getElementById("submit");
  const input = document.querySelector("input[name=query]");
  button.addEventListener("click", async (event) => {
    event.preventDefault();
    const results = await fetchJson("/api/search?q=" + encodeURIComponent(input.value));
    console.log(results.length, "results");
  });
});

module.exports = { readLines, debounce, fetchJson, EventEmitter, sum, unique, chunk };

import { readFile, writeFile } from "node:fs/promises";
import type { Request, Response } from "express";

export interface User {
  id: number;
  name: string;
  email: string;
  roles: string[];
  createdAt: Date;
}

export type Result<T> = { ok: true; value: T } | { ok: false; error: string };

export function parseUser(raw: unknown): Result<User> {
  if (typeof raw !== "object" || raw === null) {
    return { ok: false, error: "user must be an object" };
  }
  const value = raw as Record<string, unknown>;
  if (typeof value.id !== "number" || typeof value.name !== "string") {
    return { ok: false, error: "user needs a numeric id and a name" };
  }
  return {
    ok: true,
    value: {
      id: value.id,
      name: value.name,
      email: String(value.email ?? ""),
      roles: Array.isArray(value.roles) ? value.roles.map(String) : [],
      createdAt: new Date(String(value.createdAt ?? Date.now())),
    },
  };
}

export class Cache<K, V> {
  private readonly entries = new Map<K, V>();

  constructor(private readonly capacity: number) {}

  get(key: K): V | undefined {
    const value = this.entries.get(key);
    if (value !== undefined) {
      this.entries.delete(key);
      this.entries.set(key, value);
    }
    return value;
  }

  set(key: K, value: V): void {
    this.entries.delete(key);
    this.entries.set(key, value);
    if (this.entries.size > this.capacity) {
      const oldest = this.entries.keys().next().value as K;
      this.entries.delete(oldest);
    }
  }
}

export async function loadUsers(file: string): Promise<User[]> {
  const text = await readFile(file, "utf8");
  const users: User[] = [];
  for (const raw of JSON.parse(text) as unknown[]) {
    const result = parseUser(raw);
    if (result.ok) users.push(result.value);
  }
  return users;
}

export async function saveUsers(file: string, users: User[]): Promise<void> {
  await writeFile(file, JSON.stringify(users, null, 2) + "\n", "utf8");
}

export function handler(req: Request, res: Response): void {
  const id = Number(req.params.id);
  if (!Number.isInteger(id) || id < 0) {
    res.status(400).json({ error: "invalid id" });
    return;
  }
  res.json({ id, name: "user " + id });
}

export const enum Direction {
  Up = 1,
  Down = 2,
  Left = 3,
  Right = 4,
}

export function clamp(value: number, min: number, max: number): number {
  return Math.min(Math.max(value, min), max);
}
`;
