import { readFile } from "node:fs/promises";
import path from "node:path";
import { Template } from "@huggingface/jinja";
import { z } from "zod";
import { fail, oneLine } from "../errors.js";
import { HfTokenizer } from "./hf.js";
import { splitsAtLineEnds } from "./line-encoder.js";

/** Ids of the fill-in-the-middle tokens (StarCoder's <fim_prefix>, <fim_middle>, <fim_suffix>, <fim_pad>). */
export interface FimTokens {
  prefix: number;
  middle: number;
  suffix: number;
  pad: number | null;
}

export interface ChatMessage {
  role: string;
  content: string;
}

/** Where the two objects came from, for error messages. */
interface Sources {
  json: string;
  config: string;
}

// transformers writes special tokens either as strings or as AddedToken objects ({content, lstrip, ...}).
const tokenField = z
  .union([z.string(), z.looseObject({ content: z.string() })])
  .nullable()
  .optional();

const configSchema = z.looseObject({
  bos_token: tokenField,
  eos_token: tokenField,
  additional_special_tokens: z.array(z.union([z.string(), z.looseObject({ content: z.string() })])).optional(),
  chat_template: z
    .union([z.string(), z.array(z.object({ name: z.string(), template: z.string() }))])
    .nullable()
    .optional(),
});

type TokenizerConfig = z.infer<typeof configSchema>;

const jsonSchema = z.looseObject({
  model: z.looseObject({ type: z.string().optional() }),
  added_tokens: z.array(z.looseObject({ id: z.number().int().nonnegative(), content: z.string() })).optional(),
});

/**
 * decima's tokenizer: Hugging Face's tokenizer.json run by @huggingface/tokenizers (the JavaScript port of
 * the `tokenizers` library), plus what tokenizer_config.json adds: BOS/EOS, the chat template and which
 * tokens are special. Decoding never applies transformers' clean_up_tokenization_spaces: that English-prose
 * heuristic (" ." -> ".") would change generated code, and it would make decoding depend on neighbouring
 * text in a way streaming can't follow.
 *
 * Where the port differs from the Rust library (from its source): Digits splits ASCII digits only, not
 * every Unicode numeral; ByteFallback decoding drops a leading byte order mark and writes one U+FFFD per
 * invalid sequence rather than per byte.
 */
export class Tokenizer {
  /** Ids run from 0 to vocabSize - 1, added tokens included: the rows a model's embedding needs. */
  readonly vocabSize: number;
  readonly bosTokenId: number | null;
  readonly eosTokenId: number | null;
  readonly fim: FimTokens | null;
  readonly chatTemplate: string | null;
  /** See splitsAtLineEnds (line-encoder.ts). */
  readonly splitsAtLineEnds: boolean;
  private readonly specialIds: Set<number>;
  private readonly bosToken: string | null;
  private readonly eosToken: string | null;
  private template: Template | null = null;

  private constructor(
    private readonly hf: HfTokenizer,
    config: TokenizerConfig,
    private readonly sources: Sources,
    splits: boolean,
  ) {
    this.splitsAtLineEnds = splits;
    let maxId = -1;
    for (const id of hf.get_vocab(true).values()) maxId = Math.max(maxId, id);
    this.vocabSize = maxId + 1;
    this.bosToken = tokenContent(config.bos_token);
    this.eosToken = tokenContent(config.eos_token);
    this.bosTokenId = this.declaredTokenId(this.bosToken, "bos_token");
    this.eosTokenId = this.declaredTokenId(this.eosToken, "eos_token");
    this.specialIds = new Set([...hf.get_added_tokens_decoder()].filter(([, t]) => t.special).map(([id]) => id));
    for (const token of config.additional_special_tokens ?? []) {
      const id = this.tokenToId(tokenContent(token)!);
      if (id !== null) this.specialIds.add(id);
    }
    this.fim = this.findFimTokens();
    this.chatTemplate = chatTemplateOf(config, sources.config);
  }

  /**
   * Reads tokenizer.json (required) and tokenizer_config.json (optional) from a model directory, and
   * chat_template.jinja, where newer transformers versions save the chat template instead.
   */
  static async load(dir: string): Promise<Tokenizer> {
    const sources = { json: path.join(dir, "tokenizer.json"), config: path.join(dir, "tokenizer_config.json") };
    const jsonText = await readOptional(sources.json);
    if (jsonText === null) fail("tokenizer", `${sources.json}: not found (decima needs a fast tokenizer's tokenizer.json)`);
    const configText = await readOptional(sources.config);
    let config = configText === null ? null : parseJson(configText, sources.config);
    const template = await readOptional(path.join(dir, "chat_template.jinja"));
    if (template !== null) config = withChatTemplate(config, template);
    return Tokenizer.create(parseJson(jsonText, sources.json), config, sources);
  }

  static fromObjects(tokenizerJson: object, tokenizerConfig: object | null): Tokenizer {
    return Tokenizer.create(tokenizerJson, tokenizerConfig, {
      json: "tokenizer.json",
      config: "tokenizer_config.json",
    });
  }

  private static create(tokenizerJson: unknown, tokenizerConfig: unknown, sources: Sources): Tokenizer {
    const json = parseWith(jsonSchema, tokenizerJson, sources.json);
    const config = tokenizerConfig === null ? {} : parseWith(configSchema, tokenizerConfig, sources.config);
    let hf: HfTokenizer;
    try {
      // Older files leave out the stages they don't use; the library wants every key present.
      const full = { normalizer: null, pre_tokenizer: null, post_processor: null, decoder: null, added_tokens: [], ...json };
      hf = new HfTokenizer(full, withPlainTokens(config));
    } catch (err) {
      fail("tokenizer", `${sources.json}: ${oneLine(err)}`, err);
    }
    return new Tokenizer(hf, config, sources, splitsAtLineEnds(json));
  }

