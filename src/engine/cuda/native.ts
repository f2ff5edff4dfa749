import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import type { SamplingBatch, StepBatch } from "../backend.js";

/** The N-API addon built from native/ (see scripts/build-native.mjs), as TypeScript sees it. */
export interface NativeAddon {
  Model: new (opts: NativeModelOptions) => NativeModel;
  deviceInfo(): DeviceInfo;
  /** Bytes per second one kernel reads from device memory, best of `iters` passes over `bytes`. */
  measureBandwidth(bytes: number, iters: number): number;
  /** Run one kernel on host buffers (tests only). */
  testKernel(name: string, inputs: Record<string, ArrayBufferView>, params: Record<string, number>): Record<string, Uint8Array>;
}

export type DeviceInfo =
  | { available: false; reason: string }
  | {
      available: true;
      name: string;
      computeCapability: string;
      multiprocessors: number;
      totalMemory: number;
      freeMemory: number;
    };

export interface NativeModelOptions {
  vocab: number;
  hidden: number;
  layers: { heads: number; kvHeads: number; headDim: number; inter: number }[];
  eps: number;
  ropeTheta: number;
  ropeFactor: number;
  maxPos: number;
  dtype: "float16" | "bfloat16";
  tied: boolean;
  /** How the four linear layers of every decoder layer are stored (src/model/weights.ts). */
  quant: "none" | "int8" | "int4";
  groupSize: number;
  /** The (untied) LM head's storage. */
  headQuant: "none" | "int8";
  blockSize: number;
  kvBlocks: number;
  kvFraction: number;
  maxTokens: number;
  maxSeqs: number;
  graphs: boolean;
  pdl: boolean;
  /** The fused MLP kernel for int4 decode steps (CudaBackendOptions.fusedMlp). */
  fusedMlp: boolean;
  /** The O projection inside decode attention for int4 decode steps (CudaBackendOptions.fusedO). */
  fusedO: boolean;
  /** Time every kernel of eager steps and print a table on stderr at close (DECIMA_PROFILE=1). */
  profile: boolean;

}

/** A step as the addon takes it: the batch's arrays, with the penalties' history as distinct tokens. */
export interface NativeStep
  extends Pick<StepBatch, "tokens" | "queryStarts" | "contextLens" | "blockTables" | "blockTableWidth" | "sample">,
    Pick<SamplingBatch, "temperature" | "topK" | "topP" | "minP" | "repetitionPenalty" | "frequencyPenalty" | "presencePenalty" | "seed" | "counter"> {
  penaltyStarts: Int32Array;
  penaltyTokens: Int32Array;
  penaltyCounts: Int32Array;
  steps: number;
  topLogprobs: number;
  logits: 0 | 1 | 2;
}

export interface NativeStepResult {
  tokens: Int32Array;
  logprobs: Float32Array;
  topIds: Int32Array;
  topLogprobs: Float32Array;
  logits?: Float32Array;
}

export interface NativeModel {
  readonly numBlocks: number;
  readonly description: string;
  readonly weights: { name: string; layer: number; bytes: number }[];
  upload(name: string, layer: number, data: Uint8Array): void;
  /** The same from bytes [offset, offset + bytes) of a file. */
  uploadFile(name: string, layer: number, path: string, offset: number, bytes: number): void;
  step(input: NativeStep): Promise<NativeStepResult>;
  /** A prefill and decode steps on the empty pool: kernels loaded, the decode graphs of batches up to `maxSeqs` captured. */
  warmup(maxSeqs: number): void;
  close(): void;
}

export type NativeLoad = { addon: NativeAddon; reason: null } | { addon: null; reason: string };

let loaded: NativeLoad | undefined;

/** The addon, or why it cannot be used here (not built, or its libraries are missing). Loaded once. */
function loadNative(): NativeLoad {
  if (loaded) return loaded;
  const path = process.env.DECIMA_NATIVE ?? fileURLToPath(new URL("../../../../build/native/decima.node", import.meta.url));
  if (!existsSync(path)) {
    loaded = { addon: null, reason: `the native addon was not built (${path} is missing; see the install output)` };
    return loaded;
  }
  try {
    loaded = { addon: createRequire(import.meta.url)(path) as NativeAddon, reason: null };
  } catch (err) {
    loaded = { addon: null, reason: `the native addon does not load: ${(err as Error).message.split("\n")[0]}` };
  }
  return loaded;
}

/** A usable GPU, or the reason there is none. */
export function cudaDevice(): { ok: true; addon: NativeAddon; info: Extract<DeviceInfo, { available: true }> } | { ok: false; reason: string } {
  const n = loadNative();
  if (!n.addon) return { ok: false, reason: n.reason };
  const info = n.addon.deviceInfo();
  if (!info.available) return { ok: false, reason: `no usable GPU: ${info.reason}` };
  return { ok: true, addon: n.addon, info };
}
