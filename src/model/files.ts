import { randomBytes } from "node:crypto";
import { type FileHandle, readFile, readdir, rename, rm, stat } from "node:fs/promises";
import { type ErrorKind, fail, oneLine } from "../errors.js";

/**
 * Files written by decima (checkpoints, downloads, model directories) appear whole or not at all: `write`
 * fills a temporary name beside `file`, which is renamed into place only once it is complete.
 */
export async function writeAtomically(file: string, write: (tmp: string) => Promise<void>): Promise<void> {
  const tmp = `${file}.${randomBytes(6).toString("hex")}.incomplete`;
  try {
    await write(tmp);
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
}

/** Parse a JSON file; a missing or malformed file is one line that names it. */
export async function readJson(file: string, kind: ErrorKind): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    fail(kind, code === "ENOENT" ? `${file}: no such file` : `${file}: cannot read (${oneLine(err)})`, err);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    fail(kind, `${file}: not valid JSON (${oneLine(err)})`, err);
  }
}

export async function exists(file: string): Promise<boolean> {
  return stat(file).then(
    () => true,
    () => false,
  );
}

/** An output directory must be absent or empty: nothing a user has is ever overwritten. */
export async function checkOutDir(out: string): Promise<void> {
  let entries: string[];
  try {
    entries = await readdir(out);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return;
    fail("input", code === "ENOTDIR" ? `${out}: is a file` : `${out}: ${oneLine(err)}`, err);
  }
  if (entries.length > 0) fail("input", `${out}: already exists and is not empty`);
}

/** Positioned reads stay under 1 GiB each (Node refuses larger single reads). */
const MAX_IO_BYTES = 1 << 30;

/** Bytes [position, position + length) of an open file, into a fresh array; a short file is an error of `kind`. */
export async function readAt(fh: FileHandle, path: string, position: number, length: number, kind: ErrorKind): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  for (let done = 0; done < length; ) {
    const chunk = Math.min(length - done, MAX_IO_BYTES);
    const { bytesRead } = await fh.read(out, done, chunk, position + done);
    if (bytesRead === 0) fail(kind, `${path}: ended at byte ${position + done}; the file shrank while being read`);
    done += bytesRead;
  }
  return out;
}

/** All of `data` at `position` of an open file; returns the position after it. */
export async function writeAt(fh: FileHandle, data: Uint8Array, position: number): Promise<number> {
  for (let done = 0; done < data.byteLength; ) {
    const { bytesWritten } = await fh.write(data, done, Math.min(data.byteLength - done, MAX_IO_BYTES), position + done);
    done += bytesWritten;
  }
  return position + data.byteLength;
}
