import { setMaxListeners } from "node:events";
import type { DoneEvent, Engine, GenerateEvent, GenerateRequest, TokenEvent } from "../runtime/engine.js";
import { EventChannel } from "../runtime/event-channel.js";
import type { ServerMetrics } from "./metrics.js";

/** One event of one of a request's choices (n per prompt, numbered as OpenAI numbers them). */
export interface ChoiceEvent {
  index: number;
  event: GenerateEvent;
}

/** The choices' events that came together (a step's tokens): a stream writes them out at once. */
export type ChoiceBatch = ChoiceEvent[];

export interface ChoicesContext {
  engine: Engine;
  metrics: ServerMetrics;
  /** Aborted when the client goes away: every choice is cancelled and its KV blocks freed. */
  signal: AbortSignal;
  /** When the HTTP request arrived (performance.now()), for the latency metrics. */
  arrival: number;
}

/**
 * Start all of an HTTP request's choices in the engine, all or none: this waits for every choice's first
 * event, so that a refusal (a prompt too long, a full queue) or an early failure becomes the response's
 * status before any of it is sent, and a refused choice cancels the others. A choice also ends when its
 * own request's signal fires. Then the choices' events are
 * merged in the order they come, each pulled from the engine as soon as it is there (the latency metrics
 * see when tokens were made, not when a slow client read them), in batches of what came together.
 */
export async function startChoices(ctx: ChoicesContext, requests: GenerateRequest[]): Promise<AsyncIterable<ChoiceBatch>> {
  const stop = new AbortController();
  setMaxListeners(0, stop.signal); // the engine listens once per choice, and n may be large
  const onClientGone = () => stop.abort();
  ctx.signal.addEventListener("abort", onClientGone, { once: true });
  const detach = () => ctx.signal.removeEventListener("abort", onClientGone);
  if (ctx.signal.aborted) stop.abort();

  const gens = requests.map((r) => ctx.engine.generateBatches({ ...r, signal: r.signal ? AbortSignal.any([stop.signal, r.signal]) : stop.signal }));
  const observers = requests.map(() => ctx.metrics.choice(ctx.arrival));
  const firsts = await Promise.allSettled(
    gens.map(async (gen, i) => {
      try {
        const first = await gen.next();
        if (!first.done) first.value.forEach(observers[i]);
        return first;
      } catch (err) {
        stop.abort();
        throw err;
      }
    }),
  );
  const refused = firsts.find((f) => f.status === "rejected");
  if (refused) {
    detach();
    await Promise.all(gens.map((gen) => gen.return()));
    throw refused.reason;
  }

  const merged = new EventChannel<ChoiceEvent>();
  let open = gens.length;
  const pump = async (index: number, first: IteratorResult<GenerateEvent[], void>) => {
    const gen = gens[index];
    try {
      for (let r = first; !r.done; r = await gen.next()) {
        for (const event of r.value) {
          if (r !== first) observers[index](event);
          merged.push({ index, event });
        }
      }
      if (--open === 0) merged.end();
    } catch (err) {
      stop.abort(); // one choice failed: the response fails, so the others stop too
      merged.end(err);
    }
  };
  firsts.forEach((f, i) => f.status === "fulfilled" && void pump(i, f.value));
  return (async function* () {
    try {
      yield* merged.batches();
    } finally {
      // Reached when the response is complete, failed, or its stream destroyed (the client left).
      stop.abort();
      detach();
    }
  })();
}

/** A choice generated to its end: its token events and its done event. */
export interface ChoiceResult {
  tokens: TokenEvent[];
  done: DoneEvent;
}

/** Every choice's result, by index: for responses sent whole. */
export async function collectChoices(batches: AsyncIterable<ChoiceBatch>, count: number): Promise<ChoiceResult[]> {
  const tokens = Array.from({ length: count }, (): TokenEvent[] => []);
  const dones = new Array<DoneEvent>(count);
  for await (const batch of batches) {
    for (const { index, event } of batch) {
      if (event.type === "token") tokens[index].push(event);
      if (event.type === "done") dones[index] = event;
    }
  }
  return dones.map((done, i) => ({ tokens: tokens[i], done }));
}
