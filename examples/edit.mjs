// Edit an image with the official openai npm package: the picture is generated first (any
// PNG of yours works too) and uploaded with toFile, which names the bytes for the multipart form.
//
//   make serve                                   # in another terminal
//   npm ci --prefix examples                     # once
//   node examples/edit.mjs [OUTPUT_DIR]
//
// OPENAI_BASE_URL (default http://127.0.0.1:8000/v1) and OPENAI_API_KEY (default "unused")
// pick the server; images go to OUTPUT_DIR (the argument, else $OUTPUT_DIR, else ".").
import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import OpenAI, { toFile } from "openai";

const client = new OpenAI({
  baseURL: process.env.OPENAI_BASE_URL ?? "http://127.0.0.1:8000/v1",
  apiKey: process.env.OPENAI_API_KEY ?? "unused",
});
const outputDir = process.argv[2] ?? process.env.OUTPUT_DIR ?? ".";
await mkdir(outputDir, { recursive: true });

const generated = await client.images.generate({ prompt: "a wooden cabin by a lake" });
const cabin = Buffer.from(generated.data[0].b64_json, "base64");
const cabinFile = path.join(outputDir, "cabin.png");
await writeFile(cabinFile, cabin);
console.log(`wrote ${cabinFile}`);

// From a file on disk: toFile(fs.createReadStream("photo.png"), "photo.png", { type: "image/png" })
const edited = await client.images.edit({
  image: await toFile(cabin, "cabin.png", { type: "image/png" }),
  prompt: "the same cabin in winter, covered in snow",
  strength: 0.6, // a diffusers extra: how much of the picture may change
});
const editedFile = path.join(outputDir, "cabin-winter.png");
await writeFile(editedFile, Buffer.from(edited.data[0].b64_json, "base64"));
console.log(`wrote ${editedFile}`);
