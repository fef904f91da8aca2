// Generate two images with the official openai npm package and save them as PNG files.
//
//   make serve                                   # in another terminal
//   npm ci --prefix examples                     # once
//   node examples/generate.mjs [OUTPUT_DIR]
//
// OPENAI_BASE_URL (default http://127.0.0.1:8000/v1) and OPENAI_API_KEY (default "unused")
// pick the server; images go to OUTPUT_DIR (the argument, else $OUTPUT_DIR, else ".").
import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.OPENAI_BASE_URL ?? "http://127.0.0.1:8000/v1",
  apiKey: process.env.OPENAI_API_KEY ?? "unused",
});
const outputDir = process.argv[2] ?? process.env.OUTPUT_DIR ?? ".";
await mkdir(outputDir, { recursive: true });

// seed and negative_prompt are diffusers extras: the SDK sends unknown fields as they are.
const result = await client.images.generate({
  prompt: "a watercolor fox in a snowy forest",
  n: 2,
  seed: 42,
  negative_prompt: "blurry",
});
for (const item of result.data) {
  const file = path.join(outputDir, `fox-${item.seed}.png`);
  await writeFile(file, Buffer.from(item.b64_json, "base64"));
  console.log(`wrote ${file} (seed ${item.seed})`);
}
