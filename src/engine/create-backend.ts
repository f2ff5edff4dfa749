import { fail } from "../errors.js";
import type { ModelConfig } from "../model/config.js";
import type { FloatDType } from "../model/dtype.js";
import { isEngineDir } from "../model/engine-file.js";
import { loadWeights } from "../model/model-dir.js";
import type { ModelWeights } from "../model/weights.js";
import type { Backend } from "./backend.js";
import { CpuBackend } from "./cpu/backend.js";
import { CudaBackend } from "./cuda/backend.js";
import { cudaDevice } from "./cuda/native.js";

export type DeviceChoice = "cpu" | "cuda" | "auto";

export interface BackendOptions {
  device: "cpu" | "cuda";
  numBlocks?: number;
  blockSize?: number;
  kvMemoryFraction?: number;
  maxBatchTokens?: number;
  maxBatchSeqs?: number;
  /** A device's decode graphs captured at load for batches up to this many sequences (CUDA; default 1). */
  warmupSeqs?: number;
}

/** `auto` means CUDA where a GPU and the native addon are there, else the CPU. */
export function resolveDevice(choice: DeviceChoice): "cpu" | "cuda" {
  if (choice === "cpu") return "cpu";
  const dev = cudaDevice();
  if (choice === "cuda" && !dev.ok) fail("device", `--device cuda: the CUDA backend is unavailable: ${dev.reason}`);
  return dev.ok ? "cuda" : "cpu";
}

/**
 * The storage type to load weights in: as asked, else the checkpoint's own. The GPU runs 16-bit weights
 * (bfloat16 for fp32 checkpoints); the CPU does fp32 math whatever the storage.
 */
function weightDtype(device: "cpu" | "cuda", asked: FloatDType | undefined, config: ModelConfig): FloatDType | undefined {
  if (device === "cpu") return asked;
  if (asked === "float32") fail("input", "--dtype float32 is not supported on the CUDA backend (use float16 or bfloat16)");
  return asked ?? (config.dtype === "float16" || config.dtype === "bfloat16" ? config.dtype : "bfloat16");
}

async function createBackend(weights: ModelWeights, opts: BackendOptions): Promise<Backend> {
  if (opts.device === "cuda") return CudaBackend.create(weights, opts);
  return new CpuBackend(weights, { numBlocks: opts.numBlocks, blockSize: opts.blockSize });
}

/**
 * The backend for a model directory (`config` read from it): a decima engine goes to the GPU straight from
 * its weights file; anything else is loaded (packed, in the weight type for the device) and handed over.
 */
export async function loadBackend(dir: string, config: ModelConfig, opts: BackendOptions & { dtype?: FloatDType }): Promise<Backend> {
  if (opts.device === "cuda" && (await isEngineDir(dir))) {
    if (opts.dtype !== undefined && opts.dtype !== config.dtype) {
      fail("input", `${dir}: the engine holds ${config.dtype} weights, ${opts.dtype} was asked for; leave the dtype out or rebuild the engine`);
    }
    return CudaBackend.fromEngine(dir, opts);
  }
  return createBackend(await loadWeights(dir, config, weightDtype(opts.device, opts.dtype, config)), opts);
}
