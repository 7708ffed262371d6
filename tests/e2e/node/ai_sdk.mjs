// One tool round trip with the Vercel AI SDK (`ai` + `@ai-sdk/openai-compatible`): generateText or
// streamText with a tool that has `execute`, looping until the model stops calling tools.
// Input: one JSON argument {baseURL, apiKey, model, prompt, stream}. Output: one JSON line.
import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { generateText, streamText, stepCountIs, tool } from 'ai';
import { z } from 'zod';

const cfg = JSON.parse(process.argv[2]);
const provider = createOpenAICompatible({ name: 'gatelet', baseURL: cfg.baseURL, apiKey: cfg.apiKey });
const calls = [];
const args = {
  model: provider.chatModel(cfg.model),
  prompt: cfg.prompt,
  maxRetries: 0,
  stopWhen: stepCountIs(4),
  tools: {
    get_weather: tool({
      description: 'Current weather in a city.',
      inputSchema: z.object({ city: z.string() }),
      execute: async ({ city }) => {
        calls.push(city);
        return `sunny, 21 C in ${city}`;
      },
    }),
  },
};
let out;
if (cfg.stream) {
  const errors = [];
  const result = streamText({ ...args, onError: ({ error }) => errors.push(String(error)) });
  const parts = [];
  for await (const part of result.fullStream) {
    if (part.type === 'error') errors.push(String(part.error));
    else parts.push(part.type);
  }
  const steps = await result.steps;
  out = { text: await result.text, steps, parts, errors };
} else {
  const result = await generateText(args);
  out = { text: result.text, steps: result.steps, parts: [], errors: [] };
}
console.log(JSON.stringify({
  final: out.text,
  calls,
  errors: out.errors,
  parts: [...new Set(out.parts)],
  finishReasons: out.steps.map((s) => (typeof s.finishReason === 'string' ? s.finishReason : s.finishReason?.unified)),
  toolCalls: out.steps.flatMap((s) => s.toolCalls.map((c) => ({ id: c.toolCallId, name: c.toolName, input: c.input }))),
  toolResults: out.steps.flatMap((s) => s.toolResults.map((r) => r.output)),
}));
