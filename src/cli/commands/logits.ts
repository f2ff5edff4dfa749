import { type Command, Option } from "commander";
import { type ModelOptions, deviceOption, dtypeOption, modelOption, parseTokenIds, withEngine } from "../options.js";

interface LogitsOptions extends ModelOptions {
  tokens: number[];
}

export function register(program: Command): void {
  program
    .command("logits")
    .description("print, as JSON, the logits at every position of a token sequence (teacher forcing)")
    .addOption(modelOption())
    .addOption(
      new Option("--tokens <ids>", "token ids, comma-separated")
        .argParser((text: string) => parseTokenIds("--tokens", text))
        .makeOptionMandatory(),
    )
    .addOption(deviceOption())
    .addOption(dtypeOption())
    .action(async (opts: LogitsOptions) => {
      const rows = await withEngine(opts, (engine) => engine.logits(opts.tokens));
      const logits = rows.map((row) => Array.from(row));
      process.stdout.write(`${JSON.stringify({ tokens: opts.tokens, logits })}\n`);
    });
}
