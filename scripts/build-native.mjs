#!/usr/bin/env node
// Builds the CUDA backend (native/) where a CUDA toolkit with cuBLASLt is present. Anywhere else the
// install still succeeds, and says that only the CPU backend is available.
//   DECIMA_SKIP_NATIVE=1      skip the build
//   DECIMA_CUDA_EXTRA=DIR     cuBLAS headers (DIR/include) and link stubs (DIR/lib64/stubs) for toolkits
//                             that lack them
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { cpus } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const buildDir = join(root, "build", "native");

function unavailable(reason) {
  console.log(`decima: CUDA backend unavailable (${reason}); the CPU backend works everywhere.`);
  process.exit(0);
}

function findNvcc() {
  const candidates = [process.env.CUDACXX, join(process.env.CUDA_HOME ?? "/usr/local/cuda", "bin", "nvcc")];
  const onPath = spawnSync("sh", ["-c", "command -v nvcc"], { encoding: "utf8" }).stdout.trim();
  if (onPath) candidates.push(onPath);
  return candidates.find((c) => c && existsSync(c));
}

function findCublas(nvcc) {
  const toolkit = resolve(dirname(nvcc), "..");
  const extra = process.env.DECIMA_CUDA_EXTRA;
  const options = [
    { include: join(toolkit, "include"), lib: join(toolkit, "lib64") },
    ...(extra ? [{ include: join(extra, "include"), lib: join(extra, "lib64", "stubs") }] : []),
  ];
  return options.find((o) => existsSync(join(o.include, "cublasLt.h")) && existsSync(join(o.lib, "libcublasLt.so")));
}

function findNodeHeaders() {
  const dirs = [
    process.env.npm_config_nodedir && join(process.env.npm_config_nodedir, "include", "node"),
    join(dirname(process.execPath), "..", "include", "node"),
  ];
  return dirs.find((d) => d && existsSync(join(d, "node_api.h")));
}

if (process.env.DECIMA_SKIP_NATIVE === "1") unavailable("DECIMA_SKIP_NATIVE=1");
const nvcc = findNvcc();
if (!nvcc) unavailable("no CUDA toolkit: nvcc not found");
const cublas = findCublas(nvcc);
if (!cublas) unavailable("cuBLASLt headers or library not found; set DECIMA_CUDA_EXTRA to a folder that has them");
const nodeHeaders = findNodeHeaders();
if (!nodeHeaders) unavailable("Node.js headers not found");
const addonApi = createRequire(import.meta.url)("node-addon-api").include_dir;

console.log(`decima: building the CUDA backend with ${nvcc} (a few minutes)...`);
mkdirSync(buildDir, { recursive: true });
const run = (args) => execFileSync("cmake", args, { stdio: "inherit", cwd: root });
try {
  run([
    "-S", join(root, "native"),
    "-B", buildDir,
    `-DCMAKE_CUDA_COMPILER=${nvcc}`,
    `-DNODE_INCLUDE_DIR=${nodeHeaders}`,
    `-DNODE_ADDON_API_DIR=${join(root, addonApi)}`,
    `-DCUBLAS_INCLUDE_DIR=${cublas.include}`,
    `-DCUBLAS_LIB_DIR=${cublas.lib}`,
  ]);
  run(["--build", buildDir, "-j", String(Math.max(1, cpus().length))]);
} catch {
  console.error("decima: the CUDA backend failed to build (see above)");
  process.exit(1);
}
console.log(`decima: CUDA backend built: ${join(buildDir, "decima.node")}`);
