// Stream a generation with the official openai npm package: two previews (partial images)
// while it denoises, then the final image.
//
//   make serve                                   # in another terminal
//   npm ci --prefix examples                     # once
//   node examples/stream_partial_images.mjs [OUTPUT_DIR]
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

const stream = await client.images.generate({
  prompt: "a hot air balloon over hills",
  stream: true,
  partial_images: 2,
});
for await (const event of stream) {
  const name =
    event.type === "image_generation.partial_image"
      ? `balloon-partial-${event.partial_image_index}.png`
      : "balloon.png";
  const file = path.join(outputDir, name);
  await writeFile(file, Buffer.from(event.b64_json, "base64"));
  console.log(`${event.type}: wrote ${file}`);
}
