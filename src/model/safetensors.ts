import { type FileHandle, open } from "node:fs/promises";
import { z } from "zod";
import { fail, oneLine } from "../errors.js";
import type { FloatDType } from "./dtype.js";
import { readAt, writeAt, writeAtomically } from "./files.js";

/**
 * The safetensors format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
 * length, a JSON header naming each tensor's dtype, shape and byte range, then the raw data. Written by
 * hand: the format is that small, and none of our dependencies reads local files tensor by tensor.
 */

/** Bytes per element of the storage types decima reads: the float types, and integers for quantized weights. */
export const DTYPE_SIZES = { F32: 4, F16: 2, BF16: 2, I8: 1, U8: 1, I32: 4 } as const;
export type SafetensorsDType = keyof typeof DTYPE_SIZES;

const FLOAT_DTYPES: Partial<Record<SafetensorsDType, FloatDType>> = { F32: "float32", F16: "float16", BF16: "bfloat16" };

/** The float type a safetensors dtype stores, or null for the integer ones. */
export function floatDType(dtype: SafetensorsDType): FloatDType | null {
  return FLOAT_DTYPES[dtype] ?? null;
}

export function safetensorsDType(dtype: FloatDType): SafetensorsDType {
  return dtype === "float32" ? "F32" : dtype === "float16" ? "F16" : "BF16";
}

export interface TensorInfo {
  name: string;
  /** The file it is stored in, for messages. */
  file: string;
  dtype: SafetensorsDType;
  shape: number[];
  /** Absolute position of the first byte in the file. */
  offset: number;
  byteLength: number;
}

/** The reference implementation's limit: a larger header means the file is not safetensors. */
const MAX_HEADER_BYTES = 100_000_000;

const count = z.number().int().nonnegative();
const entrySchema = z.object({
  dtype: z.string(),
  shape: z.array(count),
  data_offsets: z.tuple([count, count]),
});
const metadataSchema = z.record(z.string(), z.string());

