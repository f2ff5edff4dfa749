import { join } from "node:path";
import { Checkpoint, checkTensorShapes } from "./checkpoint.js";
import { type ModelConfig, parseModelConfig } from "./config.js";
import type { FloatDType } from "./dtype.js";
import { isEngineDir, readEngine, readEngineManifest } from "./engine-file.js";
import { readJson } from "./files.js";
import { type DownloadOptions, locateModel } from "./hub.js";
import { packWeights } from "./pack.js";
import type { ModelWeights } from "./weights.js";

export interface ResolvedModel {
  /** The directory holding config.json, the tokenizer and the weights (a checkpoint, or a decima engine). */
  dir: string;
  config: ModelConfig;
  /** Where it came from, for logs: the directory, or `org/name@commit`. */
  source: string;
}

/** `--model`: a local directory or a hub id, to its directory and parsed config. */
export async function resolveModel(spec: string, options?: DownloadOptions): Promise<ResolvedModel> {
  const { dir, source } = await locateModel(spec, options);
  return { dir, source, config: await readModelConfig(dir) };
}

/** An engine directory's config is the one in engine.json, with the engine's storage type as its dtype. */
async function readModelConfig(dir: string): Promise<ModelConfig> {
  if (await isEngineDir(dir)) return (await readEngineManifest(dir)).config;
  const file = join(dir, "config.json");
  return parseModelConfig(await readJson(file, "config"), file);
}

/**
 * A Hugging Face directory's weights, checked against the config before any is read, then packed as
 * `dtype` (default: the config's torch_dtype, else the checkpoint's own). An engine directory's weights
 * are read as built: asking for another dtype is an error (the engine must be rebuilt).
 */
export async function loadWeights(dir: string, config: ModelConfig, dtype?: FloatDType): Promise<ModelWeights> {
  if (await isEngineDir(dir)) return (await readEngine(dir, { dtype })).weights;
  const checkpoint = await Checkpoint.open(dir);
  try {
    checkTensorShapes(checkpoint, config);
    return await packWeights(checkpoint, config, dtype ?? config.dtype ?? checkpoint.dtype);
  } finally {
    await checkpoint.close();
  }
}
