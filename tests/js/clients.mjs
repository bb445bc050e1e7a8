// JavaScript clients against the gateway, run once by tests/test_clients.py (`node clients.mjs`).
//
// Reads GATEWAY_URL (the gateway's root, no /v1), GATEWAY_KEY and MODELS (a JSON object:
// target -> model name). Prints one JSON object: the clients' versions, and for each target and
// case either {"ok": true, ...what the test asserts on} or {"ok": false, "error": "..."}. Every case
// runs even when another fails; the Python test decides what passes. Random weights write
// nonsense, so what is returned is the shape (tool calls, parsed objects, usage), never text.
import { readFileSync } from "node:fs";

import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, Output, tool } from "ai";
import OpenAI from "openai";
import { z } from "zod";

const base = process.env.GATEWAY_URL;
const key = process.env.GATEWAY_KEY;
const models = JSON.parse(process.env.MODELS);
const MAX_TOKENS = 160; // a whole call of the bounded schemas below takes 30-80 tokens

const version = (name) =>
  JSON.parse(readFileSync(new URL(`./node_modules/${name}/package.json`, import.meta.url))).version;

// The same bounded shapes as the Python tests: random weights end a bounded string.
const weather = z.object({
  city: z.string().max(24),
  unit: z.enum(["celsius", "fahrenheit"]),
  days: z.number().int().min(1).max(7),
});
const weatherJSONSchema = {
  type: "object",
  properties: {
    city: { type: "string", maxLength: 24 },
    unit: { type: "string", enum: ["celsius", "fahrenheit"] },
    days: { type: "integer", minimum: 1, maximum: 7 },
  },
  required: ["city", "unit", "days"],
  additionalProperties: false,
};
const ask = [{ role: "user", content: "What is the weather in Paris this week?" }];

const openai = new OpenAI({ baseURL: `${base}/v1`, apiKey: key, maxRetries: 0, timeout: 120_000 });
const gateway = createOpenAICompatible({
  name: "gateway",
  baseURL: `${base}/v1`,
  apiKey: key,
  includeUsage: true,
  supportsStructuredOutputs: true, // the gateway honours json_schema response formats
});

const cases = {
  // ---- the openai npm package
  "openai chat": async (model) => {
    const r = await openai.chat.completions.create({ model, messages: ask, max_tokens: 8 });
    return { finish_reason: r.choices[0].finish_reason, usage: r.usage, id: r.id };
  },
  "openai chat streamed": async (model) => {
    const stream = await openai.chat.completions.create({
      model,
      messages: ask,
      max_tokens: 8,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let usage = null;
    let chunks = 0;
    for await (const chunk of stream) {
      chunks += 1;
      text += chunk.choices[0]?.delta?.content ?? "";
      usage = chunk.usage ?? usage;
    }
    return { chunks, text_length: text.length, usage };
  },
  "openai stream helper, tool call": async (model) => {
    const stream = openai.chat.completions.stream({
      model,
      messages: ask,
      tools: [{ type: "function", function: { name: "Weather", parameters: weatherJSONSchema } }],
      tool_choice: "required",
      parallel_tool_calls: false,
      max_tokens: MAX_TOKENS,
      seed: 1,
    });
    const done = [];
    stream.on("tool_calls.function.arguments.done", (event) => done.push(event.arguments));
    const final = await stream.finalChatCompletion();
    const calls = final.choices[0].message.tool_calls ?? [];
    return {
      finish_reason: final.choices[0].finish_reason,
      calls: calls.map((c) => ({ name: c.function.name, arguments: c.function.arguments })),
      done_events: done,
    };
  },
  // ---- the Vercel AI SDK
  "ai generateText with a tool": async (model) => {
    const seen = [];
    const result = await generateText({
      model: gateway(model),
      prompt: "What is the weather in Paris this week?",
      tools: {
        Weather: tool({
          description: "The weather asked for one city.",
          inputSchema: weather,
          execute: async (input) => {
            seen.push(input);
            return { forecast: "sunny" };
          },
        }),
      },
      toolChoice: "required",
      maxOutputTokens: MAX_TOKENS,
      seed: 1,
      maxRetries: 0,
    });
    return {
      finish_reason: result.finishReason,
      calls: result.toolCalls.map((c) => ({ name: c.toolName, input: c.input })),
      results: result.toolResults.map((r) => r.output),
      executed: seen,
      usage: result.usage,
    };
  },
  "ai generateObject with a zod schema": async (model) => {
    const result = await generateObject({
      model: gateway(model),
      schema: weather,
      prompt: "What is the weather in Paris this week?",
      maxOutputTokens: MAX_TOKENS,
      seed: 1,
      maxRetries: 0,
    });
    return { object: result.object, finish_reason: result.finishReason };
  },
  "ai generateText with Output.object": async (model) => {
    const result = await generateText({
      model: gateway(model),
      output: Output.object({ schema: weather }),
      prompt: "What is the weather in Paris this week?",
      maxOutputTokens: MAX_TOKENS,
      seed: 1,
      maxRetries: 0,
    });
    return { object: result.output, finish_reason: result.finishReason };
  },
};

const results = {};
for (const [target, model] of Object.entries(models)) {
  results[target] = {};
  for (const [name, run] of Object.entries(cases)) {
    try {
      results[target][name] = { ok: true, ...(await run(model)) };
    } catch (error) {
      results[target][name] = { ok: false, error: `${error?.name}: ${error?.message}`.slice(0, 2000) };
    }
  }
}
const versions = Object.fromEntries(
  ["openai", "ai", "@ai-sdk/openai-compatible", "zod"].map((name) => [name, version(name)]),
);
console.log(JSON.stringify({ node: process.version, versions, results }));