  /**
   * Token ids of `text`. Special tokens written in the text ("<fim_prefix>") become those tokens, as in
   * Hugging Face. `addSpecialTokens` (default true) applies the tokenizer's own post-processor: StarCoder's
   * adds nothing, Llama's adds BOS.
   */
  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    return this.hf.encode(text, { add_special_tokens: opts.addSpecialTokens ?? true }).ids;
  }

  decode(ids: number[], opts: { skipSpecialTokens?: boolean } = {}): string {
    if (ids.length === 0) return "";
    for (const id of ids) {
      if (this.idToToken(id) === null) {
        fail("input", `token id ${id} is not in the tokenizer's vocabulary (ids 0..${this.vocabSize - 1})`);
      }
    }
    return this.hf.decode(ids, {
      skip_special_tokens: opts.skipSpecialTokens ?? false,
      clean_up_tokenization_spaces: false,
    });
  }

  idToToken(id: number): string | null {
    if (!Number.isInteger(id) || id < 0) return null;
    return this.hf.id_to_token(id) ?? null;
  }

  tokenToId(token: string): number | null {
    return this.hf.token_to_id(token) ?? null;
  }

  isSpecial(id: number): boolean {
    return this.specialIds.has(id);
  }

  /** The conversation rendered as the model's prompt text, as transformers' apply_chat_template does. */
  applyChatTemplate(messages: ChatMessage[], opts: { addGenerationPrompt: boolean }): string {
    const template = this.compiledTemplate();
    try {
      return template.render({
        messages,
        bos_token: this.bosToken ?? "",
        eos_token: this.eosToken ?? "",
        add_generation_prompt: opts.addGenerationPrompt,
      });
    } catch (err) {
      // Templates reject conversations they can't render (raise_exception), e.g. roles out of order.
      fail("input", `chat template: ${oneLine(err)}`, err);
    }
  }

  private compiledTemplate(): Template {
    if (this.chatTemplate === null) fail("input", "this model has no chat template");
    try {
      this.template ??= new Template(this.chatTemplate);
    } catch (err) {
      fail("tokenizer", `${this.sources.config}: chat_template: ${oneLine(err)}`, err);
    }
    return this.template;
  }

  private declaredTokenId(token: string | null, field: string): number | null {
    if (token === null) return null;
    const id = this.tokenToId(token);
    if (id === null) fail("tokenizer", `${this.sources.config}: ${field} "${token}" is not in the vocabulary`);
    return id;
  }

  private findFimTokens(): FimTokens | null {
    const prefix = this.tokenToId("<fim_prefix>");
    const middle = this.tokenToId("<fim_middle>");
    const suffix = this.tokenToId("<fim_suffix>");
    if (prefix === null || middle === null || suffix === null) return null;
    return { prefix, middle, suffix, pad: this.tokenToId("<fim_pad>") };
  }
}

/** The file's text, or null if there is no such file. */
async function readOptional(file: string): Promise<string | null> {
  try {
    return await readFile(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    fail("tokenizer", `${file}: ${oneLine(err)}`, err);
  }
}

function parseJson(text: string, file: string): unknown {
  try {
    return JSON.parse(text);
  } catch (err) {
    fail("tokenizer", `${file}: not valid JSON (${oneLine(err)})`, err);
  }
}

/** The template from chat_template.jinja, unless tokenizer_config.json has one of its own. */
function withChatTemplate(config: unknown, template: string): unknown {
  if (config === null) return { chat_template: template };
  const isObject = typeof config === "object" && !Array.isArray(config);
  if (isObject && (config as { chat_template?: unknown }).chat_template == null) {
    return { ...config, chat_template: template };
  }
  return config;
}

function parseWith<T>(schema: z.ZodType<T>, raw: unknown, where: string): T {
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const key = issue.path.length ? issue.path.join(".") : "(root)";
    fail("tokenizer", `${where}: ${key}: ${issue.message}`);
  }
  return parsed.data;
}

function tokenContent(token: string | { content: string } | null | undefined): string | null {
  if (token === undefined || token === null) return null;
  return typeof token === "string" ? token : token.content;
}

/** The config with AddedToken objects replaced by their text: the library compares tokens as strings. */
function withPlainTokens(config: TokenizerConfig): object {
  const plain: Record<string, unknown> = { ...config };
  for (const key of ["bos_token", "eos_token", "unk_token", "pad_token"]) {
    const value = plain[key];
    if (typeof value === "object" && value !== null && "content" in value) plain[key] = value.content;
  }
  if (config.additional_special_tokens) {
    plain.additional_special_tokens = config.additional_special_tokens.map((t) => tokenContent(t));
  }
  return plain;
}

/** tokenizer_config's chat_template: one template, or named ones of which decima uses "default". */
function chatTemplateOf(config: TokenizerConfig, where: string): string | null {
  const t = config.chat_template;
  if (t === undefined || t === null) return null;
  if (typeof t === "string") return t;
  const named = t.find((x) => x.name === "default");
  if (named === undefined) {
    fail("tokenizer", `${where}: chat_template has no template named "default" (has ${t.map((x) => x.name).join(", ")})`);
  }
  return named.template;
}
