import { type FileHandle, open, stat } from "node:fs/promises";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { z } from "zod";
import { fail, oneLine } from "../errors.js";
import { type ModelConfig, parseModelConfig, qkvRows } from "./config.js";
import { type FloatDType, bytesPerElement } from "./dtype.js";
import { exists, readAt, readJson, writeAt } from "./files.js";
import type { DenseMatrix, LayerWeights, LinearWeight, ModelWeights, Vector } from "./weights.js";
import { type Quantization, quantizeHead, quantizeLayer } from "./quantize.js";

/**
 * A decima engine is a directory built once by `decima build` and loaded many times:
 *   engine.json   what was built, from what, and the tensor table (format, shape, place in weights.bin)
 *   weights.bin   every tensor's bytes exactly as ModelWeights holds them, each region 256-byte aligned,
 *                 so loading is one positioned read per region and no conversion
 *   config.json and the tokenizer files, copied from the source, so the directory is also a model
 *   directory for everything that reads one (resolveModel, Tokenizer.load).
 */

export const ENGINE_FILE = "engine.json";
export const WEIGHTS_FILE = "weights.bin";
export const ENGINE_FORMAT = "decima-engine";
export const ENGINE_VERSION = 2;  // 2: quantized engines store the LM head as int8
/** Every region of weights.bin starts at a multiple of this, so GPU copies and mapped views are aligned. */
export const ALIGNMENT = 256;


/** A tensor as ModelWeights holds it. */
export type StoredTensor = Vector | LinearWeight;

const count = z.number().int().nonnegative();
const size = z.number().int().positive();
const floatDType = z.enum(["float32", "float16", "bfloat16"]);
const region = { name: z.string(), offset: count, bytes: count };
const scalesRegion = { scaleDtype: floatDType, rows: size, cols: size, scalesOffset: count, scalesBytes: count };
const tensorSchema = z.discriminatedUnion("format", [
  z.object({ ...region, format: z.literal("vector"), dtype: floatDType, length: size }),
  z.object({ ...region, format: z.literal("dense"), dtype: floatDType, rows: size, cols: size }),
  z.object({ ...region, format: z.literal("int8"), ...scalesRegion }),
  z.object({ ...region, format: z.literal("int4"), ...scalesRegion, groupSize: size }),
]);

const manifestSchema = z.object({
  format: z.literal(ENGINE_FORMAT),
  version: z.literal(ENGINE_VERSION),
  /** The source's config.json, verbatim. */
  config: z.record(z.string(), z.unknown()),
  /** Storage type of the 16-bit tensors (embeddings, norms, dense matrices). */
  dtype: z.enum(["float16", "bfloat16"]),
  quant: z.object({ kind: z.enum(["none", "int8", "int4"]), groupSize: size.optional() }),
  source: z.object({
    model: z.string(),
    files: z.array(z.object({ name: z.string(), bytes: count, sha256: z.string().regex(/^[0-9a-f]{64}$/) })),
  }),
  tokenizerFiles: z.array(z.string()),
  created: z.iso.datetime(),
  decimaVersion: z.string(),
  tensors: z.array(tensorSchema),
});

/** A tensor table entry: where a tensor's bytes (and scales) lie in weights.bin, and what they hold. */
export type EngineTensor = z.infer<typeof tensorSchema>;
export type EngineManifest = z.infer<typeof manifestSchema>;

/** An engine directory's validated manifest, ready for a loader (this one, or a native one). */
export interface EngineInfo {
  manifest: EngineManifest;
  /** The source config, with `dtype` the engine's storage type. */
  config: ModelConfig;
  weightsPath: string;
}

export interface LoadedEngine {
  weights: ModelWeights;
  manifest: EngineManifest;
  /** weights.bin read: bytes and milliseconds (bandwidth = bytes / ms). */
  stats: { bytes: number; ms: number };
}

const LAYER_PARTS = ["inputNorm", "qkv", "o", "postNorm", "gateUp", "down"] as const satisfies (keyof LayerWeights)[];

export async function isEngineDir(dir: string): Promise<boolean> {
  return exists(join(dir, ENGINE_FILE));
}

