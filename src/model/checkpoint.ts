import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { z } from "zod";
import { fail, oneLine } from "../errors.js";
import type { ModelConfig } from "./config.js";
import type { FloatDType } from "./dtype.js";
import { exists, readJson } from "./files.js";
import type { RawTensor, TensorSource } from "./pack.js";
import { SafetensorsFile, type TensorInfo, floatDType } from "./safetensors.js";
import { checkGptqShape, gptqBase, gptqTensors } from "./gptq.js";
import { expectedShapes, linearNames } from "./weights.js";

/** Hugging Face's names for a model directory's weights: one file, or shards listed by an index. */
export const SAFETENSORS_FILE = "model.safetensors";
export const SAFETENSORS_INDEX = "model.safetensors.index.json";

const indexSchema = z.object({ weight_map: z.record(z.string(), z.string()) });

/** An index's weight_map: tensor name -> shard file name (relative to the index's directory). */
export async function readShardIndex(indexPath: string): Promise<Map<string, string>> {
  const parsed = indexSchema.safeParse(await readJson(indexPath, "checkpoint"));
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    fail("checkpoint", `${indexPath}: ${issue.path.join(".") || "(root)"}: ${issue.message}`);
  }
  return new Map(Object.entries(parsed.data.weight_map));
}

/** A model directory's safetensors weights, read tensor by tensor. Close it when done. */
export class Checkpoint implements TensorSource {
  private constructor(
    /** The file that lists the tensors (model.safetensors or the index), for messages. */
    readonly where: string,
    private readonly files: SafetensorsFile[],
    private readonly byName: Map<string, SafetensorsFile>,
  ) {}

  static async open(dir: string): Promise<Checkpoint> {
    const index = join(dir, SAFETENSORS_INDEX);
    if (await exists(index)) return Checkpoint.openSharded(dir, index);
    const single = join(dir, SAFETENSORS_FILE);
    if (await exists(single)) {
      const file = await SafetensorsFile.open(single);
      return new Checkpoint(single, [file], new Map([...file.tensors.keys()].map((name) => [name, file])));
    }
    return refuseWithoutSafetensors(dir);
  }

  private static async openSharded(dir: string, index: string): Promise<Checkpoint> {
    const weightMap = await readShardIndex(index);
    const shards = new Map<string, SafetensorsFile>();
    const byName = new Map<string, SafetensorsFile>();
    try {
      for (const [name, shardName] of weightMap) {
        let shard = shards.get(shardName);
        if (!shard) {
          const path = join(dir, shardName);
          if (!(await exists(path))) fail("checkpoint", `${index}: shard ${shardName} (holding ${name}) is missing`);
          shard = await SafetensorsFile.open(path);
          shards.set(shardName, shard);
        }
        if (!shard.tensors.has(name)) fail(
          "checkpoint",
          `${index}: tensor ${name} is mapped to ${shardName}, which does not hold it`,
        );
        byName.set(name, shard);
      }
    } catch (err) {
      await Promise.all([...shards.values()].map((s) => s.close()));
      throw err;
    }
    return new Checkpoint(index, [...shards.values()], byName);
  }

  /** A tensor's dtype, shape and place, as its header says; undefined if the checkpoint lacks it. */
  info(name: string): TensorInfo | undefined {
    return this.byName.get(name)?.tensors.get(name);
  }

  async read(name: string): Promise<RawTensor> {
    const info = this.info(name);
    if (!info) fail("checkpoint", `${this.where}: tensor ${name} is missing`);
    return { dtype: floatOf(info), shape: info.shape, data: await this.byName.get(name)!.read(name) };
  }

  /** An I32 tensor's values (GPTQ's packed weights and zero points). */
  async readInt32(name: string): Promise<Int32Array> {
    const info = this.info(name);
    if (!info) fail("checkpoint", `${this.where}: tensor ${name} is missing`);
    checkInt32(info);
    const bytes = await this.byName.get(name)!.read(name);
    return new Int32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
  }

  has(name: string): boolean {
    return this.byName.has(name);
  }

  /** The float type that holds most of the parameters (a few checkpoints keep, say, norms in fp32). */
  get dtype(): FloatDType {
    const elements = new Map<FloatDType, number>();
    for (const name of this.byName.keys()) {
      const info = this.info(name)!;
      const dtype = floatDType(info.dtype);
      if (dtype) elements.set(dtype, (elements.get(dtype) ?? 0) + info.shape.reduce((a, b) => a * b, 1));
    }
    const [top] = [...elements].sort((a, b) => b[1] - a[1]);
    if (!top) fail("checkpoint", `${this.where}: holds no float tensors`);
    return top[0];
  }

  async close(): Promise<void> {
    await Promise.all(this.files.map((f) => f.close()));
  }
}

/**
 * Fail fast, before any weight is read, if the checkpoint lacks a tensor the config needs or holds it with
 * another shape. Extra tensors (rotary inv_freq and the like) are fine.
 */
export function checkTensorShapes(checkpoint: Checkpoint, config: ModelConfig): void {
  const linear = linearNames(config);
  const check = (name: string, want: number[], int32: boolean) => {
    const info = checkpoint.info(name);
    if (!info) fail("checkpoint", `${checkpoint.where}: tensor ${name} is missing`);
    if (int32) checkInt32(info);
    else floatOf(info); // an integer (quantized) tensor where a float one is needed fails here
    if (info.shape.length !== want.length || info.shape.some((d, i) => d !== want[i])) {
      fail(
        "checkpoint",
        `${info.file}: tensor ${name} has shape [${info.shape.join(", ")}], the config needs [${want.join(", ")}]`,
      );
    }
  };
  for (const [name, want] of expectedShapes(config)) {
    if (!config.gptq || !linear.has(name)) {
      check(name, want, false);
      continue;
    }
    const [rows, cols] = want;
    const base = gptqBase(name);
    checkGptqShape(base, rows, cols, config.gptq.groupSize);
    for (const t of gptqTensors(base, rows, cols, config.gptq.groupSize)) check(t.name, t.shape, t.int32);
  }
}

function checkInt32(info: TensorInfo): void {
  if (info.dtype !== "I32") fail("checkpoint", `${info.file}: tensor ${info.name} is ${info.dtype}, not I32`);
}

function floatOf(info: TensorInfo): FloatDType {
  const dtype = floatDType(info.dtype);
  if (!dtype) fail("checkpoint", `${info.file}: tensor ${info.name} is ${info.dtype}, not a float type (F32, F16, BF16)`);
  return dtype;
}

async function refuseWithoutSafetensors(dir: string): Promise<never> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    fail("checkpoint", `${dir}: cannot read the model directory (${oneLine(err)})`, err);
  }
  const pytorch = names.find((n) => n.endsWith(".bin"));
  if (pytorch) {
    fail(
      "checkpoint",
      `${dir}: has PyTorch weights (${pytorch}) but no ${SAFETENSORS_FILE}; decima reads safetensors only: convert the checkpoint to safetensors`,
    );
  }
  fail("checkpoint", `${dir}: no weights (${SAFETENSORS_FILE} or ${SAFETENSORS_INDEX})`);
}