/** An open safetensors file: its validated header, and tensors read on demand with positioned reads. */
export class SafetensorsFile {
  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    readonly tensors: Map<string, TensorInfo>,
    readonly metadata: Record<string, string>,
  ) {}

  static async open(path: string): Promise<SafetensorsFile> {
    let fh: FileHandle;
    try {
      fh = await open(path, "r");
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      fail("checkpoint", code === "ENOENT" ? `${path}: no such file` : `${path}: cannot open (${oneLine(err)})`, err);
    }
    try {
      const { tensors, metadata } = await readHeader(fh, path);
      return new SafetensorsFile(path, fh, tensors, metadata);
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  /** A tensor's bytes, in a fresh buffer of their own. */
  async read(name: string): Promise<Uint8Array> {
    const t = this.tensors.get(name);
    if (!t) fail("checkpoint", `${this.path}: tensor ${name} is missing`);
    return readAt(this.fh, this.path, t.offset, t.byteLength, "checkpoint");
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

async function readHeader(fh: FileHandle, path: string) {
  const { size } = await fh.stat();
  if (size < 8) fail("checkpoint", `${path}: ${size} bytes, too short for a safetensors header`);
  const headerLength = Buffer.from(await readAt(fh, path, 0, 8, "checkpoint")).readBigUInt64LE(0);
  if (headerLength > BigInt(MAX_HEADER_BYTES)) {
    fail("checkpoint", `${path}: header length ${headerLength} is over ${MAX_HEADER_BYTES} bytes; not a safetensors file`);
  }
  const dataStart = 8 + Number(headerLength);
  if (dataStart > size) {
    fail("checkpoint", `${path}: header length ${headerLength} runs past the end of the file (${size} bytes)`);
  }
  const header = parseHeaderJson(await readAt(fh, path, 8, dataStart - 8, "checkpoint"), path);
  return parseEntries(header, path, dataStart, size - dataStart);
}

function parseHeaderJson(bytes: Uint8Array, path: string): Record<string, unknown> {
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (err) {
    fail("checkpoint", `${path}: header is not valid JSON (${oneLine(err)})`, err);
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) {
    fail("checkpoint", `${path}: header is not a JSON object`);
  }
  return header as Record<string, unknown>;
}

function parseEntries(header: Record<string, unknown>, path: string, dataStart: number, dataLength: number) {
  let metadata: Record<string, string> = {};
  const tensors = new Map<string, TensorInfo>();
  const ranges: { name: string; begin: number; end: number }[] = [];
  for (const [name, raw] of Object.entries(header)) {
    if (name === "__metadata__") {
      const parsed = metadataSchema.safeParse(raw);
      if (!parsed.success) fail("checkpoint", `${path}: __metadata__ must map strings to strings`);
      metadata = parsed.data;
      continue;
    }
    const where = `${path}: tensor ${name}`;
    const parsed = entrySchema.safeParse(raw);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      fail("checkpoint", `${where}: ${issue.path.join(".") || "entry"}: ${issue.message}`);
    }
    const { dtype, shape, data_offsets: [begin, end] } = parsed.data;
    if (!Object.hasOwn(DTYPE_SIZES, dtype)) {
      fail("checkpoint", `${where}: dtype ${dtype} is not supported (${Object.keys(DTYPE_SIZES).join(", ")})`);
    }
    const range = `data_offsets [${begin}, ${end}]`;
    if (end < begin) fail("checkpoint", `${where}: ${range} end before they begin`);
    if (end > dataLength) {
      fail("checkpoint", `${where}: ${range} run past the data (${dataLength} bytes); the file is truncated or corrupt`);
    }
    const needed = shape.reduce((a, b) => a * b, 1) * DTYPE_SIZES[dtype as SafetensorsDType];
    if (end - begin !== needed) {
      fail(
        "checkpoint",
        `${where}: ${range} hold ${end - begin} bytes, shape [${shape.join(", ")}] of ${dtype} needs ${needed}`,
      );
    }
    const offset = dataStart + begin;
    tensors.set(name, { name, file: path, dtype: dtype as SafetensorsDType, shape, offset, byteLength: needed });
    ranges.push({ name, begin, end });
  }
  checkOverlaps(ranges, path);
  return { tensors, metadata };
}

function checkOverlaps(ranges: { name: string; begin: number; end: number }[], path: string): void {
  ranges.sort((a, b) => a.begin - b.begin || a.end - b.end);
  for (let i = 1; i < ranges.length; i++) {
    const [prev, cur] = [ranges[i - 1], ranges[i]];
    if (cur.begin < prev.end) {
      fail(
        "checkpoint",
        `${path}: tensor ${cur.name}: data_offsets [${cur.begin}, ${cur.end}] overlap tensor ${prev.name} [${prev.begin}, ${prev.end}]`,
      );
    }
  }
}


export interface TensorToWrite {
  name: string;
  dtype: SafetensorsDType;
  shape: number[];
  /**
   * The bytes, or a function that yields them in pieces when the tensor's turn comes: tensors are written
   * in the order given, so a large file can be produced through a small buffer (each piece is written
   * before the next is asked for).
   */
  data: Uint8Array | (() => Iterable<Uint8Array> | AsyncIterable<Uint8Array>);
}

/**
 * Write a safetensors file, tensors in the order given, streaming each to disk as it comes (a multi-GB
 * shard is never assembled in memory). The file appears only once complete.
 */
export async function writeSafetensors(
  path: string,
  tensors: TensorToWrite[],
  metadata?: Record<string, string>,
): Promise<void> {
  const header = encodeHeader(tensors, metadata, path);
  await writeAtomically(path, async (tmp) => {
    const fh = await open(tmp, "wx");
    try {
      let position = await writeAt(fh, header, 0);
      for (const t of tensors) {
        const start = position;
        for await (const piece of typeof t.data === "function" ? t.data() : [t.data]) {
          position = await writeAt(fh, piece, position);
        }
        const needed = tensorBytes(t);
        if (position - start !== needed) {
          const given = position - start;
          fail(
            "checkpoint",
            `${path}: tensor ${t.name}: ${given} bytes given, shape [${t.shape.join(", ")}] of ${t.dtype} needs ${needed}`,
          );
        }
      }
    } finally {
      await fh.close();
    }
  });
}

/** Bytes a tensor of this dtype and shape takes. */
export function tensorBytes(t: { dtype: SafetensorsDType; shape: number[] }): number {
  return t.shape.reduce((a, b) => a * b, 1) * DTYPE_SIZES[t.dtype];
}

/** Header as the reference implementation writes it: compact JSON, padded with spaces to 8-byte alignment. */
function encodeHeader(tensors: TensorToWrite[], metadata: Record<string, string> | undefined, path: string): Buffer {
  const entries: [string, unknown][] = metadata ? [["__metadata__", metadata]] : [];
  const seen = new Set<string>();
  let offset = 0;
  for (const t of tensors) {
    if (seen.has(t.name)) fail("checkpoint", `${path}: tensor ${t.name} is given twice`);
    seen.add(t.name);
    const end = offset + tensorBytes(t);
    entries.push([t.name, { dtype: t.dtype, shape: t.shape, data_offsets: [offset, end] }]);
    offset = end;
  }
  const json = Buffer.from(JSON.stringify(Object.fromEntries(entries)));
  const padded = Math.ceil(json.length / 8) * 8;
  const out = Buffer.alloc(8 + padded, " ");
  out.writeBigUInt64LE(BigInt(padded), 0);
  json.copy(out, 8);
  return out;
}

