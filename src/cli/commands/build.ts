import cliProgress from "cli-progress";
import { type Command, Option } from "commander";
import { type BuildProgress, buildEngine } from "../../model/build-engine.js";
import type { FloatDType } from "../../model/dtype.js";
import type { QuantKind } from "../../model/quantize.js";
import { dtypeOption, integerOption, modelOption } from "../options.js";

interface BuildCliOptions {
  model: string;
  out: string;
  dtype?: FloatDType;
  quant: QuantKind;
  groupSize?: number;
}

export function register(program: Command): void {
  program
    .command("build")
    .description("build an engine directory: weights packed, in 16 bits and optionally quantized, loaded by reading")
    .addOption(modelOption())
    .requiredOption("--out <dir>", "the engine directory to create (absent or empty)")
    .addOption(
      dtypeOption("16-bit weight type (default: the checkpoint's; bfloat16 for float32 ones)").choices(["float16", "bfloat16"]),
    )
    .addOption(
      new Option("--quant <kind>", "quantize the decoder layers' linear weights (default: none; a GPTQ checkpoint: its own int4)").choices([
        "none",
        "int8",
        "int4",
      ]),
    )
    .addOption(integerOption("--group-size <n>", "int4: columns per scale (default 128; a GPTQ checkpoint's own)", { min: 1 }))
    .action(async (opts: BuildCliOptions) => {
      // cli-progress draws only on a terminal, so piped stderr stays clean.
      const bar = new cliProgress.SingleBar(
        { format: "tensors |{bar}| {value}/{total} {tensor}", stream: process.stderr },
        cliProgress.Presets.shades_classic,
      );
      let started = false;
      const onProgress = ({ tensor, done, total }: BuildProgress) => {
        if (!started) bar.start(total, 0, { tensor });
        started = true;
        bar.update(done, { tensor });
      };
      let built: Awaited<ReturnType<typeof buildEngine>>;
      try {
        built = await buildEngine({ ...opts, onProgress });
      } finally {
        bar.stop();
      }
      const { dir, manifest, bytes, ms } = built;
      const quant = manifest.quant.kind === "int4" ? `int4, groups of ${manifest.quant.groupSize}` : manifest.quant.kind;
      process.stdout.write(
        `built ${dir}: ${manifest.tensors.length} tensors, ${(bytes / 1e6).toFixed(1)} MB of ${manifest.dtype} weights ` +
          `(quantization ${quant}) in ${(ms / 1000).toFixed(1)} s\n`,
      );
    });
}
