import { inspect } from "node:util";
import { type Command, CommanderError } from "commander";
import { oneLine } from "../errors.js";

/** Exit status for a bad command line (commander's errors and bad flag values), as most Unix tools use. */
const USAGE = 2;

/**
 * Parse argv and run the chosen command. Any failure is one line on stderr, `decima: <message>`, with exit
 * status 1, or 2 for a bad command line; DECIMA_DEBUG=1 adds the stack.
 */
export async function runCli(program: Command, argv: readonly string[] = process.argv): Promise<void> {
  forEachCommand(program, (cmd) =>
    cmd.exitOverride().configureOutput({
      // Commander's own messages ("error: unknown option '--x'\n(Did you mean --y?)") in our one-line form.
      outputError: (message, write) => write(`decima: ${oneLine(message.replace(/^error: /, "").trim())}\n`),
    }),
  );
  // Option values are parsed (and our parsers may fail) before any action starts.
  let acting = false;
  program.hook("preAction", () => {
    acting = true;
  });
  try {
    await program.parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      // Already printed (or help/version shown, with exit code 0).
      process.exitCode = err.exitCode === 0 ? 0 : USAGE;
      return;
    }
    process.stderr.write(`decima: ${oneLine(err)}\n`);
    if (process.env.DECIMA_DEBUG === "1") process.stderr.write(`${inspect(err)}\n`);
    process.exitCode = acting ? 1 : USAGE;
  }
}

/** Subcommands copy these settings only when created, and commands are registered before runCli. */
function forEachCommand(cmd: Command, apply: (cmd: Command) => void): void {
  apply(cmd);
  for (const sub of cmd.commands) forEachCommand(sub, apply);
}
