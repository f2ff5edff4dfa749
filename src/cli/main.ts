#!/usr/bin/env node
import { Command } from "commander";
import { runCli } from "./run.js";
import * as bench from "./commands/bench.js";
import * as benchServe from "./commands/bench-serve.js";
import * as build from "./commands/build.js";
import * as createModel from "./commands/create-model.js";
import * as detokenize from "./commands/detokenize.js";
import * as generate from "./commands/generate.js";
import * as logits from "./commands/logits.js";
import * as serve from "./commands/serve.js";
import * as tokenize from "./commands/tokenize.js";

/** Every command lives in commands/<name>.ts and exports register(program). */
const commands = [generate, logits, tokenize, detokenize, createModel, build, bench, serve, benchServe];

const program = new Command("decima")
  .description("Fast inference for DeciCoder and Llama-family code models, from Node.js")
  .version(process.env.npm_package_version ?? "0.1.0");
for (const c of commands) c.register(program);
await runCli(program);
