import assert from "node:assert/strict";
import { mkdtemp, open, readFile, readdir, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { DecimaError } from "../src/errors.js";
import { fromFloat32, toFloat32 } from "../src/model/dtype.js";
import { SafetensorsFile, type TensorToWrite, floatDType, writeSafetensors } from "../src/model/safetensors.js";

let dir: string;
before(async () => {
  dir = await mkdtemp(join(os.tmpdir(), "decima-safetensors-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A DecimaError of kind checkpoint, on one line, mentioning every part. */
async function rejectsWith(promise: Promise<unknown>, ...parts: string[]): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof DecimaError, `not a DecimaError: ${err}`);
    assert.equal(err.kind, "checkpoint");
    assert.ok(!err.message.includes("\n"), `not one line: ${err.message}`);
    for (const p of parts) assert.ok(err.message.includes(p), `"${err.message}" lacks "${p}"`);
    return true;
  });
}

function u64(n: number | bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
}

/** A file with any header text and `dataBytes` bytes of data after it. */
async function rawFile(name: string, header: unknown, dataBytes: number): Promise<string> {
  const text = Buffer.from(typeof header === "string" ? header : JSON.stringify(header));
  const path = join(dir, name);
  await writeFile(path, Buffer.concat([u64(text.length), text, Buffer.alloc(dataBytes)]));
  return path;
}

const f32 = (...values: number[]) => fromFloat32(new Float32Array(values), "float32");

describe("writing", () => {
  test("matches the reference implementation byte for byte (alignment padding with spaces)", async () => {
    // The expected bytes are those of safetensors' own serialization tests (tensor.rs).
    const path = join(dir, "attn.safetensors");
    await writeSafetensors(path, [{ name: "attn0", dtype: "F32", shape: [1, 1, 2, 3], data: f32(0, 1, 2, 3, 4, 5) }]);
    const header = '{"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}}';
    const expected = Buffer.concat([u64(72), Buffer.from(header + " ".repeat(7)), Buffer.from(f32(0, 1, 2, 3, 4, 5))]);
    assert.deepEqual(await readFile(path), expected);

    const empty = join(dir, "empty.safetensors");
    await writeSafetensors(empty, [], { framework: "pt" });
    assert.deepEqual(await readFile(empty), Buffer.concat([u64(40), Buffer.from('{"__metadata__":{"framework":"pt"}}     ')]));
  });

  test("round-trips F32, F16, BF16 and integer tensors with metadata", async () => {
    const values = new Float32Array([1, -2, 0.5, 3.25, -0.125, 1024]);
    const tensors: TensorToWrite[] = [
      { name: "a.f32", dtype: "F32", shape: [2, 3], data: fromFloat32(values, "float32") },
      { name: "b.f16", dtype: "F16", shape: [6], data: fromFloat32(values, "float16") },
      { name: "c.bf16", dtype: "BF16", shape: [3, 2], data: fromFloat32(values, "bfloat16") },
      { name: "d.i8", dtype: "I8", shape: [3], data: new Uint8Array([1, 255, 7]) },
      { name: "scalar", dtype: "F32", shape: [], data: f32(42) },
    ];
    const path = join(dir, "dtypes.safetensors");
    await writeSafetensors(path, tensors, { format: "pt" });
    const file = await SafetensorsFile.open(path);
    try {
      assert.deepEqual(file.metadata, { format: "pt" });
      assert.deepEqual([...file.tensors.keys()], tensors.map((t) => t.name));
      for (const [name, dtype, shape] of [
        ["a.f32", "float32", [2, 3]],
        ["b.f16", "float16", [6]],
        ["c.bf16", "bfloat16", [3, 2]],
      ] as const) {
        const info = file.tensors.get(name)!;
        assert.equal(floatDType(info.dtype), dtype);
        assert.deepEqual(info.shape, shape);
        // All six values are exact in every float type.
        assert.deepEqual(toFloat32(await file.read(name), dtype), values);
      }
      assert.equal(file.tensors.get("d.i8")!.dtype, "I8");
      assert.equal(floatDType("I8"), null);
      assert.deepEqual(await file.read("d.i8"), new Uint8Array([1, 255, 7]));
      assert.deepEqual(toFloat32(await file.read("scalar"), "float32"), new Float32Array([42]));
      const bytes = await file.read("a.f32");
      assert.equal(bytes.byteOffset, 0, "a fresh buffer, aligned for typed-array views");
      assert.equal(bytes.buffer.byteLength, 24);
      await rejectsWith(file.read("nope"), path, "tensor nope is missing");
    } finally {
      await file.close();
    }
  });

  test("asks for tensors given in pieces in order, one piece at a time", async () => {
    const calls: string[] = [];
    const pieces = (name: string, ...values: number[]): TensorToWrite => ({
      name,
      dtype: "F32",
      shape: [values.length],
      data: function* () {
        for (const v of values) {
          calls.push(`${name}${v}`);
          yield f32(v);
        }
      },
    });
    const path = join(dir, "pieces.safetensors");
    await writeSafetensors(path, [pieces("z", 1), pieces("a", 2, 3), pieces("m", 4)]);
    assert.deepEqual(calls, ["z1", "a2", "a3", "m4"]);
    const file = await SafetensorsFile.open(path);
    assert.deepEqual(toFloat32(await file.read("a"), "float32"), new Float32Array([2, 3]));
    await file.close();
  });

  test("leaves nothing behind when a tensor fails", async () => {
    const sub = await mkdtemp(join(dir, "atomic-"));
    const path = join(sub, "model.safetensors");
    const good: TensorToWrite = { name: "good", dtype: "F32", shape: [2], data: f32(1, 2) };
    await rejectsWith(
      writeSafetensors(path, [good, { name: "bad", dtype: "F16", shape: [4], data: new Uint8Array(6) }]),
      path,
      "tensor bad: 6 bytes given, shape [4] of F16 needs 8",
    );
    const boom: TensorToWrite = {
      name: "boom",
      dtype: "F32",
      shape: [1],
      data: () => {
        throw new Error("boom");
      },
    };
    await assert.rejects(writeSafetensors(path, [good, boom]), /boom/);
    await rejectsWith(writeSafetensors(path, [good, good]), "tensor good is given twice");
    assert.deepEqual(await readdir(sub), []);
  });
});

describe("reading", () => {
  test("reads a small tensor past a 3 GB one without reading the file", async () => {
    // A sparse file: reading it whole would take seconds and 3 GB of memory.
    const big = 3 * 2 ** 30;
    const header = {
      big: { dtype: "U8", shape: [big], data_offsets: [0, big] },
      small: { dtype: "F32", shape: [2], data_offsets: [big, big + 8] },
    };
    const path = await rawFile("sparse.safetensors", header, 0);
    const fh = await open(path, "r+");
    const dataStart = 8 + JSON.stringify(header).length;
    await fh.write(f32(7, -7), 0, 8, dataStart + big);
    await fh.close();
    const file = await SafetensorsFile.open(path);
    assert.deepEqual(toFloat32(await file.read("small"), "float32"), new Float32Array([7, -7]));
    assert.equal(file.tensors.get("big")!.byteLength, big);
    await file.close();
    await rm(path);
  });

  const norm = (offsets: number[], extra: object = {}) => ({
    "model.norm.weight": { dtype: "F16", shape: [64], data_offsets: offsets, ...extra },
  });

  const corrupt: [string, () => Promise<string>, string[]][] = [
    ["a file shorter than the length field", async () => {
      const path = join(dir, "short.safetensors");
      await writeFile(path, Buffer.from([1, 2, 3]));
      return path;
    }, ["3 bytes, too short"]],
    ["a header length past the end of the file", async () => {
      const path = join(dir, "past-eof.safetensors");
      await writeFile(path, Buffer.concat([u64(1000), Buffer.from("{}")]));
      return path;
    }, ["header length 1000 runs past the end of the file (10 bytes)"]],
    ["an absurd header length", async () => {
      const path = join(dir, "huge-header.safetensors");
      await writeFile(path, Buffer.concat([u64(2n ** 62n), Buffer.from("{}")]));
      return path;
    }, ["header length 4611686018427387904 is over 100000000 bytes"]],
    ["a header that is not JSON", () => rawFile("not-json.safetensors", "{nope", 0), ["header is not valid JSON"]],
    ["a header that is a JSON array", () => rawFile("array.safetensors", "[1, 2]", 0), ["header is not a JSON object"]],
    ["an entry without data_offsets", () => rawFile("no-offsets.safetensors", { w: { dtype: "F32", shape: [1] } }, 4), ["tensor w: data_offsets"]],
    ["an unknown dtype", () => rawFile("f64.safetensors", { w: { dtype: "F64", shape: [1], data_offsets: [0, 8] } }, 8), [
      "tensor w: dtype F64 is not supported (F32, F16, BF16, I8, U8, I32)",
    ]],
    ["a dtype named like an Object method", () => rawFile("proto.safetensors", { w: { dtype: "toString", shape: [], data_offsets: [0, 0] } }, 0), [
      "tensor w: dtype toString is not supported",
    ]],
    ["offsets out of bounds", () => rawFile("oob.safetensors", norm([0, 128]), 100), [
      "tensor model.norm.weight: data_offsets [0, 128] run past the data (100 bytes)",
    ]],
    ["a truncated file", async () => {
      const path = join(dir, "truncated.safetensors");
      await writeSafetensors(path, [{ name: "w", dtype: "F32", shape: [4], data: f32(1, 2, 3, 4) }]);
      const bytes = await readFile(path);
      await writeFile(path, bytes.subarray(0, bytes.length - 5));
      return path;
    }, ["tensor w: data_offsets [0, 16] run past the data (11 bytes); the file is truncated"]],
    ["a shape that does not match the byte length", () => rawFile("mismatch.safetensors", norm([0, 10]), 10), [
      "tensor model.norm.weight: data_offsets [0, 10] hold 10 bytes, shape [64] of F16 needs 128",
    ]],
    ["reversed offsets", () => rawFile("reversed.safetensors", norm([128, 0]), 128), ["data_offsets [128, 0] end before they begin"]],
    ["overlapping tensors", () => rawFile("overlap.safetensors", {
      a: { dtype: "F32", shape: [4], data_offsets: [0, 16] },
      b: { dtype: "F32", shape: [4], data_offsets: [8, 24] },
    }, 24), ["tensor b: data_offsets [8, 24] overlap tensor a [0, 16]"]],
    ["metadata that is not strings", () => rawFile("metadata.safetensors", { __metadata__: { n: 1 } }, 0), [
      "__metadata__ must map strings to strings",
    ]],
  ];
  for (const [what, make, parts] of corrupt) {
    test(`refuses ${what} in one line naming the file`, async () => {
      const path = await make();
      await rejectsWith(SafetensorsFile.open(path), `${path}: `, ...parts);
    });
  }

  test("a missing file is one line", async () => {
    const path = join(dir, "absent.safetensors");
    await rejectsWith(SafetensorsFile.open(path), `${path}: no such file`);
  });
});
