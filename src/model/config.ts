import { z } from "zod";
import { fail } from "../errors.js";
import { type FloatDType, isFloatDType } from "./dtype.js";

/**
 * One decoder, driven by its config: DeciCoder, DeciLM (KV heads per layer) and Llama all become a list
 * of per-layer specs. Nothing downstream asks which family a model came from.
 */
export interface LayerSpec {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  intermediateSize: number;
}

export interface RopeSpec {
  theta: number;
  /** Linear position interpolation: positions are divided by this (1 when unscaled). */
  linearFactor: number;
}

export interface ModelConfig {
  architecture: string;
  modelType: string;
  vocabSize: number;
  hiddenSize: number;
  layers: LayerSpec[];
  rmsNormEps: number;
  rope: RopeSpec;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  bosTokenId: number | null;
  eosTokenIds: number[];
  /** The checkpoint's declared storage type (`torch_dtype`/`dtype`), if any. */
  dtype: FloatDType | null;
  /** A GPTQ checkpoint (4-bit, symmetric, no act-order): its linear layers' group size (src/model/gptq.ts). */
  gptq?: { groupSize: number };
}

export const SUPPORTED_ARCHITECTURES = ["DeciCoderForCausalLM", "DeciLMForCausalLM", "LlamaForCausalLM"] as const;
const SUPPORTED_MODEL_TYPES = ["decicoder", "deci", "llama"];

const positiveInt = z.number().int().positive();
const tokenIds = z.union([z.number().int().nonnegative(), z.array(z.number().int().nonnegative())]);

const ropeScalingSchema = z
  .object({
    type: z.string().optional(),
    rope_type: z.string().optional(),
    factor: z.number().positive().optional(),
  })
  .nullable()
  .optional();

/** The keys decima reads; everything else in config.json (auto_map, pretraining_tp, ...) is ignored. */
const hfConfigSchema = z.object({
  architectures: z.array(z.string()).min(1),
  model_type: z.string().optional(),
  vocab_size: positiveInt,
  hidden_size: positiveInt,
  intermediate_size: positiveInt,
  num_hidden_layers: positiveInt,
  num_attention_heads: positiveInt,
  num_key_value_heads: positiveInt.optional(),
  num_key_value_heads_per_layer: z.array(positiveInt).optional(),
  head_dim: positiveInt.optional(),
  hidden_act: z.string().optional(),
  rms_norm_eps: z.number().positive().optional(),
  rope_theta: z.number().positive().optional(),
  rope_scaling: ropeScalingSchema,
  max_position_embeddings: positiveInt.optional(),
  tie_word_embeddings: z.boolean().optional(),
  bos_token_id: tokenIds.nullable().optional(),
  eos_token_id: tokenIds.nullable().optional(),
  torch_dtype: z.string().nullable().optional(),
  dtype: z.string().nullable().optional(),
  attention_bias: z.boolean().optional(),
  mlp_bias: z.boolean().optional(),
  quantization_config: z
    .object({
      quant_method: z.string().optional(),
      bits: z.number().optional(),
      group_size: z.number().optional(),
      desc_act: z.boolean().optional(),
      sym: z.boolean().optional(),
      checkpoint_format: z.string().optional(),
    })
    .passthrough()
    .optional(),
});

type HfConfig = z.infer<typeof hfConfigSchema>;

/** Parse a config.json object; `where` names the file in error messages. */
export function parseModelConfig(raw: unknown, where = "config.json"): ModelConfig {
  const parsed = hfConfigSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const key = issue.path.length ? issue.path.join(".") : "(root)";
    fail("config", `${where}: ${key}: ${issue.message}`);
  }
  const c = parsed.data;
  checkArchitecture(c, where);
  if (c.hidden_act !== undefined && c.hidden_act !== "silu") {
    fail("config", `${where}: hidden_act "${c.hidden_act}" is not supported (only silu)`);
  }
  if (c.attention_bias || c.mlp_bias) fail("config", `${where}: attention/MLP biases are not supported`);

  const headDim = c.head_dim ?? c.hidden_size / c.num_attention_heads;
  if (!Number.isInteger(headDim) || headDim % 2 !== 0) {
    fail("config", `${where}: head size ${headDim} must be an even integer`);
  }
  const kvHeads = kvHeadsPerLayer(c, where);
  const layers = kvHeads.map((numKvHeads) => ({
    numHeads: c.num_attention_heads,
    numKvHeads,
    headDim,
    intermediateSize: c.intermediate_size,
  }));
  const dtype = c.dtype ?? c.torch_dtype ?? null;
  return {
    architecture: c.architectures[0],
    modelType: c.model_type ?? "llama",
    vocabSize: c.vocab_size,
    hiddenSize: c.hidden_size,
    layers,
    rmsNormEps: c.rms_norm_eps ?? 1e-6,
    rope: { theta: c.rope_theta ?? 10000, linearFactor: linearRopeFactor(c, where) },
    maxPositionEmbeddings: c.max_position_embeddings ?? 2048,
    tieWordEmbeddings: c.tie_word_embeddings ?? false,
    bosTokenId: firstId(c.bos_token_id),
    eosTokenIds: allIds(c.eos_token_id),
    dtype: dtype !== null && isFloatDType(dtype) ? dtype : null,
    ...gptqOf(c, where),
  };
}

