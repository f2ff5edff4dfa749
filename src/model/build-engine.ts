import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { copyFile, mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { fail, oneLine } from "../errors.js";
import { Checkpoint, SAFETENSORS_FILE, SAFETENSORS_INDEX, readShardIndex } from "./checkpoint.js";
import type { ModelConfig } from "./config.js";
import type { FloatDType } from "./dtype.js";
import {
  ENGINE_FILE,
  ENGINE_FORMAT,
  ENGINE_VERSION,
  type EngineManifest,
  WEIGHTS_FILE,
  engineTensors,
  isEngineDir,
  writeEngineWeights,
} from "./engine-file.js";
import { checkOutDir, exists, readJson, writeAtomically } from "./files.js";
import { loadWeights, resolveModel } from "./model-dir.js";
import { DEFAULT_GROUP_SIZE, type QuantKind, type Quantization, checkQuantization } from "./quantize.js";

/**
 * `decima build`: a Hugging Face model (directory or hub id) to an engine directory (see engine-file.ts),
 * with weights packed, converted to 16 bits and optionally quantized once, so that loading is reading.
 */

export interface BuildOptions {
  /** A model directory or a Hugging Face hub id. */
  model: string;
  /** The engine directory to write: absent or empty. */
  out: string;
  /** 16-bit storage type; default the checkpoint's own (bfloat16 for fp32 checkpoints). */
  dtype?: FloatDType;
  /** Default "none". */
  quant?: QuantKind;
  /** int4 only (default 128). */
  groupSize?: number;
  /** Called after each tensor is written (the library itself prints nothing). */
  onProgress?: (progress: BuildProgress) => void;
}

export interface BuildProgress {
  tensor: string;
  done: number;
  total: number;
}

export interface BuiltEngine {
  dir: string;
  manifest: EngineManifest;
  /** Size of weights.bin. */
  bytes: number;
  ms: number;
}

type SourceFile = EngineManifest["source"]["files"][number];

/** Copied into the engine when the source has them, so the engine directory loads a tokenizer too. */
const TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/**
 * What to quantize to: as asked (none by default), and for a GPTQ checkpoint its own int4 groups, whose
 * values pass through as they are.
 */
function quantization(config: ModelConfig, options: BuildOptions, dir: string): Quantization {
  if (config.gptq) {
    const g = config.gptq.groupSize;
    if ((options.quant ?? "int4") !== "int4" || (options.groupSize ?? g) !== g) {
      fail("input", `${dir}: a GPTQ checkpoint is int4 in groups of ${g} already: build it with --quant int4 --group-size ${g} (the defaults for it)`);
    }
    return { kind: "int4", groupSize: g };
  }
  const kind = options.quant ?? "none";
  // A group size given with another kind stays, for checkQuantization to refuse.
  return { kind, groupSize: kind === "int4" ? (options.groupSize ?? DEFAULT_GROUP_SIZE) : options.groupSize };
}

/**
 * Build an engine: everything is checked before any weight is read, the weights are loaded once, and each
 * layer is quantized and written as its turn comes. The directory is built beside `out` and renamed into
 * place at the end, so a failure leaves nothing behind.
 */
export async function buildEngine(options: BuildOptions): Promise<BuiltEngine> {
  const start = performance.now();
  await checkOutDir(options.out);
  const { dir, config, source } = await resolveModel(options.model);
  if (await isEngineDir(dir)) fail("input", `${dir}: is a decima engine already; build from a Hugging Face model`);
  const quant = quantization(config, options, dir);
  checkQuantization(config, quant);
  const dtype = await storageType(dir, config, options.dtype);
  const rawConfig = (await readJson(join(dir, "config.json"), "config")) as Record<string, unknown>;
  const sourceFiles: SourceFile[] = [];
  for (const name of ["config.json", ...(await weightFiles(dir))]) sourceFiles.push(await describeFile(dir, name));

  const tokenizerFiles: string[] = [];
  for (const name of TOKENIZER_FILES) if (await exists(join(dir, name))) tokenizerFiles.push(name);

  const weights = await loadWeights(dir, config, dtype);
  const total = [...engineTensors(weights)].length;
  let manifest!: EngineManifest;
  await writeAtomically(options.out, async (tmp) => {
    await mkdir(tmp, { recursive: true });
    let done = 0;
    const tensors = await writeEngineWeights(
      join(tmp, WEIGHTS_FILE),
      engineTensors(weights, quant),
      (tensor) => options.onProgress?.({ tensor, done: ++done, total }),
    );
    for (const name of ["config.json", ...tokenizerFiles]) await copyFile(join(dir, name), join(tmp, name));
    manifest = {
      format: ENGINE_FORMAT,
      version: ENGINE_VERSION,
      config: rawConfig,
      dtype,
      quant: quant.kind === "int4" ? quant : { kind: quant.kind },
      source: { model: source, files: sourceFiles },
      tokenizerFiles,
      created: new Date().toISOString(),
      decimaVersion: await decimaVersion(),
      tensors,
    };
    await writeFile(join(tmp, ENGINE_FILE), `${JSON.stringify(manifest, null, 2)}\n`);
  });
  const { size } = await stat(join(options.out, WEIGHTS_FILE));
  return { dir: options.out, manifest, bytes: size, ms: performance.now() - start };
}

/** As asked, else the checkpoint's own type; engines hold 16-bit weights, so fp32 becomes bfloat16. */
async function storageType(dir: string, config: ModelConfig, asked?: FloatDType): Promise<"float16" | "bfloat16"> {
  if (asked === "float32") fail("input", "--dtype float32: an engine stores 16-bit weights (float16 or bfloat16)");
  if (asked) return asked;
  const own = config.dtype ?? (await checkpointDtype(dir));
  return own === "float32" ? "bfloat16" : own;
}

async function checkpointDtype(dir: string): Promise<FloatDType> {
  const checkpoint = await Checkpoint.open(dir);
  try {
    return checkpoint.dtype;
  } finally {
    await checkpoint.close();
  }
}

/** The files that hold the weights: model.safetensors, or the index and its shards. */
async function weightFiles(dir: string): Promise<string[]> {
  const index = join(dir, SAFETENSORS_INDEX);
  if (!(await exists(index))) return [SAFETENSORS_FILE];
  return [SAFETENSORS_INDEX, ...[...new Set((await readShardIndex(index)).values())].sort()];
}

/** Name, size and sha256 of a source file, read as a stream (shards are gigabytes). */
async function describeFile(dir: string, name: string): Promise<SourceFile> {
  const hash = createHash("sha256");
  let bytes = 0;
  try {
    for await (const chunk of createReadStream(join(dir, name)) as AsyncIterable<Buffer>) {
      hash.update(chunk);
      bytes += chunk.length;
    }
  } catch (err) {
    fail("checkpoint", `${join(dir, name)}: cannot read (${oneLine(err)})`, err);
  }
  return { name, bytes, sha256: hash.digest("hex") };
}


/** This package's version, for the manifest (the compiled file sits at dist/src/model/). */
async function decimaVersion(): Promise<string> {
  const pkg = JSON.parse(await readFile(new URL("../../../package.json", import.meta.url), "utf8")) as { version: string };
  return pkg.version;
}