/**
 * Every tensor of `weights` by its engine name ("embed", "layers.3.qkv", ...), in weights.bin order; a tied
 * LM head is the embedding, stored once. With `quant`, each layer and the LM head are quantized as their
 * turn comes (so only one quantized matrix is in memory at a time).
 */
export function* engineTensors(weights: ModelWeights, quant: Quantization = { kind: "none" }): Generator<[string, StoredTensor]> {
  yield ["embed", weights.embed];
  for (const [i, original] of weights.layers.entries()) {
    const layer = quantizeLayer(original, quant, `layers.${i}`);
    for (const part of LAYER_PARTS) yield [`layers.${i}.${part}`, layer[part]];
  }
  yield ["norm", weights.norm];
  if (weights.lmHead !== weights.embed) yield ["lmHead", quantizeHead(weights.lmHead, quant)];
}

/**
 * Write weights.bin (a new file), tensor by tensor as `tensors` yields them, and return its tensor table.
 * Gaps left for alignment read back as zeros.
 */
export async function writeEngineWeights(
  file: string,
  tensors: Iterable<[string, StoredTensor]>,
  onTensor?: (name: string) => void,
): Promise<EngineTensor[]> {
  const fh = await open(file, "wx");
  const table: EngineTensor[] = [];
  let end = 0;
  const put = async (bytes: Uint8Array): Promise<number> => {
    const offset = alignUp(end);
    end = await writeAt(fh, bytes, offset);
    return offset;
  };
  try {
    for (const [name, t] of tensors) {
      const offset = await put(t.data);
      table.push(tableEntry(name, t, offset, "scales" in t ? await put(t.scales) : 0));
      onTensor?.(name);
    }
  } finally {
    await fh.close();
  }
  return table;
}

function tableEntry(name: string, t: StoredTensor, offset: number, scalesOffset: number): EngineTensor {
  const bytes = t.data.byteLength;
  if (!("format" in t)) return { name, format: "vector", dtype: t.dtype, length: t.length, offset, bytes };
  const { rows, cols } = t;
  if (t.format === "dense") return { name, format: "dense", dtype: t.dtype, rows, cols, offset, bytes };
  const scales = { scaleDtype: t.scaleDtype, rows, cols, scalesOffset, scalesBytes: t.scales.byteLength };
  if (t.format === "int8") return { name, format: "int8", ...scales, offset, bytes };
  return { name, format: "int4", ...scales, groupSize: t.groupSize, offset, bytes };
}

/**
 * Read and check an engine directory's engine.json against its config and weights.bin, without reading
 * the weights: every tensor the config needs, of the right shape, format and size, at its place in the
 * layout, and weights.bin exactly as long as the layout.
 */
export async function readEngineManifest(dir: string): Promise<EngineInfo> {
  const file = join(dir, ENGINE_FILE);
  const manifest = parseManifest(await readJson(file, "engine"), file);
  const config = { ...parseModelConfig(manifest.config, `${file}: config`), dtype: manifest.dtype };
  checkTensors(manifest, config, file);
  const weightsPath = join(dir, WEIGHTS_FILE);
  checkLayout(manifest.tensors, await fileSize(weightsPath), weightsPath, file);
  return { manifest, config, weightsPath };
}

/**
 * Load an engine's weights: one positioned read per region into a buffer of its own, no conversion.
 * `dtype`, when given, must be the one the engine was built with.
 */
export async function readEngine(dir: string, options: { dtype?: FloatDType } = {}): Promise<LoadedEngine> {
  const { manifest, config, weightsPath } = await readEngineManifest(dir);
  if (options.dtype !== undefined && options.dtype !== manifest.dtype) {
    fail(
      "input",
      `${dir}: the engine was built with ${manifest.dtype} weights, ${options.dtype} was asked for; leave the dtype out or rebuild the engine (decima build --dtype)`,
    );
  }
  const start = performance.now();
  const tensors = new Map<string, StoredTensor>();
  const fh = await openFile(weightsPath);
  try {
    for (const t of manifest.tensors) tensors.set(t.name, await readTensor(fh, weightsPath, t));
  } finally {
    await fh.close();
  }
  const ms = performance.now() - start;
  const bytes = manifest.tensors.reduce((n, t) => n + regionsOf(t).reduce((m, r) => m + r.bytes, 0), 0);
  return { weights: assemble(config, manifest.dtype, tensors), manifest, stats: { bytes, ms } };
}

