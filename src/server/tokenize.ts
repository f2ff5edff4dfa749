import type { FastifyRequest } from "fastify";
import { ApiError } from "./api-error.js";
import type { RouteContext } from "./app.js";
import { chatPromptIds } from "./chat.js";
import { type TokenizeBody, detokenizeSchema, parseBody, tokenizeSchema } from "./requests.js";

/**
 * POST /tokenize and /detokenize, which clients use to count a prompt's tokens before they send it (to fit
 * the context), in the forms vLLM's and llama.cpp's servers take: text as `prompt` (vLLM: special tokens
 * added unless add_special_tokens is false) or `content` (llama.cpp: none unless add_special), or a
 * conversation as `messages` (vLLM: rendered by the chat template). One reply serves both kinds of client:
 * `tokens` (with llama.cpp's `with_pieces`, {id, piece} each), `count` and `max_model_len`; /detokenize's
 * text comes as vLLM's `prompt` and as llama.cpp's `content`.
 */
export async function tokenize(ctx: RouteContext, request: FastifyRequest): Promise<unknown> {
  const body = parseBody(tokenizeSchema, request.body);
  const model = body.model == null ? ctx.modelName : ctx.checkModel(body.model);
  const ids = tokenIds(ctx, model, body);
  const { tokenizer, config } = ctx.engine;
  const tokens = body.with_pieces ? ids.map((id) => ({ id, piece: tokenizer.decode([id]) })) : ids;
  return { tokens, count: ids.length, max_model_len: config.maxPositionEmbeddings };
}

function tokenIds(ctx: RouteContext, model: string, body: TokenizeBody): number[] {
  const given = [body.prompt, body.messages, body.content].filter((x) => x != null).length;
  if (given !== 1) throw new ApiError(400, "give one of prompt, messages (vLLM's forms) or content (llama.cpp's)");
  const { tokenizer } = ctx.engine;
  if (body.messages != null) return chatPromptIds(ctx, model, body.messages, body.add_generation_prompt ?? true);
  if (body.prompt != null) return tokenizer.encode(body.prompt, { addSpecialTokens: body.add_special_tokens ?? true });
  return tokenizer.encode(body.content!, { addSpecialTokens: body.add_special ?? false });
}

export async function detokenize(ctx: RouteContext, request: FastifyRequest): Promise<unknown> {
  const body = parseBody(detokenizeSchema, request.body);
  if (body.model != null) ctx.checkModel(body.model);
  const text = ctx.engine.tokenizer.decode(body.tokens);
  return { prompt: text, content: text };
}