/**
 * A pre-quantized checkpoint holds no 16-bit weights to read. GPTQ's symmetric 4-bit groups without
 * act-order are decima's int4 format repacked; anything else (AWQ's and asymmetric GPTQ's zero points,
 * act-order, bitsandbytes, FP8) is refused.
 */
function gptqOf(c: HfConfig, where: string): Pick<ModelConfig, "gptq"> {
  const q = c.quantization_config;
  if (!q) return {};
  const method = q.quant_method ?? "unknown";
  if (method !== "gptq") {
    fail("config", `${where}: a pre-quantized checkpoint (quantization_config, method "${method}") is not supported; quantize a 16-bit one with decima build --quant int8|int4`);
  }
  const why =
    q.bits !== 4 ? `${q.bits ?? "unknown"} bits`
    : q.sym === false ? "with zero points (sym: false)"
    : q.desc_act ? "with act-order (desc_act: true)"
    : q.checkpoint_format !== undefined && q.checkpoint_format !== "gptq" ? `checkpoint_format "${q.checkpoint_format}"`
    : !(Number.isInteger(q.group_size) && q.group_size! > 0) ? `group_size ${q.group_size ?? "unknown"}`
    : null;
  if (why) fail("config", `${where}: GPTQ ${why} is not supported (4 bits, symmetric, without act-order, in groups)`);
  return { gptq: { groupSize: q.group_size! } };
}

function checkArchitecture(c: HfConfig, where: string): void {
  const arch = c.architectures[0];
  if (!(SUPPORTED_ARCHITECTURES as readonly string[]).includes(arch)) {
    fail("config", `${where}: unknown architecture "${arch}" (supported: ${SUPPORTED_ARCHITECTURES.join(", ")})`);
  }
  if (c.model_type !== undefined && !SUPPORTED_MODEL_TYPES.includes(c.model_type)) {
    fail("config", `${where}: unknown model_type "${c.model_type}" (supported: ${SUPPORTED_MODEL_TYPES.join(", ")})`);
  }
}

function kvHeadsPerLayer(c: HfConfig, where: string): number[] {
  const perLayer = c.num_key_value_heads_per_layer;
  if (perLayer !== undefined && perLayer.length !== c.num_hidden_layers) {
    fail(
      "config",
      `${where}: num_key_value_heads_per_layer has ${perLayer.length} entries for ${c.num_hidden_layers} layers`,
    );
  }
  const heads = perLayer ?? new Array<number>(c.num_hidden_layers).fill(c.num_key_value_heads ?? c.num_attention_heads);
  for (const kv of heads) {
    if (c.num_attention_heads % kv !== 0) {
      fail("config", `${where}: ${c.num_attention_heads} attention heads are not a multiple of ${kv} KV heads`);
    }
  }
  return heads;
}

function linearRopeFactor(c: HfConfig, where: string): number {
  const s = c.rope_scaling;
  if (!s) return 1;
  const kind = s.rope_type ?? s.type ?? "default";
  if (kind === "default") return 1;
  if (kind !== "linear") fail("config", `${where}: rope_scaling type "${kind}" is not supported (only linear)`);
  if (s.factor === undefined) fail("config", `${where}: rope_scaling.factor is missing`);
  return s.factor;
}

function firstId(v: number | number[] | null | undefined): number | null {
  if (v === undefined || v === null) return null;
  return Array.isArray(v) ? (v[0] ?? null) : v;
}

function allIds(v: number | number[] | null | undefined): number[] {
  if (v === undefined || v === null) return [];
  return Array.isArray(v) ? v : [v];
}

/** Every layer's attention width, for sizing buffers. */
export function qkvRows(layer: LayerSpec): number {
  return (layer.numHeads + 2 * layer.numKvHeads) * layer.headDim;
}