function parseManifest(raw: unknown, file: string): EngineManifest {
  // Format and version first: another version's other fields may differ in any way.
  const head = z.object({ format: z.string(), version: z.number() }).safeParse(raw);
  if (head.success && head.data.format !== ENGINE_FORMAT) {
    fail("engine", `${file}: format "${head.data.format}" is not a decima engine (${ENGINE_FORMAT})`);
  }
  if (head.success && head.data.version !== ENGINE_VERSION) {
    fail(
      "engine",
      `${file}: engine version ${head.data.version}; this decima reads version ${ENGINE_VERSION} (rebuild the engine with decima build)`,
    );
  }
  const parsed = manifestSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    fail("engine", `${file}: ${issue.path.join(".") || "(root)"}: ${issue.message}`);
  }
  return parsed.data;
}

/** What the config needs, by engine name: format and shape ([length] for vectors, [rows, cols] else). */
function expectedTensors(config: ModelConfig, quant: EngineManifest["quant"]) {
  const h = config.hiddenSize;
  const linear = quant.kind === "none" ? "dense" : quant.kind;
  const want = new Map<string, { format: EngineTensor["format"]; shape: number[] }>([
    ["embed", { format: "dense", shape: [config.vocabSize, h] }],
    ["norm", { format: "vector", shape: [h] }],
  ]);
  if (!config.tieWordEmbeddings) want.set("lmHead", { format: quant.kind === "none" ? "dense" : "int8", shape: [config.vocabSize, h] });
  config.layers.forEach((l, i) => {
    const shapes: Record<(typeof LAYER_PARTS)[number], number[]> = {
      inputNorm: [h],
      qkv: [qkvRows(l), h],
      o: [h, l.numHeads * l.headDim],
      postNorm: [h],
      gateUp: [2 * l.intermediateSize, h],
      down: [h, l.intermediateSize],
    };
    for (const part of LAYER_PARTS) {
      const shape = shapes[part];
      want.set(`layers.${i}.${part}`, { format: shape.length === 1 ? "vector" : linear, shape });
    }
  });
  return want;
}

function checkTensors(manifest: EngineManifest, config: ModelConfig, file: string): void {
  if ((manifest.quant.kind === "int4") !== (manifest.quant.groupSize !== undefined)) {
    fail("engine", `${file}: quant.groupSize must be given for int4, and only for int4`);
  }
  const want = expectedTensors(config, manifest.quant);
  const seen = new Set<string>();
  for (const t of manifest.tensors) {
    const where = `${file}: tensor ${t.name}`;
    const w = want.get(t.name);
    if (!w) fail("engine", `${where}: not a tensor of this model`);
    if (seen.has(t.name)) fail("engine", `${where}: listed twice`);
    seen.add(t.name);
    if (t.format !== w.format) fail("engine", `${where}: is ${t.format}, the engine's quantization needs ${w.format}`);
    const shape = t.format === "vector" ? [t.length] : [t.rows, t.cols];
    if (shape.join() !== w.shape.join()) fail("engine", `${where}: shape [${shape}], the config needs [${w.shape}]`);
    if ((t.format === "vector" || t.format === "dense") && t.dtype !== manifest.dtype) {
      fail("engine", `${where}: is ${t.dtype}, the engine is ${manifest.dtype}`);
    }
    if (t.format === "int4") {
      const fits = t.groupSize === manifest.quant.groupSize && t.cols % t.groupSize === 0 && t.cols % 2 === 0;
      if (!fits) {
        fail("engine", `${where}: group size ${t.groupSize} does not fit (quant.groupSize ${manifest.quant.groupSize}, ${t.cols} columns)`);
      }
    }
    for (const r of regionsOf(t)) {
      if (r.bytes !== r.needed) fail("engine", `${where}: ${r.what} ${r.bytes} bytes, its shape needs ${r.needed}`);
    }
  }
  const missing = [...want.keys()].find((name) => !seen.has(name));
  if (missing) fail("engine", `${file}: tensor ${missing} is missing`);
}

interface Region {
  what: "data" | "scales";
  offset: number;
  bytes: number;
  /** What the tensor's format and shape take. */
  needed: number;
}

