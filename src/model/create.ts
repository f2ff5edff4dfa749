import { mkdir, writeFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fail } from "../errors.js";
import { buildTokenizerFiles } from "../tokenizer/build.js";
import { SAFETENSORS_FILE, SAFETENSORS_INDEX } from "./checkpoint.js";
import { type ModelConfig, parseModelConfig } from "./config.js";
import { type FloatDType, fromFloat32, isFloatDType } from "./dtype.js";
import { checkOutDir, writeAtomically } from "./files.js";
import { type TensorDraw, randomDraws } from "./random.js";
import { type TensorToWrite, safetensorsDType, tensorBytes, writeSafetensors } from "./safetensors.js";

/**
 * `decima create-model`: a complete Hugging Face model directory with random weights (see random.ts), in
 * DeciCoder's or DeciLM's own config format, for tests and benchmarks without downloading anything.
 */

export interface Preset {
  architecture: "DeciCoderForCausalLM" | "DeciLMForCausalLM";
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  /** The same for every layer, or DeciLM's count per layer. */
  kvHeads: number | number[];
  intermediateSize: number;
}

export const PRESETS = {
  tiny: {
    architecture: "DeciCoderForCausalLM",
    vocabSize: 1024,
    hiddenSize: 256,
    numLayers: 2,
    numHeads: 4,
    kvHeads: 2,
    intermediateSize: 688,
  },
  "decilm-tiny": {
    architecture: "DeciLMForCausalLM",
    vocabSize: 1024,
    hiddenSize: 256,
    numLayers: 3,
    numHeads: 4,
    kvHeads: [1, 2, 4],
    intermediateSize: 512,
  },
  "decicoder-1b": {
    architecture: "DeciCoderForCausalLM",
    vocabSize: 49152,
    hiddenSize: 2048,
    numLayers: 20,
    numHeads: 32,
    kvHeads: 4,
    intermediateSize: 5888,
  },
} satisfies Record<string, Preset>;

export type PresetName = keyof typeof PRESETS;

export interface CreateModelOptions {
  preset: PresetName;
  out: string;
  /** Default 0. */
  seed?: number;
  /** Storage type of the weights (default bfloat16); the values are the same fp32 draws whatever it is. */
  dtype?: FloatDType;
  /** Weights larger than this are split into shards (default 2 GB, as Hugging Face counts: 10^9). */
  shardBytes?: number;
  /** Called as the weights are written: bytes so far, of `totalBytes`. */
  onProgress?: (bytes: number, totalBytes: number) => void;
}

const TRANSFORMERS_VERSION = "4.31.0"; // what DeciCoder-1b's own config.json says

/**
 * Write the model directory `out` (absent or empty): config.json, generation_config.json, tokenizer files
 * and safetensors weights. It is built beside `out` and renamed into place, so a failure leaves nothing.
 */
export async function createModel(options: CreateModelOptions): Promise<{ dir: string; config: ModelConfig }> {
  const { preset, seed, dtype, shardBytes } = checkOptions(options);
  const out = resolve(options.out);
  await checkOutDir(out);
  const configJson = presetConfigJson(preset, dtype);
  const config = parseModelConfig(configJson, `preset ${options.preset}`);
  await mkdir(dirname(out), { recursive: true });
  await writeAtomically(out, async (tmp) => {
    await mkdir(tmp);
    // The tokenizer covers the whole model vocabulary (its BPE part is small): every generated id is text.
    const { tokenizerJson, tokenizerConfig } = buildTokenizerFiles({ vocabSize: preset.vocabSize });
    await writeJson(join(tmp, "config.json"), configJson);
    await writeJson(join(tmp, "generation_config.json"), generationConfigJson());
    await writeJson(join(tmp, "tokenizer.json"), tokenizerJson);
    await writeJson(join(tmp, "tokenizer_config.json"), tokenizerConfig);
    await writeWeights(tmp, config, seed, dtype, shardBytes, options.onProgress);
  });
  return { dir: out, config };
}

function checkOptions(o: CreateModelOptions) {
  if (!Object.hasOwn(PRESETS, o.preset)) {
    fail("input", `--preset ${o.preset}: unknown preset (${Object.keys(PRESETS).join(", ")})`);
  }
  const seed = o.seed ?? 0;
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) {
    fail("input", `--seed ${seed}: must be an integer from 0 to ${0xffffffff}`);
  }
  const dtype = o.dtype ?? "bfloat16";
  if (!isFloatDType(dtype)) fail("input", `--dtype ${dtype}: must be float32, float16 or bfloat16`);
  const shardBytes = o.shardBytes ?? 2e9;
  if (!(shardBytes > 0)) fail("input", `shard size ${shardBytes}: must be positive`);
  return { preset: PRESETS[o.preset] as Preset, seed, dtype, shardBytes };
}


