import type { Command } from "commander";
import { loadTokenizer, modelOption } from "../options.js";

export function register(program: Command): void {
  program
    .command("tokenize")
    .description("print the token ids of a text, as the model's prompts are tokenized")
    .addOption(modelOption())
    .option("--json", "print a JSON array")
    .argument("<text>", "the text (after -- if it starts with -)")
    .action(async (text: string, opts: { model: string; json?: boolean }) => {
      const ids = (await loadTokenizer(opts.model)).encode(text);
      process.stdout.write(`${opts.json ? JSON.stringify(ids) : ids.join(",")}\n`);
    });
}
