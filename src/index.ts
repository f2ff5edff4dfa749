/** decima as a library: the engine, its request and event types, and the pieces a program may need beside it. */
export {
  Engine,
  type DoneEvent,
  type EngineLoadOptions,
  type EngineParts,
  type EngineStats,
  type GenerateEvent,
  type GenerateRequest,
  type GenerateTimings,
  type PromptEvent,
  type TextEvent,
  type TokenEvent,
  type TopLogprob,
} from "./runtime/engine.js";
export type { SamplingOptions } from "./runtime/sampling-params.js";
export type { FinishReason } from "./runtime/stop.js";
export { Tokenizer } from "./tokenizer/tokenizer.js";
export { DecimaError, type ErrorKind } from "./errors.js";
export { parseModelConfig, type ModelConfig } from "./model/config.js";
export { createModel, type CreateModelOptions } from "./model/create.js";
export { buildServer, type ServerOptions } from "./server/app.js";