/** config.json as DeciCoder-1b (or DeciLM) publishes it, keys sorted as transformers writes them. */
export function presetConfigJson(preset: Preset, dtype: FloatDType): Record<string, unknown> {
  const deciLM = preset.architecture === "DeciLMForCausalLM";
  const json: Record<string, unknown> = {
    architectures: [preset.architecture],
    model_type: deciLM ? "deci" : "llama",
    vocab_size: preset.vocabSize,
    hidden_size: preset.hiddenSize,
    intermediate_size: preset.intermediateSize,
    num_hidden_layers: preset.numLayers,
    num_attention_heads: preset.numHeads,
    ...(Array.isArray(preset.kvHeads)
      ? { num_key_value_heads_per_layer: preset.kvHeads }
      : { num_key_value_heads: preset.kvHeads }),
    hidden_act: "silu",
    max_position_embeddings: 2048,
    rope_theta: 10000.0,
    rope_scaling: null,
    rms_norm_eps: 1e-5,
    initializer_range: 0.02,
    // StarCoder's <|endoftext|> is both.
    bos_token_id: 0,
    eos_token_id: 0,
    tie_word_embeddings: false,
    torch_dtype: dtype,
    use_cache: true,
    pretraining_tp: 1,
    transformers_version: TRANSFORMERS_VERSION,
  };
  if (!deciLM) {
    // DeciCoder's switches between its attention implementations; its published values.
    Object.assign(json, {
      naive_attention_prefill: false,
      naive_attention_decode_batched: true,
      naive_attention_decode_single: false,
    });
  }
  return Object.fromEntries(Object.entries(json).sort(([a], [b]) => (a < b ? -1 : 1)));
}

function generationConfigJson(): object {
  return { _from_model_config: true, bos_token_id: 0, eos_token_id: 0, transformers_version: TRANSFORMERS_VERSION };
}

async function writeJson(file: string, value: unknown): Promise<void> {
  await writeFile(file, `${JSON.stringify(value, null, 2)}\n`);
}

/**
 * Random weights, drawn and written through a small buffer (decicoder-1b is 1.1B parameters: never all in
 * memory, and fresh memory is slow to fill), as model.safetensors or as Hugging Face-style shards with an
 * index.
 */
async function writeWeights(
  dir: string,
  config: ModelConfig,
  seed: number,
  dtype: FloatDType,
  shardBytes: number,
  onProgress?: (bytes: number, totalBytes: number) => void,
) {
  const scratch = new Float32Array(1 << 20);
  let written = 0;
  const pieces = function* (t: TensorDraw): Generator<Uint8Array> {
    for (let left = t.shape.reduce((a, b) => a * b, 1); left > 0; left -= scratch.length) {
      const piece = scratch.subarray(0, Math.min(left, scratch.length));
      t.draw(piece);
      const bytes = fromFloat32(piece, dtype);
      yield bytes;
      written += bytes.byteLength;
      onProgress?.(written, totalSize);
    }
  };
  // The writer asks for tensors in the order listed, which is the order randomDraws needs.
  const tensors: TensorToWrite[] = randomDraws(config, seed).map((t) => ({
    name: t.name,
    dtype: safetensorsDType(dtype),
    shape: t.shape,
    data: () => pieces(t),
  }));
  const totalSize = tensors.reduce((sum, t) => sum + tensorBytes(t), 0);
  // transformers' own metadata; its loader refuses safetensors files without it.
  const metadata = { format: "pt" };
  const shards = splitIntoShards(tensors, shardBytes);
  if (shards.length === 1) {
    await writeSafetensors(join(dir, SAFETENSORS_FILE), tensors, metadata);
    return;
  }
  const weightMap: Record<string, string> = {};
  for (const [i, shard] of shards.entries()) {
    const pad = (n: number) => String(n).padStart(5, "0");
    const file = `model-${pad(i + 1)}-of-${pad(shards.length)}.safetensors`;
    await writeSafetensors(join(dir, file), shard, metadata);
    for (const t of shard) weightMap[t.name] = file;
  }
  await writeJson(join(dir, SAFETENSORS_INDEX), { metadata: { total_size: totalSize }, weight_map: weightMap });
}

/** As transformers shards: a new shard when the next tensor would overflow a non-empty one. */
function splitIntoShards(tensors: TensorToWrite[], limit: number): TensorToWrite[][] {
  const shards: TensorToWrite[][] = [[]];
  let size = 0;
  for (const t of tensors) {
    if (size + tensorBytes(t) > limit && shards[shards.length - 1].length > 0) {
      shards.push([]);
      size = 0;
    }
    shards[shards.length - 1].push(t);
    size += tensorBytes(t);
  }
  return shards;
}
