import type { Command } from "commander";
import { loadTokenizer, modelOption, parseTokenIds } from "../options.js";

export function register(program: Command): void {
  program
    .command("detokenize")
    .description("print the text of token ids")
    .addOption(modelOption())
    .argument("<ids>", "token ids, comma-separated", (text: string) => parseTokenIds("<ids>", text))
    .action(async (ids: number[], opts: { model: string }) => {
      process.stdout.write(`${(await loadTokenizer(opts.model)).decode(ids)}\n`);
    });
}
