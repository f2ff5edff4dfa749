import cliProgress from "cli-progress";
import { type Command, Option } from "commander";
import { PRESETS, type PresetName, createModel } from "../../model/create.js";
import type { FloatDType } from "../../model/dtype.js";
import { expectedShapes } from "../../model/weights.js";
import { dtypeOption, integerOption } from "../options.js";

interface CreateModelCliOptions {
  preset: PresetName;
  out: string;
  seed?: number;
  dtype?: FloatDType;
}

export function register(program: Command): void {
  program
    .command("create-model")
    .description("write a model directory with random weights, for tests and benchmarks")
    .addOption(new Option("--preset <name>", "model shape").choices(Object.keys(PRESETS)).makeOptionMandatory())
    .requiredOption("--out <dir>", "the directory to create (absent or empty)")
    .addOption(integerOption("--seed <n>", "random seed (default 0)", { min: 0, max: 0xffffffff }))
    .addOption(dtypeOption("weight type (default bfloat16)"))
    .action(async (opts: CreateModelCliOptions) => {
      // cli-progress draws only on a terminal, so piped stderr stays clean.
      const bar = new cliProgress.SingleBar(
        { format: "weights |{bar}| {percentage}% {done}/{size} MB", stream: process.stderr },
        cliProgress.Presets.shades_classic,
      );
      const mb = (n: number) => (n / 1e6).toFixed(0);
      let started = false;
      const onProgress = (bytes: number, total: number) => {
        if (!started) bar.start(total, 0, { size: mb(total) });
        started = true;
        bar.update(bytes, { done: mb(bytes) });
      };
      let created: Awaited<ReturnType<typeof createModel>>;
      try {
        created = await createModel({ ...opts, onProgress });
      } finally {
        bar.stop();
      }
      const { dir, config } = created;
      const params = [...expectedShapes(config).values()].reduce((sum, shape) => sum + shape.reduce((a, b) => a * b, 1), 0);
      process.stdout.write(
        `created ${dir}: ${config.architecture}, ${config.layers.length} layers, hidden ${config.hiddenSize}, ` +
          `vocab ${config.vocabSize}, ${(params / 1e6).toFixed(1)}M parameters in ${config.dtype}\n`,
      );
    });
}