function regionsOf(t: EngineTensor): Region[] {
  const data = (needed: number): Region => ({ what: "data", offset: t.offset, bytes: t.bytes, needed });
  if (t.format === "vector") return [data(t.length * bytesPerElement(t.dtype))];
  if (t.format === "dense") return [data(t.rows * t.cols * bytesPerElement(t.dtype))];
  const scaleCount = t.format === "int8" ? t.rows : (t.rows * t.cols) / t.groupSize;
  const scales: Region = {
    what: "scales",
    offset: t.scalesOffset,
    bytes: t.scalesBytes,
    needed: scaleCount * bytesPerElement(t.scaleDtype),
  };
  return [data(t.format === "int8" ? t.rows * t.cols : (t.rows * t.cols) / 2), scales];
}

/** The regions must lie where the writer puts them: in table order, each aligned, and nothing after. */
function checkLayout(tensors: EngineTensor[], fileBytes: number, weightsPath: string, file: string): void {
  let end = 0;
  for (const t of tensors) for (const r of regionsOf(t)) end = alignUp(end) + r.bytes;
  if (fileBytes < end) {
    fail("engine", `${weightsPath}: ${fileBytes} bytes, ${file} lays out ${end}: the file is truncated`);
  }
  if (fileBytes > end) fail("engine", `${weightsPath}: ${fileBytes} bytes, ${file} lays out only ${end}`);
  end = 0;
  for (const t of tensors) {
    for (const r of regionsOf(t)) {
      const where = `${file}: tensor ${t.name}: ${r.what} at [${r.offset}, ${r.offset + r.bytes})`;
      if (r.offset + r.bytes > fileBytes) {
        fail("engine", `${where} runs past the end of ${weightsPath} (${fileBytes} bytes)`);
      }
      if (r.offset !== alignUp(end)) fail("engine", `${where}: the layout puts it at ${alignUp(end)}`);
      end = r.offset + r.bytes;
    }
  }
}

async function readTensor(fh: FileHandle, path: string, t: EngineTensor): Promise<StoredTensor> {
  const [data, scales] = await Promise.all(regionsOf(t).map((r) => readAt(fh, path, r.offset, r.bytes, "engine")));
  switch (t.format) {
    case "vector":
      return { dtype: t.dtype, length: t.length, data };
    case "dense":
      return { format: "dense", rows: t.rows, cols: t.cols, dtype: t.dtype, data };
    case "int8":
      return { format: "int8", rows: t.rows, cols: t.cols, data, scales, scaleDtype: t.scaleDtype };
    case "int4":
      return { format: "int4", rows: t.rows, cols: t.cols, groupSize: t.groupSize, data, scales, scaleDtype: t.scaleDtype };
  }
}

/** ModelWeights from tensors checked by checkTensors (so every name is there, in its format). */
function assemble(config: ModelConfig, dtype: FloatDType, tensors: Map<string, StoredTensor>): ModelWeights {
  const get = <T extends StoredTensor>(name: string) => tensors.get(name) as T;
  const embed = get<DenseMatrix>("embed");
  const layers = config.layers.map((_, i): LayerWeights => {
    const part = <T extends StoredTensor>(p: (typeof LAYER_PARTS)[number]) => get<T>(`layers.${i}.${p}`);
    return {
      inputNorm: part<Vector>("inputNorm"),
      qkv: part<LinearWeight>("qkv"),
      o: part<LinearWeight>("o"),
      postNorm: part<Vector>("postNorm"),
      gateUp: part<LinearWeight>("gateUp"),
      down: part<LinearWeight>("down"),
    };
  });
  const lmHead = config.tieWordEmbeddings ? embed : get<LinearWeight>("lmHead");
  return { config, dtype, embed, layers, norm: get<Vector>("norm"), lmHead };
}

function alignUp(n: number): number {
  return Math.ceil(n / ALIGNMENT) * ALIGNMENT;
}

async function openFile(path: string): Promise<FileHandle> {
  try {
    return await open(path, "r");
  } catch (err) {
    fail("engine", `${path}: cannot open (${oneLine(err)})`, err);
  }
}

async function fileSize(path: string): Promise<number> {
  try {
    return (await stat(path)).size;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    fail("engine", code === "ENOENT" ? `${path}: no such file` : `${path}: cannot read (${oneLine(err)})`, err);
  }
}

