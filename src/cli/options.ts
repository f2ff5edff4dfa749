import { Option } from "commander";
import { fail } from "../errors.js";
import { FLOAT_DTYPES, type FloatDType } from "../model/dtype.js";
import { resolveModel } from "../model/model-dir.js";
import { Engine } from "../runtime/engine.js";
import { Tokenizer } from "../tokenizer/tokenizer.js";

/** The options of every command that runs a model (commander names them after the flags). */
export interface ModelOptions {
  model: string;
  device: "cpu" | "cuda" | "auto";
  dtype?: FloatDType;
}

export function modelOption(): Option {
  return new Option("-m, --model <dir-or-hub-id>", "model directory or Hugging Face id (org/name[@revision])").makeOptionMandatory();
}

export function deviceOption(): Option {
  return new Option("--device <device>", "where to run").choices(["cpu", "cuda", "auto"]).default("auto");
}

export function dtypeOption(description = "weight type (default: the checkpoint's; bfloat16 on CUDA for float32 ones)"): Option {
  return new Option("--dtype <dtype>", description).choices(FLOAT_DTYPES);
}

/** Engine.load's asyncScheduling on or off; neither flag leaves the engine's default (commander then sets none). */
export function asyncSchedulingOptions(): Option[] {
  return [
    new Option("--async-scheduling", "queue each backend call behind the one in flight (default: on a GPU, not on the CPU)"),
    new Option("--no-async-scheduling", "queue each backend call only once the last one's tokens are back"),
  ];
}

/** Load the model, run `use`, and release the engine whatever happens. */
export async function withEngine<T>(opts: ModelOptions, use: (engine: Engine) => Promise<T>): Promise<T> {
  const engine = await Engine.load({ model: opts.model, device: opts.device, dtype: opts.dtype });
  try {
    return await use(engine);
  } finally {
    await engine.close();
  }
}

/** The tokenizer alone: no weights are read. */
export async function loadTokenizer(model: string): Promise<Tokenizer> {
  return Tokenizer.load((await resolveModel(model)).dir);
}

/** The sampler's choices of distribution and penalties (flags named as their SamplingOptions fields). */
export function samplerOptions(): Option[] {
  return [
    numberOption("--temperature <t>", "0 (the default) is greedy", { min: 0 }),
    numberOption("--top-p <p>", "keep the most likely tokens holding this much probability", { above: 0, max: 1 }),
    integerOption("--top-k <k>", "keep the k most likely tokens (0: all)", { min: 0 }),
    numberOption("--min-p <p>", "drop tokens less likely than p times the most likely", { min: 0, max: 1 }),
    numberOption("--repetition-penalty <r>", "penalize tokens already in the text (1: off)", { above: 0 }),
    numberOption("--frequency-penalty <f>", "subtract f per earlier occurrence", { min: -2, max: 2 }),
    numberOption("--presence-penalty <p>", "subtract p from tokens already generated", { min: -2, max: 2 }),
  ];
}

/** Bounds of a numeric flag; `above` is an exclusive lower bound. */
export interface Range {
  min?: number;
  max?: number;
  above?: number;
}

/** A flag whose value must be an integer within `range`. */
export function integerOption(flags: string, description: string, range: Range = {}): Option {
  const option = new Option(flags, description);
  return option.argParser((text: string) => checkNumber(option.long!, text, "integer", range));
}

/** A flag whose value must be a finite number within `range`. */
export function numberOption(flags: string, description: string, range: Range = {}): Option {
  const option = new Option(flags, description);
  return option.argParser((text: string) => checkNumber(option.long!, text, "number", range));
}

function checkNumber(flag: string, text: string, kind: "integer" | "number", range: Range): number {
  const syntax = kind === "integer" ? /^\s*[+-]?\d+\s*$/ : /^\s*[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?\s*$/i;
  const n = syntax.test(text) ? Number(text) : NaN;
  const { min = -Infinity, max = Infinity, above = -Infinity } = range;
  const ok = (kind === "integer" ? Number.isSafeInteger(n) : Number.isFinite(n)) && n >= min && n <= max && n > above;
  if (!ok) fail("input", `${flag} must be ${describe(kind, range)} (got ${JSON.stringify(text)})`);
  return n;
}

function describe(kind: "integer" | "number", { min, max, above }: Range): string {
  if (kind === "integer" && min === 1 && max === undefined) return "a positive integer";
  const article = kind === "integer" ? "an integer" : "a number";
  if (min !== undefined && max !== undefined) return `${article} from ${min} to ${max}`;
  const bounds = [above !== undefined && `> ${above}`, min !== undefined && `>= ${min}`, max !== undefined && `<= ${max}`];
  const phrase = bounds.filter(Boolean).join(" and ");
  return phrase ? `${article} ${phrase}` : article;
}

/** Token ids as written by `decima tokenize`: "1,2,3" (spaces allowed). `what` names the flag or argument. */
export function parseTokenIds(what: string, text: string): number[] {
  const parts = text.split(/[\s,]+/).filter((p) => p !== "");
  if (parts.length === 0) fail("input", `${what}: no token ids`);
  return parts.map((p) => {
    if (!/^\d+$/.test(p) || !Number.isSafeInteger(Number(p))) {
      fail("input", `${what}: "${p}" is not a token id (a non-negative integer)`);
    }
    return Number(p);
  });
}
