import type { AddressInfo } from "node:net";
import { type Command, Option } from "commander";
import { fail, oneLine } from "../../errors.js";
import { Engine } from "../../runtime/engine.js";
import { buildServer } from "../../server/app.js";
import { type ModelOptions, asyncSchedulingOptions, deviceOption, dtypeOption, integerOption, modelOption, numberOption } from "../options.js";

/** The flags of a served engine (commander names them as Engine.load's options), for serve and bench-serve. */
export interface ServingOptions extends ModelOptions {
  apiKey?: string;
  servedModelName?: string;
  maxBatchTokens?: number;
  maxWaiting?: number;
  kvMemoryFraction?: number;
  numBlocks?: number;
  prefixCaching: boolean;
  asyncScheduling?: boolean;
  /** Serve the playground page at / (serve's --no-playground; bench-serve has no page to serve). */
  playground?: boolean;
  /** serve's --allowed-origins (CORS). */
  allowedOrigins?: string[];
}

interface ServeOptions extends ServingOptions {
  host: string;
  port: number;
}

export interface Serving {
  url: string;
  modelName: string;
  /** Close the server (open streams are cut and their requests cancelled), then the engine. */
  close(): Promise<void>;
}

export function register(program: Command): void {
  const command = program
    .command("serve")
    .description("serve the model over HTTP: OpenAI's completions and chat API, llama.cpp's /infill, /metrics")
    .addOption(modelOption())
    .option("--host <address>", "address to listen on (0.0.0.0: every interface)", "127.0.0.1")
    .addOption(integerOption("--port <n>", "port to listen on (0: any free one)", { min: 0, max: 65535 }).default(8000))
    .option("--no-playground", "don't serve the playground page at /")
    .addOption(
      new Option("--allowed-origins <origins>", "origins whose pages may call the API from a browser (CORS), comma-separated, or * for any").argParser(
        parseOrigins,
      ),
    );
  addServingOptions(command).action(serve);
}

/** The engine and server flags that serve and bench-serve --model share. */
export function addServingOptions(command: Command): Command {
  command
    .option("--api-key <key>", "the server's API key, sent as Authorization: Bearer <key> (/health needs none)")
    .option("--served-model-name <name>", "the model name clients send (default: --model as given)")
    .addOption(deviceOption())
    .addOption(dtypeOption())
    .addOption(integerOption("--max-batch-tokens <n>", "most new tokens in one step (default 2048)", { min: 1 }))
    .addOption(integerOption("--max-waiting <n>", "most queued requests; past it requests get 503 (default 256)", { min: 1 }))
    .addOption(numberOption("--kv-memory-fraction <f>", "share of the free GPU memory for the KV cache", { above: 0, max: 1 }))
    .addOption(integerOption("--num-blocks <n>", "KV cache blocks, instead of the backend's choice", { min: 1 }))
    .option("--no-prefix-caching", "don't reuse the KV blocks of earlier prompts' common prefixes");
  for (const option of asyncSchedulingOptions()) command.addOption(option);
  return command;
}

/** Load the model and serve it: listening when this resolves. */
export async function startServing(opts: ServingOptions, host: string, port: number): Promise<Serving> {
  const engine = await Engine.load({
    model: opts.model,
    device: opts.device,
    dtype: opts.dtype,
    maxBatchTokens: opts.maxBatchTokens,
    maxWaiting: opts.maxWaiting,
    kvMemoryFraction: opts.kvMemoryFraction,
    numBlocks: opts.numBlocks,
    prefixCaching: opts.prefixCaching,
    asyncScheduling: opts.asyncScheduling,
    warmupSeqs: Number.MAX_SAFE_INTEGER, // every batch size the engine may run: no step waits for a capture
  });
  const app = buildServer(engine, {
    apiKey: opts.apiKey,
    servedModelName: opts.servedModelName,
    playground: opts.playground ?? false,
    allowedOrigins: opts.allowedOrigins,
  });
  const close = async () => {
    await app.close();
    await engine.close();
  };
  try {
    await app.listen({ host, port });
  } catch (err) {
    await close();
    fail("input", `--host ${host} --port ${port}: ${oneLine(err)}`, err);
  }
  const address = app.server.address() as AddressInfo;
  const hostPart = host.includes(":") ? `[${host}]` : host;
  return { url: `http://${hostPart}:${address.port}`, modelName: opts.servedModelName ?? opts.model, close };
}

/** "https://a.example,http://localhost:3000" or "*": each an origin as browsers send it (scheme, host, port). */
function parseOrigins(text: string): string[] {
  const origins = text.split(",").map((o) => o.trim()).filter((o) => o !== "");
  if (origins.length === 0) fail("input", "--allowed-origins: no origin given");
  return origins.map((o) => {
    if (o === "*") return o;
    const origin = URL.canParse(o) ? new URL(o).origin : "null";
    if (origin === "null" || origin !== o.replace(/\/$/, "")) {
      fail("input", `--allowed-origins: "${o}" is not an origin (scheme://host[:port], as https://editor.example)`);
    }
    return origin;
  });
}

async function serve(opts: ServeOptions): Promise<void> {
  const serving = await startServing(opts, opts.host, opts.port);
  const page = opts.playground ? `, a playground at ${serving.url}/` : "";
  process.stdout.write(`decima: serving "${serving.modelName}" at ${serving.url} (OpenAI API under /v1${page})\n`);
  // A second signal while closing gets Node's default handling: the process ends at once.
  await new Promise<void>((resolve) => {
    process.once("SIGINT", resolve);
    process.once("SIGTERM", resolve);
  });
  await serving.close();
}
