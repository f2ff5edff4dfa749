import { randomBytes } from "node:crypto";
import { readFile, rename, rm, stat } from "node:fs/promises";
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
